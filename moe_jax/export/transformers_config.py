"""`config.json` of transformers' native `Qwen2MoeForCausalLM` / `Glm4MoeForCausalLM` / `LlamaForCausalLM`
<-> our gin bindings.

How our models map (DeepSeekMoE, arXiv:2401.06066, and its GShard/Switch/Dense baselines):
  - softmax router over the N' routed experts, top-K', raw gates (Qwen2Moe): `num_experts`,
    `num_experts_per_tok`, `norm_topk_prob: false` (`MoEConfig.renormalize_topk` when set);
  - the K_s shared experts, fused as one MLP of width K_s * f: `shared_expert_intermediate_size`
    (0 without shared experts), behind Qwen2Moe's sigmoid gate whose weight is zero (see `layout`);
  - dense layers (`first_k_dense`, `moe_layer_freq`): `mlp_only_layers` listed explicitly with
    `decoder_sparse_step: 1` (Qwen2Moe's own rule is MoE iff (l + 1) % step == 0);
  - `head_dim` free, `qkv_bias`/`attention_bias` false, multi-head (`num_key_value_heads` = heads),
    rotate-half RoPE with `rope_parameters: {rope_type: default, rope_theta}`, RMSNorm eps.
DeepSeek-V3's router (`MoEConfig.router_score="sigmoid"`, arXiv:2412.19437 §2.1.2) maps to Glm4Moe, whose
`Glm4MoeTopkRouter` is V3's: sigmoid scores, the top-k of scores + `e_score_correction_bias` (our
`selection_bias`) within the top `topk_group` of `n_group` groups scored by their top-2 sum
(`topk_groups`, `num_expert_groups`, `group_score="top2_sum"`; 1 and 1 without groups),
`norm_topk_prob` (`renormalize_topk`) and `routed_scaling_factor`; `n_shared_experts` = K_s;
`first_k_dense_replace` dense layers, then every layer MoE; full rotary (`partial_rotary_factor: 1.0`,
Glm4MoeConfig's default is 0.5), no q/k norm, no multi-token-prediction layers.
Keys transformers 4.x reads instead (`rope_theta`, `torch_dtype`) are written too. What no key says
(param dtype, training-only MoE settings, the step) goes under "moe_jax", as in `hf_config`.
"""

from __future__ import annotations

from typing import Any, Mapping

from moe_jax.config import ModelConfig
from moe_jax.export.hf_config import moe_jax_bindings, moe_jax_block, trunk_bindings, trunk_keys
from moe_jax.export.layout import (
    GLM4_MOE,
    LLAMA,
    QWEN2_MOE,
    Layout,
    LayoutError,
    check_exportable,
    transformers_layout,
)

MODEL_TYPES = {"qwen2_moe": QWEN2_MOE, "glm4_moe": GLM4_MOE, "llama": LLAMA}


def grouped_mm_aligned(cfg: ModelConfig) -> bool:
    """Whether transformers' default MoE kernel (`experts_implementation="grouped_mm"`) can run the
    routed experts: torch's grouped_mm needs 16-byte row strides, i.e. d_model and the expert width f
    multiples of 8 (bfloat16). Otherwise config.json selects transformers' "eager" expert loop (same
    result, one matmul pair per expert); torch 2.13's CPU kernel raises "strides should be multiple of
    16 bytes" for e.g. the 2B-family width f = 853 / 86."""
    return cfg.moe is None or (cfg.d_model % 8 == 0 and cfg.moe.expert_dim % 8 == 0)


def _common(cfg: ModelConfig, lay: Layout, **ids_and_more) -> dict:
    return {
        "architectures": [lay.architecture],
        "model_type": lay.name,
        **trunk_keys(cfg),
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "attention_dropout": 0.0,
        "use_cache": True,
        "tie_word_embeddings": False,
        **ids_and_more,
    }


def to_transformers_config(
    cfg: ModelConfig,
    *,
    dtype: str,
    max_position_embeddings: int,
    bos_token_id: int | None,
    eos_token_id: int | None,
    pad_token_id: int | None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """config.json of `cfg` as Qwen2MoeForCausalLM (softmax-routed MoE), Glm4MoeForCausalLM (sigmoid-scored
    MoE) or LlamaForCausalLM (dense, Dense-xN); `cfg` must pass `check_exportable(cfg, transformers_layout(cfg))`."""
    lay = transformers_layout(cfg)
    check_exportable(cfg, lay)
    m = cfg.moe
    out = _common(
        cfg,
        lay,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype=dtype,
        torch_dtype=dtype,
    )
    if lay is LLAMA:
        if m is not None:  # Dense-xN: every FFN is the shared experts' MLP (check_exportable: one width)
            out["intermediate_size"] = m.num_shared_experts * m.expert_dim
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif lay is GLM4_MOE:
        out["rope_parameters"]["partial_rotary_factor"] = 1.0
        out.update(
            n_routed_experts=m.num_experts,
            num_experts_per_tok=m.top_k,
            moe_intermediate_size=m.expert_dim,
            n_shared_experts=m.num_shared_experts,
            first_k_dense_replace=next(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)),
            n_group=m.num_expert_groups if m.topk_groups else 1,
            topk_group=m.topk_groups or 1,
            norm_topk_prob=m.renormalize_topk,
            routed_scaling_factor=m.routed_scaling_factor,
            partial_rotary_factor=1.0,
            attention_bias=False,
            use_qk_norm=False,
            num_nextn_predict_layers=0,
            output_router_logits=False,
        )
        if not grouped_mm_aligned(cfg):
            out["experts_implementation"] = "eager"
    else:
        out.update(
            num_experts=m.num_experts,
            num_experts_per_tok=m.top_k,
            moe_intermediate_size=m.expert_dim,
            shared_expert_intermediate_size=m.num_shared_experts * m.expert_dim,
            norm_topk_prob=m.renormalize_topk,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)],
            router_aux_loss_coef=m.expert_balance_alpha,
            output_router_logits=False,
            qkv_bias=False,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=cfg.num_layers,
        )
        if not grouped_mm_aligned(cfg):
            out["experts_implementation"] = "eager"
    out["moe_jax"] = moe_jax_block(cfg, extra)
    return out


def rope_theta_of(config: Mapping[str, Any]) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def moe_layers_of(config: Mapping[str, Any]) -> list[int]:
    """Qwen2MoeDecoderLayer's rule: layer l is MoE iff l not in mlp_only_layers, num_experts > 0 and
    (l + 1) % decoder_sparse_step == 0; Glm4MoeDecoderLayer's: iff l >= first_k_dense_replace."""
    layers = int(config.get("num_hidden_layers", 0))
    if config.get("model_type") == "glm4_moe":
        first = int(config.get("first_k_dense_replace", 1))
        return list(range(first, layers)) if int(config.get("n_routed_experts", 0)) else []
    if config.get("model_type") != "qwen2_moe" or not int(config.get("num_experts", 0)):
        return []
    only, step = set(config.get("mlp_only_layers") or []), int(config.get("decoder_sparse_step", 1))
    return [i for i in range(layers) if i not in only and (i + 1) % step == 0]


def layer_pattern(moe_layers: list[int], num_layers: int) -> tuple[int, int] | None:
    """(first_k_dense, moe_layer_freq) whose rule (MoE iff l >= k and l % freq == 0) gives exactly
    `moe_layers`, or None."""
    for freq in range(1, num_layers + 1):
        for k in range(num_layers + 1):
            if [i for i in range(num_layers) if i >= k and i % freq == 0] == moe_layers:
                return k, freq
    return None


def check_transformers_config(config: Mapping[str, Any]) -> None:
    """Raise LayoutError naming every key of a Qwen2Moe/Glm4Moe/Llama config.json our model cannot express."""
    problems = []
    heads = int(config.get("num_attention_heads", 0))
    kv = config.get("num_key_value_heads") or heads
    if kv != heads:
        problems.append(
            f"num_key_value_heads={kv} != num_attention_heads={heads}: grouped-query attention is not "
            f"supported (our attention is multi-head)"
        )
    rope = config.get("rope_parameters") or {}
    checks = [
        ("hidden_act", config.get("hidden_act", "silu"), "silu"),
        ("tie_word_embeddings", config.get("tie_word_embeddings", False), False),
        ("rope_parameters.rope_type", rope.get("rope_type", "default"), "default"),
        ("attention_bias", config.get("attention_bias", False), False),
        ("mlp_bias", config.get("mlp_bias", False), False),
        ("use_sliding_window", config.get("use_sliding_window", False), False),
    ]
    if config.get("model_type") == "qwen2_moe":
        checks.append(("qkv_bias", config.get("qkv_bias", True), False))  # Qwen2MoeConfig's default is True
    for key, value, want in checks:
        if value != want:
            problems.append(f"{key}={value!r} is not supported (only {want!r})")
    if config.get("model_type") == "glm4_moe":
        problems += _glm4_moe_problems(config)
    if config.get("model_type") == "qwen2_moe":
        f, shared = int(config.get("moe_intermediate_size", 0)), int(config.get("shared_expert_intermediate_size", 0))
        if shared and (not f or shared % f):
            problems.append(
                f"shared_expert_intermediate_size={shared} is not a multiple of moe_intermediate_size={f} "
                f"(our shared experts are K_s experts of the routed experts' width)"
            )
        moe = moe_layers_of(config)
        if moe and layer_pattern(moe, int(config["num_hidden_layers"])) is None:
            problems.append(
                f"MoE layers {moe} do not follow our rule (MoE iff l >= first_k_dense and l % moe_layer_freq == 0)"
            )
    if problems:
        raise LayoutError("config.json cannot be imported: " + "; ".join(problems))


def _glm4_moe_problems(config: Mapping[str, Any]) -> list[str]:
    """What of a Glm4Moe config.json our model cannot express (its router is DeepSeek-V3's, which ours has)."""
    problems = []
    rope = config.get("rope_parameters") or {}
    partial = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5)))
    if partial != 1.0:
        problems.append(
            f"partial_rotary_factor={partial} is not supported (our RoPE rotates every dimension of a head: only 1.0)"
        )
    if config.get("use_qk_norm", False):
        problems.append("use_qk_norm=True is not supported (our attention has no q/k RMSNorm)")
    experts, groups = int(config.get("n_routed_experts", 0)), int(config.get("n_group", 1))
    if experts and (groups < 1 or experts % groups or not 1 <= int(config.get("topk_group", 1)) <= groups):
        problems.append(
            f"n_group={groups} / topk_group={config.get('topk_group')} do not group the {experts} routed experts"
        )
    return problems


def _glm4_moe_bindings(config: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """The router bindings of a Glm4Moe config.json: DeepSeek-V3's (sigmoid scores, the selection bias, groups).

    Glm4Moe always has the bias: it is imported as `selection_bias` (a zero bias routes as none) unless our
    own export's "moe_jax" block says the model had none. Its update speed comes from that block, else 0:
    the bias stays as trained until a run binds MoEConfig.bias_update_speed (V3: 0.001). Likewise the
    expert-level balance loss is off (V3's is a tiny sequence-wise one) unless the block sets it.
    """
    groups = int(config.get("n_group", 1))
    out = [
        "MoEConfig.router_score='sigmoid'",
        f"MoEConfig.renormalize_topk={bool(config.get('norm_topk_prob', True))}",
        f"MoEConfig.routed_scaling_factor={float(config.get('routed_scaling_factor', 1.0))!r}",
        f"MoEConfig.selection_bias={bool(ours.get('selection_bias', True))}",
        f"MoEConfig.bias_update_speed={float(ours.get('bias_update_speed', 0.0))!r}",
        f"MoEConfig.expert_balance_alpha={float(ours.get('expert_balance_alpha', 0.0))!r}",
    ]
    if groups > 1:
        out += [
            f"MoEConfig.topk_groups={int(config.get('topk_group', 1))}",
            f"MoEConfig.num_expert_groups={groups}",
            "MoEConfig.group_score='top2_sum'",
        ]
    return out


def gin_from_transformers_config(config: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(architecture gin file, bindings) that make `ModelConfig()` the model of a Qwen2Moe/Glm4Moe/Llama
    config.json."""
    check_transformers_config(config)
    ours = dict(config.get("moe_jax") or {})
    layers = int(config["num_hidden_layers"])
    head_dim = config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"])
    bindings = trunk_bindings(config, head_dim=head_dim, rope_theta=rope_theta_of(config))
    moe = moe_layers_of(config)
    if not moe:
        return "architectures/dense.gin", bindings
    first_k, freq = layer_pattern(moe, layers)
    f = int(config["moe_intermediate_size"])
    if config.get("model_type") == "glm4_moe":
        bindings += [
            f"FIRST_K_DENSE={first_k}",
            "ModelConfig.moe_layer_freq=1",
            f"NUM_EXPERTS={int(config['n_routed_experts'])}",
            f"NUM_SHARED={int(config.get('n_shared_experts', 1))}",
            f"EXPERT_DIM={f}",
            f"TOP_K={int(config['num_experts_per_tok'])}",
            *_glm4_moe_bindings(config, ours),
        ]
        return "architectures/moe.gin", bindings + moe_jax_bindings(ours)
    bindings += [
        f"FIRST_K_DENSE={first_k}",
        f"ModelConfig.moe_layer_freq={freq}",
        f"NUM_EXPERTS={int(config['num_experts'])}",
        f"NUM_SHARED={int(config.get('shared_expert_intermediate_size', 0)) // f}",
        f"EXPERT_DIM={f}",
        f"TOP_K={int(config['num_experts_per_tok'])}",
        f"MoEConfig.renormalize_topk={bool(config.get('norm_topk_prob', False))}",
        f"MoEConfig.expert_balance_alpha={float(config.get('router_aux_loss_coef', 0.001))!r}",
    ]
    return "architectures/moe.gin", bindings + moe_jax_bindings(ours)

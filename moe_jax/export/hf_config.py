"""`config.json` of DeepSeek's HF layout (`model_type: "deepseek"`) <-> our gin bindings.

Keys and defaults follow DeepSeekMoE 16B's `config.json` and `DeepseekConfig` (docs/paper.md §3.2). What the
HF config cannot say but a round trip needs (our head_dim, parameter dtype, training-only MoE settings,
the checkpoint step) goes under the extra key `"moe_jax"`, which HF's `PretrainedConfig` keeps as an
ordinary attribute and otherwise ignores.
"""

from __future__ import annotations

from typing import Any, Mapping

from moe_jax.config import ModelConfig
from moe_jax.export.layout import LayoutError, check_exportable

MODEL_TYPE = "deepseek"
ARCHITECTURE = "DeepseekForCausalLM"
# DeepSeek's remote code (configuration_deepseek.py / modeling_deepseek.py of deepseek-moe-16b-base);
# it is not shipped here: copy the two files next to config.json to load with trust_remote_code=True.
AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekConfig",
    "AutoModel": "modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
}

# DeepseekConfig's defaults for keys a config.json may omit.
HF_DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": None,
    "n_shared_experts": None,
    "n_routed_experts": None,
    "num_experts_per_tok": None,
    "moe_intermediate_size": 1407,
    "first_k_dense_replace": 0,
    "moe_layer_freq": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "tie_word_embeddings": False,
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def trunk_keys(cfg: ModelConfig) -> dict:
    """config.json's trunk sizes, which DeepseekConfig, Qwen2MoeConfig and LlamaConfig name alike
    (multi-head attention: as many key/value heads as heads)."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
    }


def trunk_bindings(config: Mapping[str, Any], *, head_dim: int, rope_theta: float) -> list[str]:
    """The gin bindings of the trunk of a config.json of any of the three layouts (init_std and param_dtype
    from its "moe_jax" block when present); `head_dim` and `rope_theta` as the layout states them."""
    ours = config.get("moe_jax") or {}
    return [
        f"VOCAB_SIZE={int(config['vocab_size'])}",
        f"D_MODEL={int(config['hidden_size'])}",
        f"NUM_LAYERS={int(config['num_hidden_layers'])}",
        f"NUM_HEADS={int(config['num_attention_heads'])}",
        f"HEAD_DIM={int(head_dim)}",
        f"FFN_DIM={int(config['intermediate_size'])}",
        f"INIT_STD={float(ours.get('init_std', config.get('initializer_range', 0.02)))!r}",
        f"ROPE_THETA={float(rope_theta)!r}",
        f"NORM_EPS={float(config.get('rms_norm_eps', 1e-6))!r}",
        f"ModelConfig.param_dtype='{ours.get('param_dtype', 'float32')}'",
    ]


def to_hf_config(
    cfg: ModelConfig,
    *,
    torch_dtype: str,
    max_position_embeddings: int,
    bos_token_id: int | None,
    eos_token_id: int | None,
    pad_token_id: int | None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """config.json for `cfg` (which must pass `check_exportable`).

    A dense model becomes all-dense layers (`n_routed_experts: null`); a MoE without shared experts
    (GShard, Switch) has `n_shared_experts: null` (DeepSeek's code builds shared experts iff it is set).
    """
    check_exportable(cfg)
    m = cfg.moe
    moe_keys: dict[str, Any]
    if m is None:
        moe_keys = dict(
            n_routed_experts=None,
            n_shared_experts=None,
            num_experts_per_tok=None,
            moe_intermediate_size=None,
            first_k_dense_replace=cfg.num_layers,
            norm_topk_prob=False,
            aux_loss_alpha=0.0,
            seq_aux=True,
        )
    else:
        moe_keys = dict(
            n_routed_experts=m.num_experts,
            n_shared_experts=m.num_shared_experts or None,
            num_experts_per_tok=m.top_k,
            moe_intermediate_size=m.expert_dim,
            first_k_dense_replace=cfg.first_k_dense,
            norm_topk_prob=m.renormalize_topk,
            aux_loss_alpha=m.expert_balance_alpha,
            seq_aux=m.balance_loss_scope == "sequence",
        )
    ours = moe_jax_block(cfg, extra)
    return {
        "architectures": [ARCHITECTURE],
        "auto_map": AUTO_MAP,
        "model_type": MODEL_TYPE,
        **trunk_keys(cfg),
        **moe_keys,
        "moe_layer_freq": cfg.moe_layer_freq,
        "scoring_func": "softmax",
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "use_cache": True,
        "tie_word_embeddings": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": torch_dtype,
        "moe_jax": ours,
    }


def moe_jax_block(cfg: ModelConfig, extra: Mapping[str, Any] | None = None) -> dict:
    """config.json's "moe_jax" block: what an HF config cannot say but a round trip needs."""
    ours = dict(head_dim=cfg.head_dim, param_dtype=cfg.param_dtype, init_std=cfg.init_std)
    m = cfg.moe
    if m is not None:
        ours.update(
            second_expert_policy=m.second_expert_policy,
            device_balance_alpha=m.device_balance_alpha,
            num_device_groups=m.num_device_groups,
            router_z_loss_alpha=m.router_z_loss_alpha,
            dispatch=m.dispatch,
            capacity_factor=m.capacity_factor,
            balance_loss_scope=m.balance_loss_scope,
            expert_balance_alpha=m.expert_balance_alpha,
            selection_bias=m.selection_bias,
            bias_update_speed=m.bias_update_speed,
            comm_balance_alpha=m.comm_balance_alpha,
        )
    ours.update(extra or {})
    return ours


def moe_jax_bindings(ours: Mapping[str, Any]) -> list[str]:
    """Gin bindings restoring the MoE settings of a "moe_jax" block (those present)."""
    out = []
    if "second_expert_policy" in ours:
        out.append(f"SECOND_EXPERT_POLICY='{ours['second_expert_policy']}'")
    for key in (
        "device_balance_alpha",
        "router_z_loss_alpha",
        "capacity_factor",
        "expert_balance_alpha",
        "bias_update_speed",
        "comm_balance_alpha",
    ):
        if key in ours:
            out.append(f"MoEConfig.{key}={float(ours[key])!r}")
    if "num_device_groups" in ours:
        out.append(f"MoEConfig.num_device_groups={int(ours['num_device_groups'])}")
    if "selection_bias" in ours:
        out.append(f"MoEConfig.selection_bias={bool(ours['selection_bias'])}")
    for key in ("dispatch", "balance_loss_scope"):
        if key in ours:
            out.append(f"MoEConfig.{key}='{ours[key]}'")
    return out


def _get(config: Mapping[str, Any], key: str):
    return config[key] if key in config else HF_DEFAULTS.get(key)


def check_hf_config(config: Mapping[str, Any]) -> None:
    """Raise LayoutError naming every key of `config` our model cannot express."""
    problems = []
    if config.get("model_type") != MODEL_TYPE:
        problems.append(
            f"model_type is {config.get('model_type')!r}, expected {MODEL_TYPE!r} (DeepSeekMoE, DeepseekForCausalLM)"
        )
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        problems.append(f"missing keys {missing}")
    if not problems:
        heads = config["num_attention_heads"]
        kv = _get(config, "num_key_value_heads") or heads
        if kv != heads:
            problems.append(
                f"num_key_value_heads={kv} != num_attention_heads={heads}: grouped-query attention is "
                f"not supported (our attention is multi-head)"
            )
        if config["hidden_size"] % heads:
            problems.append(f"hidden_size={config['hidden_size']} is not divisible by num_attention_heads={heads}")
        for key, want in (
            ("scoring_func", "softmax"),
            ("hidden_act", "silu"),
            ("rope_scaling", None),
            ("attention_bias", False),
            ("tie_word_embeddings", False),
        ):
            if _get(config, key) != want:
                problems.append(f"{key}={_get(config, key)!r} is not supported (only {want!r})")
        if _get(config, "n_routed_experts") is not None and _get(config, "num_experts_per_tok") is None:
            problems.append("n_routed_experts is set but num_experts_per_tok is not")
    if problems:
        raise LayoutError("config.json cannot be imported: " + "; ".join(problems))


def head_dim_of(config: Mapping[str, Any]) -> int:
    return int(config["hidden_size"]) // int(config["num_attention_heads"])


def gin_from_hf_config(config: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(architecture gin file, bindings) that make `ModelConfig()` the model of `config`.

    The bindings set the macros of gin/architectures/{decoder,moe}.gin and, where a config key has
    no macro, the configurable's parameter; our extra `moe_jax` settings (if present) are restored.
    """
    check_hf_config(config)
    ours = dict(config.get("moe_jax") or {})
    layers = int(config["num_hidden_layers"])
    routed = _get(config, "n_routed_experts")
    first_k = int(_get(config, "first_k_dense_replace") or 0)
    is_moe = routed is not None and int(routed) > 0 and first_k < layers
    bindings = trunk_bindings(config, head_dim=head_dim_of(config), rope_theta=_get(config, "rope_theta"))
    if not is_moe:
        return "architectures/dense.gin", bindings
    bindings += [
        f"FIRST_K_DENSE={first_k}",
        f"ModelConfig.moe_layer_freq={int(_get(config, 'moe_layer_freq'))}",
        f"NUM_EXPERTS={int(routed)}",
        f"NUM_SHARED={int(_get(config, 'n_shared_experts') or 0)}",
        f"EXPERT_DIM={int(_get(config, 'moe_intermediate_size'))}",
        f"TOP_K={int(_get(config, 'num_experts_per_tok'))}",
        f"MoEConfig.renormalize_topk={bool(_get(config, 'norm_topk_prob'))}",
        f"MoEConfig.expert_balance_alpha={float(_get(config, 'aux_loss_alpha'))!r}",
        f"MoEConfig.balance_loss_scope='{'sequence' if _get(config, 'seq_aux') else 'global'}'",
    ]
    return "architectures/moe.gin", bindings + moe_jax_bindings(ours)

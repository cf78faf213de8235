"""THE tables between our parameter tree and the Hugging Face layouts: DeepSeek's `DeepseekForCausalLM`
(`DEEPSEEK`, remote code) and transformers' native `Qwen2MoeForCausalLM` (`QWEN2_MOE`),
`Glm4MoeForCausalLM` (`GLM4_MOE`: DeepSeek-V3's sigmoid router, selection bias and group-limited
routing over standard attention) and `LlamaForCausalLM` (`LLAMA`). They share most rows (same tensor
names); a `Layout` lists which rows a layer of each kind gets.

Export (`moe_jax.export.hf.export_hf`) and import (`import_hf`) both read these tables; nothing else
knows a Hugging Face name. Each `Rule` says which of our arrays one HF tensor is cut from and how:

    Rule("ffn.wi", "model.layers.{l}.mlp.experts.{e}.gate_proj.weight", "[l] [e] d [0] f -> f d")

The spec string is a tiny einops-like language over the axes of *our* array (left) and the HF tensor
(right):
  - `[l]`, `[e]`: an axis indexed by a loop variable (`l`: the layer's position in its `LayerStack`,
    `e`: the routed expert). In the HF name, `{l}` is the *global* layer index and `{e}` the expert.
  - `[0]`, `[1]`: an axis indexed by a literal (our fused SwiGLU input kernel `wi [.., 2, f]` holds
    the gate projection at 0 and the up projection at 1).
  - a name (`d`, `h`, `k`, `f`, ...): an axis kept; the right side lists the kept axes in HF order,
    parentheses flatten several into one (`(h k)`: heads x head_dim, head-major).
HF `nn.Linear` weights are [out, in]; ours are [in, out], hence the transposes. RoPE needs no
permutation of q/k: both sides use the rotate-half convention with inv_freq = theta^(-2i/Dh).

Our arrays live at `embed`, `final_norm.scale`, `lm_head` and, per run of same-kind layers
(`ModelConfig.layer_segments()`), under `stacks.{s}.blocks.` with a leading layer axis. DeepSeek-V3's
selection bias (`RouterBias`, at `stacks.{s}.blocks.ffn.router.bias`) is not a parameter but a path of
the same tree: `flat_model_shapes` lists it with the parameters.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

import numpy as np

from moe_jax.config import ModelConfig


class LayoutError(ValueError):
    """A model the HF layout cannot express, or arrays that do not match the layout."""


_TOKEN = re.compile(r"\[([A-Za-z_]\w*|\d+)\]|\(([^()]*)\)|([A-Za-z_]\w*)")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """How an HF tensor is cut from one of our arrays, e.g. "[l] [e] d [0] f -> f d".

    Attributes:
      text: the spec as written.
      picks: per axis of our array, the loop variable name ("l", "e") or literal int indexing it, or
        None where the axis is kept.
      names: names of the kept axes, in our axis order.
      groups: the HF tensor's axes, each a tuple of kept-axis names flattened into it (row-major).
    """

    text: str
    picks: tuple[str | int | None, ...]
    names: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]

    @classmethod
    def parse(cls, text: str) -> "TensorSpec":
        left, arrow, right = text.partition("->")
        if not arrow:
            raise ValueError(f"tensor spec {text!r} has no '->'")
        picks, names = [], []
        for m in _TOKEN.finditer(left):
            index, group, name = m.groups()
            if group is not None:
                raise ValueError(f"tensor spec {text!r}: groups are only allowed on the right")
            if index is not None:
                picks.append(int(index) if index.isdigit() else index)
            else:
                picks.append(None)
                names.append(name)
        groups = []
        for m in _TOKEN.finditer(right):
            index, group, name = m.groups()
            if index is not None:
                raise ValueError(f"tensor spec {text!r}: indices are only allowed on the left")
            groups.append(tuple(group.split()) if group is not None else (name,))
        flat = [n for g in groups for n in g]
        if sorted(flat) != sorted(names) or len(set(names)) != len(names):
            raise ValueError(f"tensor spec {text!r}: the right side must use each kept axis exactly once")
        return cls(text=text, picks=tuple(picks), names=tuple(names), groups=tuple(groups))

    @property
    def kept_axes(self) -> tuple[int, ...]:
        """Axes of our array the HF tensor keeps (the others are indexed)."""
        return tuple(i for i, p in enumerate(self.picks) if p is None)

    def index(self, **loop_vars: int) -> tuple[int | slice, ...]:
        """Index into our array: loop variables and literals as ints, kept axes as `slice(None)`."""
        return tuple(slice(None) if p is None else (p if isinstance(p, int) else loop_vars[p]) for p in self.picks)

    def axis_sizes(self, our_shape: tuple[int, ...]) -> dict[str, int]:
        """{kept axis name: size} for our array's shape."""
        if len(our_shape) != len(self.picks):
            raise LayoutError(
                f"array of shape {tuple(our_shape)} does not have the {len(self.picks)} axes of spec {self.text!r}"
            )
        return dict(zip(self.names, (n for p, n in zip(self.picks, our_shape) if p is None)))

    @property
    def flat_names(self) -> tuple[str, ...]:
        """Kept axis names in HF order, before flattening the groups."""
        return tuple(n for g in self.groups for n in g)

    def hf_shape(self, our_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor's shape, from our array's shape."""
        sizes = self.axis_sizes(our_shape)
        return tuple(math.prod(sizes[n] for n in g) for g in self.groups)

    def hf_view_shape(self, our_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor's shape with its groups unflattened (q_proj [H*Dh, d] -> [H, Dh, d])."""
        sizes = self.axis_sizes(our_shape)
        return tuple(sizes[n] for n in self.flat_names)

    def to_hf_view(self, piece: np.ndarray) -> np.ndarray:
        """A piece over the kept axes (our order) -> the same values in HF axis order, groups unflattened
        (a transpose; works on any sub-block of the kept axes)."""
        return np.transpose(piece, [self.names.index(n) for n in self.flat_names])

    def to_hf(self, piece: np.ndarray) -> np.ndarray:
        """our_array[self.index(...)] (kept axes, our order) -> the HF tensor (C-contiguous)."""
        sizes = dict(zip(self.names, piece.shape))
        moved = np.ascontiguousarray(self.to_hf_view(piece))
        return moved.reshape([math.prod(sizes[n] for n in g) for g in self.groups])

    def from_hf(self, tensor: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
        """The inverse of `to_hf`: the HF tensor -> the piece to assign at our_array[self.index(...)]."""
        flat = self.flat_names
        unflat = tensor.reshape(self.hf_view_shape(our_shape))
        return np.transpose(unflat, [flat.index(n) for n in self.names])


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a table: HF tensor `hf` (a name template) is `scale` x `spec` applied to our array `ours`.

    `ours` is a dotted path: top-level (`embed`) for global rules, relative to a layer stack's
    `blocks` (`attn.wq`) for per-layer rules. `scale` is a power of two (exact in any float format):
    export multiplies by it, import divides.
    """

    ours: str
    hf: str
    spec: TensorSpec
    scale: float = 1.0

    @classmethod
    def of(cls, ours: str, hf: str, spec: str, scale: float = 1.0) -> "Rule":
        return cls(ours=ours, hf=hf, spec=TensorSpec.parse(spec), scale=scale)


@dataclasses.dataclass(frozen=True)
class Const:
    """An HF tensor with no counterpart among our arrays: export writes `value` everywhere; import checks
    it holds `value` when `checked` (else the tensor only has to be present with its shape).

    `shape` names its axes: "d" (d_model), "s" (the layer's shared-expert width K_s * f), "n" (the routed
    experts) or ints.
    """

    hf: str
    shape: tuple[str | int, ...]
    value: float = 0.0
    checked: bool = True

    def shape_for(self, cfg: ModelConfig) -> tuple[int, ...]:
        m = cfg.moe
        sizes = {"d": cfg.d_model, "s": m.num_shared_experts * m.expert_dim if m else 0, "n": m.num_experts if m else 0}
        return tuple(sizes[a] if isinstance(a, str) else a for a in self.shape)


R = Rule.of


def _mlp_rules(ours: str, hf: str, lead: str = "[l]", down_scale: float = 1.0) -> tuple[Rule, ...]:
    """The rows of one SwiGLU MLP: our `{ours}.wi` [.., d, 2, f] (0 = gate, 1 = up) and `{ours}.wo` [.., f, d]
    are HF's `{hf}.gate_proj`, `{hf}.up_proj` and `{hf}.down_proj` (the latter times `down_scale`).
    `lead`: the spec of our leading axes (the layer, and the expert for routed experts)."""
    return (
        R(f"{ours}.wi", f"{hf}.gate_proj.weight", f"{lead} d [0] f -> f d"),
        R(f"{ours}.wi", f"{hf}.up_proj.weight", f"{lead} d [1] f -> f d"),
        R(f"{ours}.wo", f"{hf}.down_proj.weight", f"{lead} f d -> d f", scale=down_scale),
    )


# Model-level tensors (every format).
GLOBAL_RULES = (
    R("embed", "model.embed_tokens.weight", "v d -> v d"),
    R("final_norm.scale", "model.norm.weight", "d -> d"),
    R("lm_head", "lm_head.weight", "d v -> v d"),
)
# Every decoder layer: norms and attention. Our q/k/v are [d, H, Dh], o is [H, Dh, d].
LAYER_RULES = (
    R("attn_norm.scale", "model.layers.{l}.input_layernorm.weight", "[l] d -> d"),
    R("attn.wq", "model.layers.{l}.self_attn.q_proj.weight", "[l] d h k -> (h k) d"),
    R("attn.wk", "model.layers.{l}.self_attn.k_proj.weight", "[l] d h k -> (h k) d"),
    R("attn.wv", "model.layers.{l}.self_attn.v_proj.weight", "[l] d h k -> (h k) d"),
    R("attn.wo", "model.layers.{l}.self_attn.o_proj.weight", "[l] h k d -> d (h k)"),
    R("ffn_norm.scale", "model.layers.{l}.post_attention_layernorm.weight", "[l] d -> d"),
)
# Dense FFN layers (l < first_k_dense_replace, or off the moe_layer_freq grid): an MLP of width
# intermediate_size. Ours: wi [d, 2, F] (0 = gate, 1 = up), wo [F, d].
DENSE_FFN_RULES = _mlp_rules("ffn", "model.layers.{l}.mlp")
# MoE layers: the router weight [E, d] (ours [d, E]) ...
ROUTER_RULES = (
    R("ffn.router.kernel", "model.layers.{l}.mlp.gate.weight", "[l] d n -> n d"),  # n: routed experts
)
# ... routed experts, stacked [E, d, 2, f] / [E, f, d] here, one MLP per expert there ...
ROUTED_EXPERT_RULES = _mlp_rules("ffn", "model.layers.{l}.mlp.experts.{e}", lead="[l] [e]")
# ... and the shared experts: one MLP of width n_shared_experts * moe_intermediate_size on both sides.
SHARED_EXPERT_RULES = _mlp_rules("ffn.shared", "model.layers.{l}.mlp.shared_experts")
# Qwen2MoeSparseMoeBlock: one shared expert of width shared_expert_intermediate_size whose output is
# multiplied by sigmoid(shared_expert_gate(x)). A zero gate weight fixes that factor at 1/2, which the
# down projection scaled by exactly 2 undoes (both powers of two: bitwise in float32 and bfloat16).
QWEN2_MOE_SHARED_RULES = (
    *_mlp_rules("ffn.shared", "model.layers.{l}.mlp.shared_expert", down_scale=2.0),
    Const("model.layers.{l}.mlp.shared_expert_gate.weight", (1, "d"), 0.0, checked=True),
)
# Qwen2MoeSparseMoeBlock always has a shared expert: without shared experts (GShard, Switch) it has
# width 0 (empty tensors, output 0) and its gate is irrelevant (any value is accepted on import).
QWEN2_MOE_NO_SHARED = (
    Const("model.layers.{l}.mlp.shared_expert.gate_proj.weight", (0, "d")),
    Const("model.layers.{l}.mlp.shared_expert.up_proj.weight", (0, "d")),
    Const("model.layers.{l}.mlp.shared_expert.down_proj.weight", ("d", 0)),
    Const("model.layers.{l}.mlp.shared_expert_gate.weight", (1, "d"), 0.0, checked=False),
)
# Dense-xN MoE layers (shared experts only, no router) are a dense MLP of width K_s * f.
SHARED_AS_DENSE_RULES = _mlp_rules("ffn.shared", "model.layers.{l}.mlp")
# Glm4MoeMoE always has `shared_experts`, an MLP of width n_shared_experts * moe_intermediate_size: width 0
# (empty tensors, output 0) without shared experts.
GLM4_MOE_NO_SHARED = (
    Const("model.layers.{l}.mlp.shared_experts.gate_proj.weight", (0, "d")),
    Const("model.layers.{l}.mlp.shared_experts.up_proj.weight", (0, "d")),
    Const("model.layers.{l}.mlp.shared_experts.down_proj.weight", ("d", 0)),
)
# Glm4MoeTopkRouter always has DeepSeek-V3's selection bias b_i [E] (`e_score_correction_bias`): our
# `RouterBias` when `MoEConfig.selection_bias`, else zeros (a zero bias selects as no bias does).
SELECTION_BIAS_RULES = (R("ffn.router.bias", "model.layers.{l}.mlp.gate.e_score_correction_bias", "[l] n -> n"),)
NO_SELECTION_BIAS = (Const("model.layers.{l}.mlp.gate.e_score_correction_bias", ("n",), 0.0, checked=True),)


@dataclasses.dataclass(frozen=True)
class Layout:
    """One Hugging Face architecture's tensor table.

    Attributes:
      name: "deepseek", "qwen2_moe", "glm4_moe" or "llama" (config.json's model_type).
      architecture: the class transformers instantiates (config.json `architectures`).
      moe: rows of a MoE layer with a router (after LAYER_RULES) when it has shared experts / has none.
        None: the architecture has no routed MoE layer.
      shared_only: rows of a MoE layer without routed experts (Dense-xN), or None if not expressible.
      bias, no_bias: rows a routed MoE layer adds for DeepSeek-V3's selection bias, with
        `MoEConfig.selection_bias` / without; None where the architecture has no such tensor.
    """

    name: str
    architecture: str
    moe_shared: tuple | None
    moe_unshared: tuple | None
    shared_only: tuple | None
    bias: tuple | None = None
    no_bias: tuple | None = None

    def rows(self) -> tuple:
        """Every distinct row (for docs/export.md)."""
        out = GLOBAL_RULES + LAYER_RULES + DENSE_FFN_RULES
        for group in (self.moe_shared, self.moe_unshared, self.shared_only, self.bias, self.no_bias):
            out += tuple(r for r in group or () if r not in out)
        return out


DEEPSEEK = Layout(
    "deepseek",
    "DeepseekForCausalLM",
    moe_shared=ROUTER_RULES + ROUTED_EXPERT_RULES + SHARED_EXPERT_RULES,
    moe_unshared=ROUTER_RULES + ROUTED_EXPERT_RULES,
    shared_only=None,
)
QWEN2_MOE = Layout(
    "qwen2_moe",
    "Qwen2MoeForCausalLM",
    moe_shared=ROUTER_RULES + ROUTED_EXPERT_RULES + QWEN2_MOE_SHARED_RULES,
    moe_unshared=ROUTER_RULES + ROUTED_EXPERT_RULES + QWEN2_MOE_NO_SHARED,
    shared_only=None,
)
GLM4_MOE = Layout(
    "glm4_moe",
    "Glm4MoeForCausalLM",
    moe_shared=ROUTER_RULES + ROUTED_EXPERT_RULES + SHARED_EXPERT_RULES,
    moe_unshared=ROUTER_RULES + ROUTED_EXPERT_RULES + GLM4_MOE_NO_SHARED,
    shared_only=None,
    bias=SELECTION_BIAS_RULES,
    no_bias=NO_SELECTION_BIAS,
)
LLAMA = Layout("llama", "LlamaForCausalLM", moe_shared=None, moe_unshared=None, shared_only=SHARED_AS_DENSE_RULES)
LAYOUTS = {lay.name: lay for lay in (DEEPSEEK, QWEN2_MOE, GLM4_MOE, LLAMA)}
ALL_RULES = DEEPSEEK.rows()


def transformers_layout(cfg: ModelConfig) -> Layout:
    """The native transformers architecture of a model: Llama for dense (and Dense-xN) models, Glm4Moe for
    sigmoid-scored MoE models (DeepSeek-V3's router), Qwen2Moe for softmax-routed ones."""
    if cfg.moe is None or cfg.moe.num_experts == 0:
        return LLAMA
    return GLM4_MOE if cfg.moe.router_score == "sigmoid" else QWEN2_MOE


def check_exportable(cfg: ModelConfig, lay: Layout = DEEPSEEK) -> None:
    """Raise LayoutError (saying why and what to do) for models `lay` cannot express."""
    m = cfg.moe
    if m is not None and m.router == "expert_choice":
        raise LayoutError(
            "expert-choice routing (router='expert_choice', arXiv:2202.09368: each expert picks its top-C "
            "tokens) has no equivalent in DeepSeek's V1 layout nor in transformers' Qwen2Moe or Glm4Moe, whose "
            "routers give every token its top-k experts: the exported model would compute different logits. "
            "Export refuses expert-choice models; keep the workdir's orbax checkpoint"
        )
    if lay is GLM4_MOE:
        _check_glm4_moe(cfg)
    elif m is not None:
        _check_softmax_router(m)
    if lay is DEEPSEEK:
        return _check_deepseek(cfg)
    fix = (
        "Bind MoEConfig.dispatch='dropless' if the model should run dropless."
        if lay is GLM4_MOE
        else "Export it with --format=hf (DeepSeek's layout, loaded with DeepSeek's remote code) instead. (Or "
        "bind MoEConfig.dispatch='dropless' if the model should run dropless.)"
    )
    if m is not None and m.router == "hash":
        raise LayoutError(
            "hash-routed MoE layers (router='hash') have no native transformers equivalent (Qwen2Moe's "
            "router is a learned softmax over the routed experts): Hash models cannot be exported to "
            "--format=transformers (nor to DeepSeek's layout); keep the workdir's orbax checkpoint"
        )
    if m is not None and m.dispatch == "capacity":
        raise LayoutError(
            f"dispatch='capacity' drops tokens over an expert's capacity; transformers' {lay.architecture} is "
            f"dropless, so its logits would differ. " + fix
        )
    if m is not None and (m.disable_top_experts or m.disable_shared):
        raise LayoutError(
            f"MoEConfig.disable_top_experts={m.disable_top_experts} / disable_shared={m.disable_shared} "
            f"are inference-time analyses with no transformers equivalent; unbind them to export"
        )
    if lay is LLAMA and m is not None:
        width = m.num_shared_experts * m.expert_dim
        dense = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
        if dense and width != cfg.ffn_dim:
            raise LayoutError(
                f"a Dense-x{m.num_shared_experts} model (shared experts only) is a LlamaForCausalLM "
                f"only when every FFN has one width; its dense layers {dense} have ffn_dim="
                f"{cfg.ffn_dim}, its MoE layers {m.num_shared_experts} x {m.expert_dim} = {width} "
                f"(DeepSeek's layout refuses Dense-xN models too); bind FFN_DIM={width} or "
                f"FIRST_K_DENSE=0 for a model that exports"
            )


def _check_softmax_router(m) -> None:
    """DeepSeek's V1 layout and Qwen2Moe: a softmax router over every routed expert, raw or renormalised
    gates, no selection bias, no groups, no routed scaling."""
    if m.router_score == "sigmoid":
        instead = (
            "Export it with --format=transformers, which writes sigmoid-scored models as transformers' "
            "Glm4MoeForCausalLM (DeepSeek-V3's router)"
        )
    else:
        instead = (
            "Glm4MoeForCausalLM has it only with sigmoid scores (MoEConfig.router_score='sigmoid'), so no "
            "exported architecture holds this softmax model: keep the workdir's orbax checkpoint"
        )
    if m.selection_bias:
        raise LayoutError(
            "selection_bias=True (DeepSeek-V3's auxiliary-loss-free balancing) chooses experts by their scores plus "
            "a trained per-expert bias; DeepSeek's V1 layout (DeepseekForCausalLM) and transformers' Qwen2Moe have "
            f"no such bias: the exported model would route differently. {instead}"
        )
    if m.router_score == "sigmoid" or m.routed_scaling_factor != 1.0:
        raise LayoutError(
            f"router_score={m.router_score!r} / routed_scaling_factor={m.routed_scaling_factor} (DeepSeek-V3 "
            "gating) have no equivalent in DeepSeek's V1 layout (DeepseekForCausalLM: softmax gate, no routed "
            "scaling) nor in transformers' Qwen2Moe: the exported model would compute different logits. "
            f"{instead}"
        )
    if m.topk_groups:
        raise LayoutError(
            f"group-limited routing (MoEConfig.topk_groups={m.topk_groups}, num_expert_groups="
            f"{m.num_expert_groups}: DeepSeek-V2/V3's device-/node-limited routing) has no equivalent in "
            "DeepSeek's V1 layout (DeepseekForCausalLM: top-k over all routed experts) nor in transformers' "
            f"Qwen2Moe: the exported model would route differently. {instead}"
        )


def _check_glm4_moe(cfg: ModelConfig) -> None:
    """Glm4MoeForCausalLM: DeepSeek-V3's router (sigmoid scores, top-k of scores + bias inside the top
    `topk_group` of `n_group` groups scored by their top-2 sum, `norm_topk_prob`, `routed_scaling_factor`),
    dense layers first, then every layer MoE."""
    m = cfg.moe
    if m.router != "softmax" or m.router_score != "sigmoid":
        raise LayoutError(
            f"Glm4MoeForCausalLM's router scores experts with a sigmoid; this model has router={m.router!r}, "
            f"router_score={m.router_score!r}"
        )
    if m.topk_groups and m.group_score != "top2_sum":
        raise LayoutError(
            f"group_score={m.group_score!r}: Glm4MoeForCausalLM scores a group by the sum of its two highest "
            "scores (DeepSeek-V3, group_score='top2_sum'); DeepSeek-V2's 'max' has no transformers equivalent. "
            "Export refuses it; keep the workdir's orbax checkpoint"
        )
    if m.topk_groups and not m.num_expert_groups:
        raise LayoutError(
            f"topk_groups={m.topk_groups} with num_expert_groups=0 groups the experts by the mesh's expert axis, "
            "which an exported model does not have: bind MoEConfig.num_expert_groups to the G the model was "
            "trained with (the expert-parallel size of its mesh) to export it"
        )
    per_group = m.num_experts // (m.num_expert_groups if m.topk_groups else 1)
    if per_group < 2:
        raise LayoutError(
            f"{per_group} routed expert(s) per group: Glm4MoeForCausalLM scores groups by their top-2 sum and "
            f"needs at least 2"
        )
    moe = [cfg.is_moe_layer(i) for i in range(cfg.num_layers)]
    k = moe.index(True) if True in moe else cfg.num_layers
    if moe != [i >= k for i in range(cfg.num_layers)]:
        raise LayoutError(
            f"MoE layers {[i for i, x in enumerate(moe) if x]}: Glm4MoeForCausalLM makes every layer from "
            f"first_k_dense_replace on a MoE layer; bind ModelConfig.moe_layer_freq=1 for a model that exports"
        )


def _check_deepseek(cfg: ModelConfig) -> None:
    if cfg.num_heads * cfg.head_dim != cfg.d_model:
        raise LayoutError(
            f"num_heads * head_dim = {cfg.num_heads} * {cfg.head_dim} = {cfg.num_heads * cfg.head_dim} differs from "
            f"d_model = {cfg.d_model}; DeepSeek's HF code derives head_dim = hidden_size / num_attention_heads, so "
            f"this model has no DeepseekForCausalLM equivalent (--format=transformers has a free head_dim)"
        )
    m = cfg.moe
    if m is None:
        return
    if m.router == "hash":
        raise LayoutError(
            "hash-routed MoE layers (router='hash') have no DeepseekForCausalLM equivalent: its "
            "MoEGate is a learned softmax over the routed experts. Export refuses Hash models."
        )
    if m.num_experts == 0:
        raise LayoutError(
            f"MoE layers without routed experts (Dense x{m.num_shared_experts}: only "
            f"{m.num_shared_experts} shared experts) have no DeepseekForCausalLM equivalent (its MoE "
            f"layer always has a gate over n_routed_experts). Export refuses Dense-xN models "
            f"(--format=transformers writes them as LlamaForCausalLM)."
        )


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One HF tensor of a concrete model.

    Attributes:
      hf_name: e.g. "model.layers.3.mlp.experts.17.up_proj.weight".
      hf_shape: its shape.
      ours: dotted path of our array, e.g. "stacks.1.blocks.ffn.wi"; None for a constant.
      index: index into our array (ints, and slice(None) for kept axes); () for a constant.
      spec: the rule's TensorSpec; None for a constant.
      scale: HF tensor = scale x our values (a power of two).
      const: for a tensor with no counterpart among our arrays, its `Const` row.
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    ours: str | None
    index: tuple[int | slice, ...]
    spec: TensorSpec | None
    scale: float = 1.0
    const: Const | None = None


def layer_rules(cfg: ModelConfig, layer: int, lay: Layout = DEEPSEEK) -> tuple:
    """The rows of global layer `layer` in layout `lay`."""
    if not cfg.is_moe_layer(layer):
        return LAYER_RULES + DENSE_FFN_RULES
    m = cfg.moe
    group = lay.shared_only if m.num_experts == 0 else lay.moe_shared if m.num_shared_experts else lay.moe_unshared
    if group is None:
        raise LayoutError(
            f"layer {layer} (MoE: {m.num_experts} routed, {m.num_shared_experts} shared experts) has no "
            f"{lay.architecture} equivalent"
        )
    if m.num_experts and lay.bias is not None:
        group += lay.bias if m.selection_bias else lay.no_bias
    return LAYER_RULES + group


def plan(cfg: ModelConfig, our_shapes: Mapping[str, tuple[int, ...]], lay: Layout = DEEPSEEK) -> list[TensorEntry]:
    """Every HF tensor of the model in layout `lay`, in HF order (embed, layers 0..L-1, norm, lm_head).

    Args:
      cfg: the model (already `check_exportable`).
      our_shapes: {dotted path: shape} of every parameter array (the abstract model's or a
        checkpoint's). Every array must be used by some rule and every rule's array must exist.
      lay: the layout (DeepSeek's by default).
    """
    check_exportable(cfg, lay)
    entries: list[TensorEntry] = []
    used: set[str] = set()

    def add(rule, ours: str, name_vars: dict, index_vars: dict) -> None:
        name = rule.hf.format(**name_vars)
        if isinstance(rule, Const):
            entries.append(
                TensorEntry(hf_name=name, hf_shape=rule.shape_for(cfg), ours=None, index=(), spec=None, const=rule)
            )
            return
        if ours not in our_shapes:
            raise LayoutError(f"the layout needs our array {ours!r} (for {name}), which the model does not have")
        shape = tuple(our_shapes[ours])
        entries.append(
            TensorEntry(
                hf_name=name,
                hf_shape=rule.spec.hf_shape(shape),
                ours=ours,
                index=rule.spec.index(**index_vars),
                spec=rule.spec,
                scale=rule.scale,
            )
        )
        used.add(ours)

    embed, norm, head = GLOBAL_RULES
    add(embed, embed.ours, {}, {})
    for s, (_, first, count) in enumerate(cfg.layer_segments()):
        for local in range(count):
            layer = first + local
            for rule in layer_rules(cfg, layer, lay):
                ours = None if isinstance(rule, Const) else f"stacks.{s}.blocks.{rule.ours}"
                if isinstance(rule, Rule) and "e" in rule.spec.picks:
                    for e in range(cfg.moe.num_experts):
                        add(rule, ours, {"l": layer, "e": e}, {"l": local, "e": e})
                else:
                    add(rule, ours, {"l": layer}, {"l": local})
    add(norm, norm.ours, {}, {})
    add(head, head.ours, {}, {})
    unused = sorted(set(our_shapes) - used)
    if unused:
        raise LayoutError(f"the {lay.architecture} layout has no place for our array(s) {unused}")
    return entries


def flat_model_shapes(model) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of what an export reads of an nnx model (concrete or abstract): its parameters
    and DeepSeek-V3's selection bias (`RouterBias`, if the model has one)."""
    from flax import nnx

    from moe_jax.moe.router import RouterBias

    return flat_param_shapes(nnx.state(model, nnx.Param)) | flat_param_shapes(nnx.state(model, RouterBias))


def flat_param_shapes(params) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of an nnx.State of params (concrete or abstract)."""
    return {path: tuple(leaf.shape) for path, leaf in flat_params(params).items()}


def path_str(keypath) -> str:
    """A jax key path of an nnx.State leaf -> our dotted path ("stacks.1.blocks.ffn.wi"; the Variable's
    trailing "value" dropped)."""
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath]
    if keys and keys[-1] == "value":
        keys = keys[:-1]
    return ".".join(keys)


def flat_params(params) -> dict[str, object]:
    """{dotted path: leaf} of an nnx.State of params."""
    import jax

    return {path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}

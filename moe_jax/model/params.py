"""Parameter and FLOP accounting of a `ModelConfig`, from the abstract model (no weights allocated).

The model is built under `nnx.eval_shape`, so a 145B configuration costs a fraction of a second and
no memory; every `nnx.Param` leaf is then classified by its path in the module tree.

The paper's accounting (docs/paper.md §3.1-§3.4, [derived] there):
  total      = every parameter, embedding and LM head counted once each (they are untied).
  activated  = total - routed experts + (top_k / num_experts) * routed experts, per MoE layer:
               a token runs K' of the N' routed experts (all routed experts of a layer are the same
               size); shared experts, dense FFNs, attention, norms, router, embedding, LM head are
               always active. Expert-choice routing (router="expert_choice") gives a token a variable
               number of experts; it is counted at its nominal average, K' = `MoEConfig.routed_per_token`
               = expert_choice_capacity_factor * top_k (capped at N'; exactly the average when C =
               capacity_factor * T * top_k / N' is a whole number of tokens), rounded to whole parameters.
  FLOPs      = training FLOPs (forward + backward) for one sequence of T tokens:
               6 * (activated - embedding) * T + 12 * L * T^2 * (num_heads * head_dim),
               i.e. 6 FLOPs per activated non-embedding parameter (the LM head counts, the embedding
               lookup does not) plus the attention scores and the weighted sum of values
               (2 matmuls * 2 FLOPs * T^2 * d, x3 for the backward pass), with no causal discount.
  expert params = shared + routed expert FFN parameters (no router), as paper Tab 2/8/9 print them.
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx

from moe_jax.config import ModelConfig

CATEGORIES = (
    "embedding",
    "lm_head",
    "attention",
    "norm",
    "dense_ffn",
    "shared_experts",
    "routed_experts",
    "router",
    "other",
)


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one model (integers, parameters) and its training FLOPs per sequence.

    Attributes:
      by_category: parameters per category of `CATEGORIES` (all of them present, maybe 0).
      total: every parameter.
      activated: parameters a token uses (routed experts scaled by top_k / num_experts).
      expert: shared + routed expert parameters (paper Tab 2 "expert params").
      activated_expert: shared + top_k routed expert parameters.
      seq_len: T used for `flops`.
      flops: training FLOPs for one sequence of `seq_len` tokens (docs/paper.md §3.4 accounting).
    """

    by_category: dict[str, int]
    total: int
    activated: int
    expert: int
    activated_expert: int
    seq_len: int
    flops: float

    @property
    def attention(self) -> int:
        return self.by_category["attention"]

    @property
    def embedding(self) -> int:
        return self.by_category["embedding"]


def abstract_model(cfg: ModelConfig):
    """The Transformer of `cfg` with ShapeDtypeStruct leaves instead of arrays (nothing allocated)."""
    from moe_jax.model.transformer import Transformer  # the model code is imported only when needed

    return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))


def _routed_ffns(model) -> set[tuple[str, ...]]:
    """Paths of the MoE FFN modules that own routed experts (an `ffn` module with a router)."""
    return {
        tuple(map(str, path))
        for path, node in nnx.iter_graph(model)
        if path and str(path[-1]) == "ffn" and getattr(node, "router", None) is not None
    }


def _category(path: tuple[str, ...], routed_ffns: set[tuple[str, ...]]) -> str:
    """Category (one of CATEGORIES) of the parameter at `path` in the module tree."""
    leaf, parent = path[-1], path[:-1]
    if path == ("embed",):
        return "embedding"
    if path == ("lm_head",):
        return "lm_head"
    if "router" in path:
        return "router"
    if "attn" in path and leaf in ("wq", "wk", "wv", "wo"):
        return "attention"
    if leaf == "scale" and any(p.endswith("norm") for p in path):
        return "norm"
    if "ffn" in path and leaf in ("wi", "wo"):
        if "shared" in path:
            return "shared_experts"
        return "routed_experts" if parent in routed_ffns else "dense_ffn"
    return "other"


def count_params(cfg: ModelConfig, seq_len: int) -> ParamCounts:
    """Count the parameters of `cfg` from its abstract model and its FLOPs for `seq_len` tokens."""
    model = abstract_model(cfg)
    routed_ffns = _routed_ffns(model)
    by_cat = dict.fromkeys(CATEGORIES, 0)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            by_cat[_category(tuple(map(str, path)), routed_ffns)] += math.prod(var.get_value().shape)
    return counts_from_categories(cfg, by_cat, seq_len)


def counts_from_categories(cfg: ModelConfig, by_category: dict[str, int], seq_len: int) -> ParamCounts:
    """Totals, activated parameters and FLOPs from per-category counts (the paper's accounting)."""
    total = sum(by_category.values())
    routed = by_category["routed_experts"]
    m = cfg.moe
    active_routed = routed * m.top_k // m.num_experts if (m is not None and m.num_experts) else 0
    if m is not None and m.num_experts and m.router == "expert_choice":  # a fractional average K'
        active_routed = round(routed * m.routed_per_token / m.num_experts)
    activated = total - routed + active_routed
    expert = routed + by_category["shared_experts"]
    activated_expert = active_routed + by_category["shared_experts"]
    return ParamCounts(
        by_category=by_category,
        total=total,
        activated=activated,
        expert=expert,
        activated_expert=activated_expert,
        seq_len=seq_len,
        flops=training_flops(cfg, activated - by_category["embedding"], seq_len),
    )


def training_flops(cfg: ModelConfig, activated_non_embedding: int, seq_len: int) -> float:
    """6 * N_act * T + 12 * L * T^2 * (heads * head_dim): forward + backward FLOPs per sequence."""
    attention_width = cfg.num_heads * cfg.head_dim
    return 6.0 * activated_non_embedding * seq_len + 12.0 * cfg.num_layers * seq_len**2 * attention_width

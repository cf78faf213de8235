"""Router modules: they own the router's state and return a `Routing` (the maths is in gating.py).

A router is called as `router(x [T, d], token_ids [T], rng) -> Routing`. `uses_balance_loss` says
whether balance losses apply (not for hash routing, which never learns: Megatron-LM #7079). A router
that selects among tokens (expert choice) also takes `num_sequences` (the T tokens are that many
sequences, one after another) and says so with `selects_tokens`; the MoE layer calls every router
through `route`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.config import ModelConfig, MoEConfig, check_registry
from moe_jax.moe import gating as R
from moe_jax.moe.dispatch.expert_parallel import expert_axis_size


class HashTable(nnx.Variable):
    """A non-trainable int table (not an nnx.Param, so optimizers and gradients never see it)."""


class RouterBias(nnx.Variable):
    """DeepSeek-V3's per-expert selection bias b_i (arXiv:2412.19437 §2.1.2, Eq 16; `MoEConfig.selection_bias`).

    Not an nnx.Param, so optimizers and gradients never see it: the train step moves it after every step
    (`gating.update_selection_bias`) and carries it in `TrainState.router_bias`, which checkpoints keep."""


def _centroid_kernel(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Param:
    """The learned expert centroids e_i as the columns of a kernel [d, E] ~ N(0, init_std^2)."""
    return nnx.Param(
        cfg.init_std * jax.random.normal(rngs.params(), (cfg.d_model, cfg.moe.num_experts), cfg.param_dtype),
        axes=("embed", "router_experts"),
    )


class SoftmaxRouter(nnx.Module):
    """Learned top-k router; the expert centroids e_i are the columns of `kernel` [d, E].

    Its scores are the paper's softmax over the routed experts (Eq 11, `R.softmax_topk`) or, with
    `MoEConfig.router_score="sigmoid"`, DeepSeek-V3's per-expert sigmoid (`R.sigmoid_topk`). With
    `MoEConfig.topk_groups` the selection is group-limited (DeepSeek-V2/V3, `R.group_limited_topk`). With
    `MoEConfig.selection_bias` it also owns V3's selection bias `bias` [E] (`RouterBias`, `R.biased_topk`),
    added to the scores for the group and top-k selection only.
    """

    uses_balance_loss = True

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg.moe
        self.kernel = _centroid_kernel(cfg, rngs)
        if cfg.moe.selection_bias:  # only then: other models keep their module tree (and checkpoints)
            self.bias = RouterBias(jnp.zeros((cfg.moe.num_experts,), jnp.float32), axes=("router_experts",))

    def __call__(self, x: jax.Array, token_ids: jax.Array | None, rng: jax.Array | None) -> R.Routing:
        logits = R.router_logits(x, self.kernel[...])
        if self.cfg.topk_groups:
            return self._group_limited(logits)
        # V3's selection bias without groups (with groups, `_group_limited` passes it on).
        if self.cfg.selection_bias:
            return R.biased_topk(
                logits,
                self.bias[...],
                self.cfg.top_k,
                score=self.cfg.router_score,
                renormalize=self.cfg.renormalize_topk,
            )
        if self.cfg.router_score == "sigmoid":
            return R.sigmoid_topk(logits, self.cfg.top_k, renormalize=self.cfg.renormalize_topk)
        return R.softmax_topk(
            logits,
            self.cfg.top_k,
            renormalize=self.cfg.renormalize_topk,
            second_expert_policy=self.cfg.second_expert_policy,
            rng=rng,
            disable_top=self.cfg.disable_top_experts,
        )

    def _group_limited(self, logits: jax.Array) -> R.Routing:
        num_groups, topk_groups = expert_groups(self.cfg)
        return R.group_limited_topk(
            logits,
            self.cfg.top_k,
            num_groups=num_groups,
            topk_groups=topk_groups,
            group_score=self.cfg.group_score,
            score=self.cfg.router_score,
            renormalize=self.cfg.renormalize_topk,
            bias=self.bias[...] if self.cfg.selection_bias else None,
        )


def expert_groups(cfg: MoEConfig) -> tuple[int, int]:
    """(G, M) of group-limited routing for this call: G = `num_expert_groups`, or the ambient mesh's
    expert-axis size when it is 0 (1 without a mesh); M = min(`topk_groups`, G) (with G <= M every group
    is kept). Errors name the fix when the mesh's G does not fit the experts."""
    num_groups = cfg.num_expert_groups or expert_axis_size()
    topk_groups = min(cfg.topk_groups, num_groups)
    e = cfg.num_experts
    if e % num_groups or cfg.top_k > topk_groups * (e // num_groups):
        raise ValueError(
            f"group-limited routing over the mesh's expert axis ({num_groups} groups): {num_groups} must divide "
            f"num_experts={e} and top_k={cfg.top_k} must be <= topk_groups * num_experts / groups = "
            f"{topk_groups * (e // max(num_groups, 1))}: set MoEConfig.num_expert_groups, topk_groups or top_k"
        )
    return num_groups, topk_groups


class HashRouter(nnx.Module):
    """Fixed token-id -> expert table (random from a seed, or frequency-balanced); top-1, gate 1."""

    uses_balance_loss = False

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        vocab_size, cfg = cfg.vocab_size, cfg.moe
        if cfg.hash_table == "balanced":
            freqs = np.load(cfg.hash_frequencies)
            if freqs.shape != (vocab_size,):
                raise ValueError(
                    f"hash frequencies {cfg.hash_frequencies} have shape {freqs.shape}, expected ({vocab_size},)"
                )
            table = R.balanced_hash_table(freqs, cfg.num_experts, cfg.hash_seed)
        else:
            table = R.random_hash_table(vocab_size, cfg.num_experts, cfg.hash_seed)
        self.table = HashTable(jnp.asarray(table), axes=("vocab",))

    def __call__(self, x: jax.Array, token_ids: jax.Array | None, rng: jax.Array | None) -> R.Routing:
        if token_ids is None:
            raise ValueError("hash routing needs the input token ids; pass token_ids to the model")
        return R.hash_route(token_ids, self.table[...])


class ExpertChoiceRouter(nnx.Module):
    """Expert-choice router (Zhou et al. 2022, arXiv:2202.09368): every expert takes its top-C tokens
    (`R.expert_choice`) among each sequence's tokens (`MoEConfig.expert_choice_scope="sequence"`) or the
    whole batch's ("batch"); the expert centroids e_i are the columns of `kernel` [d, E] as for softmax.

    Balanced by construction (every expert takes exactly C tokens per group), so no balance loss
    applies: `expert_balance_alpha` and `device_balance_alpha` are ignored (the config refuses the
    z-loss). The Routing has k = E columns; a token may have no active one.
    """

    uses_balance_loss = False
    selects_tokens = True

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg.moe
        self.kernel = _centroid_kernel(cfg, rngs)

    def __call__(
        self, x: jax.Array, token_ids: jax.Array | None, rng: jax.Array | None, num_sequences: int = 1
    ) -> R.Routing:
        groups = num_sequences if self.cfg.expert_choice_scope == "sequence" else 1
        return R.expert_choice(
            R.router_logits(x, self.kernel[...]),
            self.cfg.top_k,
            capacity_factor=self.cfg.expert_choice_capacity_factor,
            num_groups=groups,
        )


def route(router: nnx.Module, x: jax.Array, token_ids: jax.Array | None, rng: jax.Array | None, num_sequences: int):
    """`router`'s Routing of x [T, d], the T tokens being `num_sequences` sequences one after another
    (only routers that select among tokens, `selects_tokens`, use it)."""
    if getattr(router, "selects_tokens", False):
        return router(x, token_ids, rng, num_sequences=num_sequences)
    return router(x, token_ids, rng)


# The router modules by the name `MoEConfig.router` takes; its names are `moe_jax.config.ROUTERS`.
ROUTER_CLASSES = {"softmax": SoftmaxRouter, "hash": HashRouter, "expert_choice": ExpertChoiceRouter}
check_registry("router", ROUTER_CLASSES)

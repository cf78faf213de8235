"""Router modules: they own the router's state and return a `Routing` (the maths is in gating.py).

A router is called as `router(x [T, d], token_ids [T], rng) -> Routing`. `uses_balance_loss` says
whether balance losses apply (not for hash routing, which never learns: Megatron-LM #7079).
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


class SoftmaxRouter(nnx.Module):
    """Learned top-k router; the expert centroids e_i are the columns of `kernel` [d, E].

    Its scores are the paper's softmax over the routed experts (Eq 11, `R.softmax_topk`) or, with
    `MoEConfig.router_score="sigmoid"`, DeepSeek-V3's per-expert sigmoid (`R.sigmoid_topk`). With
    `MoEConfig.topk_groups` the selection is group-limited (DeepSeek-V2/V3, `R.group_limited_topk`).
    """

    uses_balance_loss = True

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg.moe
        self.kernel = nnx.Param(
            cfg.init_std * jax.random.normal(rngs.params(), (cfg.d_model, cfg.moe.num_experts), cfg.param_dtype),
            axes=("embed", "router_experts"),
        )

    def __call__(self, x: jax.Array, token_ids: jax.Array | None, rng: jax.Array | None) -> R.Routing:
        logits = R.router_logits(x, self.kernel[...])
        if self.cfg.topk_groups:
            return self._group_limited(logits)
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


# The router modules by the name `MoEConfig.router` takes; its names are `moe_jax.config.ROUTERS`.
ROUTER_CLASSES = {"softmax": SoftmaxRouter, "hash": HashRouter}
check_registry("router", ROUTER_CLASSES)

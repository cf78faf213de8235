"""Router modules: they own the router's state and return a `Routing` (the maths is in gating.py).

A router is called as `router(x [T, d], token_ids [T], rng) -> Routing`. `uses_balance_loss` says
whether balance losses apply (not for hash routing, which never learns: Megatron-LM #7079).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.config import ModelConfig, check_registry
from moe_jax.moe import gating as R


class HashTable(nnx.Variable):
    """A non-trainable int table (not an nnx.Param, so optimizers and gradients never see it)."""


class RouterBias(nnx.Variable):
    """DeepSeek-V3's per-expert selection bias b_i (arXiv:2412.19437 §2.1.2, Eq 16; `MoEConfig.selection_bias`).

    Not an nnx.Param, so optimizers and gradients never see it: the train step moves it after every step
    (`gating.update_selection_bias`) and carries it in `TrainState.router_bias`, which checkpoints keep."""


class SoftmaxRouter(nnx.Module):
    """Learned top-k router; the expert centroids e_i are the columns of `kernel` [d, E].

    Its scores are the paper's softmax over the routed experts (Eq 11, `R.softmax_topk`) or, with
    `MoEConfig.router_score="sigmoid"`, DeepSeek-V3's per-expert sigmoid (`R.sigmoid_topk`). With
    `MoEConfig.selection_bias` it also owns V3's selection bias `bias` [E] (`RouterBias`, `R.biased_topk`).
    """

    uses_balance_loss = True

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg.moe
        self.kernel = nnx.Param(
            cfg.init_std * jax.random.normal(rngs.params(), (cfg.d_model, cfg.moe.num_experts), cfg.param_dtype),
            axes=("embed", "router_experts"),
        )
        if cfg.moe.selection_bias:  # only then: other models keep their module tree (and checkpoints)
            self.bias = RouterBias(jnp.zeros((cfg.moe.num_experts,), jnp.float32), axes=("router_experts",))

    def __call__(self, x: jax.Array, token_ids: jax.Array | None, rng: jax.Array | None) -> R.Routing:
        logits = R.router_logits(x, self.kernel[...])
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

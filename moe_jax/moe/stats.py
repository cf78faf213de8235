"""Per-layer routing statistics returned with every MoE layer's output (for metrics and analyses).

Besides load and drops, they carry the diagnostics that show whether a router has learned (all
stop-gradient, float32 scalars per layer; E routed experts, k active per token, T tokens):

    normalised entropy     H_norm = mean_t (-sum_i s_{i,t} ln s_{i,t}) / ln E      1 = uniform router
    top-k gate mass        M_k    = mean_t sum_{i in top-k} s_{i,t}                 k/E = uniform router
    load spread            CV     = std_e(load_e) / mean_e(load_e)                   0 = balanced
    dead experts           #{e : load_e = 0} in the batch
    unrouted tokens        U      = mean_t [token t has no active assignment]       0 for token choice
    output norms           mean_t ||routed output_t||, mean_t ||shared output_t||

With the paper's raw softmax gates (arXiv:2401.06066 Eq 5, no renormalisation), M_k is also the scale
at which the routed experts enter the output: about k/E while the router is near uniform.

Expert-choice routing (arXiv:2202.09368; `gating.expert_choice`) gives each token a variable number
(0..E) of experts. There "top-k" means "the experts that chose the token": M_k is the mean over tokens
of the summed scores of the experts that took the token (0 for a token no expert took), still the
scale of the routed output; about k/E for a near-uniform router, as for token choice with the same
average k. Its load is exactly C per expert and selection group, so max_load = 1, CV = 0 and no dead
experts (unless a capacity dispatch drops); U is the share of tokens that got no routed expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class RoutingStats:
    """Statistics of one MoE layer on one batch (stacked to [L, ...] by the model).

    Attributes:
      tokens_per_expert: [E] float32 assignments computed per routed expert.
      max_load: max over experts of tokens_per_expert / mean (1.0 = perfectly balanced).
      dropped_fraction: fraction of active assignments not computed (capacity overflow).
      router_entropy: mean per-token entropy of the router scores, in nats (0 for hash routing).
      router_entropy_norm: router_entropy / ln E (1 = uniform; 0 for hash routing).
      topk_mass: mean per-token sum of the router scores of the selected experts (0 for hash routing).
      load_cv: coefficient of variation of tokens_per_expert over experts.
      dead_experts: number of routed experts that got no token in the batch.
      routed_norm: mean L2 norm of a token's combined routed-expert output.
      shared_norm: mean L2 norm of a token's shared-expert output (0 without shared experts).
      unrouted_fraction: share of tokens with no active routed assignment (before capacity drops); only
        expert-choice routing leaves tokens without an expert.
    """

    tokens_per_expert: jax.Array
    max_load: jax.Array
    dropped_fraction: jax.Array
    router_entropy: jax.Array
    router_entropy_norm: jax.Array
    topk_mass: jax.Array
    load_cv: jax.Array
    dead_experts: jax.Array
    routed_norm: jax.Array
    shared_norm: jax.Array
    unrouted_fraction: jax.Array


def mean_token_norm(y: jax.Array | None) -> jax.Array:
    """Mean over tokens of ||y_t||_2 for y [T, d] (0 for None), float32, no gradient."""
    if y is None:
        return jnp.zeros((), jnp.float32)
    y = jax.lax.stop_gradient(y).astype(jnp.float32)
    return jnp.mean(jnp.sqrt(jnp.sum(y * y, axis=-1)))


def routing_stats(
    tokens_per_expert: jax.Array,
    dropped: jax.Array,
    mask: jax.Array,
    probs: jax.Array | None,
    indices: jax.Array | None = None,
    routed_out: jax.Array | None = None,
    shared_out: jax.Array | None = None,
) -> RoutingStats:
    """tokens_per_expert [E]; dropped, mask, indices [T, k]; probs [T, E] or None; outputs [T, d] or None."""
    counts = jax.lax.stop_gradient(tokens_per_expert.astype(jnp.float32))
    mean = jnp.maximum(counts.mean(), 1e-9)
    zero = jnp.zeros((), jnp.float32)
    entropy = entropy_norm = mass = zero
    if probs is not None:
        p = jax.lax.stop_gradient(probs)
        entropy = -jnp.mean(jnp.sum(p * jnp.log(jnp.maximum(p, 1e-20)), axis=-1))
        entropy_norm = entropy / jnp.log(jnp.float32(max(p.shape[-1], 2)))
        if indices is not None:
            chosen = jnp.take_along_axis(p, indices, axis=-1)
            mass = jnp.mean(jnp.sum(jnp.where(mask, chosen, 0.0), axis=-1))
    active = jnp.maximum(mask.sum(), 1)
    return RoutingStats(
        tokens_per_expert=counts,
        max_load=counts.max() / mean,
        dropped_fraction=dropped.sum() / active,
        router_entropy=entropy,
        router_entropy_norm=entropy_norm,
        topk_mass=mass,
        load_cv=counts.std() / mean,
        dead_experts=jnp.sum(counts == 0).astype(jnp.float32),
        routed_norm=mean_token_norm(routed_out),
        shared_norm=mean_token_norm(shared_out),
        unrouted_fraction=jnp.mean(~jnp.any(mask, axis=-1)).astype(jnp.float32),
    )

"""Capacity dispatch: each expert takes at most C assignments; the rest are dropped (GShard, Switch).

C = ceil(capacity_factor * T * k / E). Priority follows GShard: every first choice outranks every
second choice, and within a choice rank earlier tokens come first. Positions inside an expert come
from a stable sort (no [T, E, C] one-hot tensor); kept assignments are gathered into an [E, C, d]
buffer, run as one batched SwiGLU, and gathered back.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moe_jax.layers.mlp import swiglu_activation
from moe_jax.moe.dispatch.base import DispatchOutput, ExpertParams, combine, count_per_expert
from moe_jax.moe.dispatch.permute import inverse_permutation
from moe_jax.moe.gating import Routing


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor * T * k / E), at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def capacity_positions(indices: jax.Array, mask: jax.Array, num_experts: int):
    """Position of each assignment inside its expert's queue, in GShard priority order.

    Args:
      indices, mask: [T, k].

    Returns:
      positions [T, k] int32 (0-based rank within the expert; undefined where mask is False).
    """
    t, k = indices.shape
    ids = jnp.where(mask, indices, num_experts).T.reshape(-1)  # [k*T]: all 1st choices, then 2nd...
    order = jnp.argsort(ids, stable=True)
    sizes = jnp.zeros(num_experts + 1, jnp.int32).at[ids].add(1)
    starts = jnp.cumsum(sizes) - sizes
    rank_sorted = jnp.arange(ids.shape[0], dtype=jnp.int32) - starts[ids[order]]
    rank = jnp.take(rank_sorted, inverse_permutation(order.astype(jnp.int32)))
    return rank.reshape(k, t).T


def capacity_dispatch(
    x: jax.Array, routing: Routing, experts: ExpertParams, *, capacity_factor: float = 1.25
) -> DispatchOutput:
    """x [T, d] -> DispatchOutput; assignments beyond an expert's capacity are dropped (output 0)."""
    t, k = routing.indices.shape
    e = experts.num_experts
    cap = expert_capacity(t, k, e, capacity_factor)
    pos = capacity_positions(routing.indices, routing.mask, e)
    keep = routing.mask & (pos < cap)
    slot = jnp.where(keep, routing.indices * cap + pos, e * cap).reshape(-1)  # [T*k]; e*cap = trash
    token = jnp.repeat(jnp.arange(t, dtype=jnp.int32), k)
    slot_token = jnp.full(e * cap + 1, t, jnp.int32).at[slot].set(token)[:-1]  # [E*C]; t = empty
    x_pad = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
    buf = jnp.take(x_pad, slot_token, axis=0).reshape(e, cap, -1)  # [E, C, d]
    h = jnp.einsum("ecd,edgf->ecgf", buf, experts.wi)
    out = jnp.einsum("ecf,efd->ecd", swiglu_activation(h), experts.wo)
    out_pad = jnp.concatenate([out.reshape(e * cap, -1), jnp.zeros((1, out.shape[-1]), out.dtype)])
    out_tk = jnp.take(out_pad, slot, axis=0).reshape(t, k, -1)
    y = combine(out_tk, routing.weights, keep, x.dtype)
    ids = jnp.where(keep, routing.indices, e).reshape(-1)
    return DispatchOutput(y=y, tokens_per_expert=count_per_expert(ids, e), dropped=routing.mask & ~keep)

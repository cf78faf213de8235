"""Dropless dispatch: sort the T*k assignments by expert, run each expert on its contiguous rows
with a grouped matmul, unsort and combine (the paper's setting: no token is ever dropped).

Memory for dispatch is O(T*k*d) (one permuted copy of the tokens), never O(T*E*capacity).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.moe.dispatch.base import (DispatchOutput, ExpertParams, active_expert_ids, combine,
                                       count_per_expert)
from moe_jax.moe.dispatch.gmm import GmmFn, get_gmm
from moe_jax.moe.dispatch.permute import gather_replicated, inverse_permutation, permute_rows
from moe_jax.moe.routing import Routing


def grouped_swiglu(xs: jax.Array, group_sizes: jax.Array, experts: ExpertParams, gmm: GmmFn) -> jax.Array:
    """SwiGLU of expert e on its rows. xs [M, d] sorted by expert, group_sizes [E] -> [M, d]."""
    e, d, _, f = experts.wi.shape
    h = gmm(xs, experts.wi.reshape(e, d, 2 * f), group_sizes).reshape(-1, 2, f)
    return gmm(jax.nn.silu(h[:, 0]) * h[:, 1], experts.wo, group_sizes)


def sort_by_expert(routing: Routing, num_experts: int):
    """Order of the T*k assignments by expert id (stable), its inverse, and the group sizes [E].

    Inactive assignments get the sentinel id E and sort to the end, outside every group.
    """
    ids = active_expert_ids(routing.indices, routing.mask, num_experts)
    order = jnp.argsort(ids, stable=True).astype(jnp.int32)
    return order, inverse_permutation(order), count_per_expert(ids, num_experts)


def dropless_dispatch(x: jax.Array, routing: Routing, experts: ExpertParams, *, gmm_backend: str = "auto",
                      **_) -> DispatchOutput:
    """x [T, d] -> DispatchOutput with y [T, d]; every active assignment is computed."""
    t, k = routing.indices.shape
    order, inv, group_sizes = sort_by_expert(routing, experts.num_experts)
    xs = gather_replicated(x, order, inv, k)                     # [T*k, d] sorted by expert
    out = grouped_swiglu(xs, group_sizes, experts, get_gmm(gmm_backend))
    out_tk = permute_rows(out, inv, order).reshape(t, k, -1)     # back to token-major
    y = combine(out_tk, routing.weights, routing.mask, x.dtype)
    return DispatchOutput(y=y, tokens_per_expert=group_sizes, dropped=jnp.zeros((t, k), bool))

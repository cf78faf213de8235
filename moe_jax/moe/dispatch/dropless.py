"""Dropless dispatch: sort the T*k assignments by expert, run each expert on its contiguous rows
with a grouped matmul, unsort and combine (the paper's setting: no token is ever dropped).

Memory for dispatch is O(T*k*d) (one permuted copy of the tokens), never O(T*E*capacity). Two
choices keep it close to a dense FFN's:
  * the gate values are folded into the rows before the output projection
    (sum_k g_k FFN_k(x) = sum_k (g_k a_k) W_o), so the combine is a plain sum over k and the
    backward pass needs no saved [T*k, d] expert outputs;
  * the gather, the SwiGLU elementwise part and the output projection are rematerialised in the
    backward pass: of the whole expert computation only the first projection h [T*k, 2f] is saved
    (plus x itself); the two grouped matmuls are not recomputed.

A routing with a static bound on its active assignments (`Routing.max_active` = A, set by expert
choice: A = E C G of its T*E columns) takes a narrower path: only the first A rows of the sorted order
(the active ones; the inactive sort past them) are gathered and computed, and their gate-weighted
outputs are scatter-added back to their tokens. The same rows get the same FFN, so it equals the
T*k-row path up to the order of the float32 sum over a token's experts. Every other routing
(max_active None: all token-choice routers) runs the T*k-row path, unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moe_jax.layers.mlp import swiglu_activation
from moe_jax.moe.dispatch.base import DispatchOutput, ExpertParams, active_expert_ids, count_per_expert
from moe_jax.moe.dispatch.gmm import GmmFn, get_gmm
from moe_jax.moe.dispatch.permute import gather_replicated, inverse_permutation, permute_rows
from moe_jax.moe.gating import Routing

SAVED_NAME = "moe_expert_h"  # the only activation of the expert computation kept for the backward pass


def grouped_swiglu(
    xs: jax.Array, group_sizes: jax.Array, experts: ExpertParams, gmm: GmmFn, row_weights: jax.Array | None = None
) -> jax.Array:
    """SwiGLU of expert e on its rows. xs [M, d] sorted by expert, group_sizes [E] -> [M, d].

    `row_weights` [M] (optional) scales each row's activation before the output projection, i.e.
    its output: out[m] = row_weights[m] * FFN_e(xs[m]). Gate and up projections run as one gmm.
    """
    e, d, _, f = experts.wi.shape
    h = gmm(xs, experts.wi.reshape(e, d, 2 * f), group_sizes)
    h = checkpoint_name(h, SAVED_NAME).reshape(-1, 2, f)
    a = swiglu_activation(h)
    if row_weights is not None:
        a = a * row_weights[:, None].astype(a.dtype)
    return gmm(a, experts.wo, group_sizes)


def sort_by_expert(routing: Routing, num_experts: int):
    """Order of the T*k assignments by expert id (stable), its inverse, and the group sizes [E].

    Inactive assignments get the sentinel id E and sort to the end, outside every group.
    """
    ids = active_expert_ids(routing.indices, routing.mask, num_experts)
    order = jnp.argsort(ids, stable=True).astype(jnp.int32)
    return order, inverse_permutation(order), count_per_expert(ids, num_experts)


@functools.partial(
    jax.checkpoint, static_argnums=(3, 7), policy=jax.checkpoint_policies.save_only_these_names(SAVED_NAME)
)
def _sorted_expert_outputs(
    x, order, inv, k: int, row_weights, group_sizes, experts: ExpertParams, gmm: GmmFn
) -> jax.Array:
    """x [T, d] -> [T*k, d] gate-weighted expert outputs in sorted order (zero past the groups)."""
    xs = gather_replicated(x, order, inv, k)  # [T*k, d] sorted by expert
    return grouped_swiglu(xs, group_sizes, experts, gmm, row_weights)


@functools.partial(
    jax.checkpoint, static_argnums=(5,), policy=jax.checkpoint_policies.save_only_these_names(SAVED_NAME)
)
def _active_expert_outputs(x, tokens, row_weights, group_sizes, experts: ExpertParams, gmm: GmmFn) -> jax.Array:
    """x [T, d], tokens [A] (the token of each sorted active row) -> [A, d] gate-weighted expert outputs."""
    return grouped_swiglu(jnp.take(x, tokens, axis=0), group_sizes, experts, gmm, row_weights)


def bounded_outputs(x: jax.Array, routing: Routing, experts: ExpertParams, gmm: GmmFn) -> tuple[jax.Array, jax.Array]:
    """The experts' summed, gate-weighted outputs of a routing with at most `routing.max_active` = A active
    assignments: A rows gathered and computed instead of T*k, scatter-added into the T tokens.

    Returns y [T, d] float32 and the group sizes [E]. Also the local computation of expert parallelism's
    ring scheme for such routings (`expert_parallel`)."""
    t, k = routing.indices.shape
    order, _, group_sizes = sort_by_expert(routing, experts.num_experts)  # the unused inverse: dropped under jit
    rows = order[: min(routing.max_active, t * k)]  # the active assignments, by expert (plus inactive ones if fewer)
    tokens = rows // k
    gates = jnp.where(routing.mask, routing.weights, 0.0).astype(jnp.float32).reshape(-1)
    out = _active_expert_outputs(x, tokens, jnp.take(gates, rows), group_sizes, experts, gmm)  # 0 past the groups
    return jnp.zeros((t, x.shape[1]), jnp.float32).at[tokens].add(out.astype(jnp.float32)), group_sizes


def _bounded_dispatch(x: jax.Array, routing: Routing, experts: ExpertParams, gmm: GmmFn) -> DispatchOutput:
    """The dropless dispatch of a routing with at most `routing.max_active` active assignments."""
    y, group_sizes = bounded_outputs(x, routing, experts, gmm)
    dropped = jnp.zeros(routing.indices.shape, bool)
    return DispatchOutput(y=y.astype(x.dtype), tokens_per_expert=group_sizes, dropped=dropped)


def dropless_dispatch(
    x: jax.Array, routing: Routing, experts: ExpertParams, *, gmm_backend: str = "auto"
) -> DispatchOutput:
    """x [T, d] -> DispatchOutput with y [T, d]; every active assignment is computed.

    With `routing.max_active` set, only that many rows are computed (see the module docstring); it
    must bound the active assignments, or the ones past it are silently lost.
    """
    if routing.max_active is not None:
        return _bounded_dispatch(x, routing, experts, get_gmm(gmm_backend))
    t, k = routing.indices.shape
    order, inv, group_sizes = sort_by_expert(routing, experts.num_experts)
    gates = jnp.where(routing.mask, routing.weights, 0.0).astype(jnp.float32).reshape(-1)
    row_weights = permute_rows(gates, order, inv)  # [T*k] gate of each sorted row
    out = _sorted_expert_outputs(x, order, inv, k, row_weights, group_sizes, experts, get_gmm(gmm_backend))
    out_tk = permute_rows(out, inv, order).reshape(t, k, -1)  # back to token-major
    y = out_tk.astype(jnp.float32).sum(axis=1).astype(x.dtype)
    return DispatchOutput(y=y, tokens_per_expert=group_sizes, dropped=jnp.zeros((t, k), bool))

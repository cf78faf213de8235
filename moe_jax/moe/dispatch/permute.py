"""Row permutations whose backward pass is a gather, not a scatter-add.

`x[perm]` differentiates to a scatter-add into x, which XLA lowers slowly (and serialises on some
backends). For a permutation the transpose is just the gather with the inverse permutation, so we
say so with a custom VJP (the same fix as MaxText's `use_custom_sort_vjp`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def inverse_permutation(perm: jax.Array) -> jax.Array:
    """perm [N] -> inv [N] with inv[perm[i]] = i."""
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


@jax.custom_vjp
def permute_rows(x: jax.Array, perm: jax.Array, inv: jax.Array) -> jax.Array:
    """x [N, ...] -> x[perm]; `inv` must be inverse_permutation(perm)."""
    return jnp.take(x, perm, axis=0)


def _permute_fwd(x, perm, inv):
    return jnp.take(x, perm, axis=0), (perm, inv)


def _permute_bwd(res, g):
    perm, inv = res
    return jnp.take(g, inv, axis=0), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_replicated(x: jax.Array, order: jax.Array, inv: jax.Array, k: int) -> jax.Array:
    """Rows of x repeated k times, then permuted: x [T, d], order [T*k] -> [T*k, d] = x[order // k].

    The backward pass gathers with `inv` (inverse of `order`) and sums the k copies of each token,
    instead of scatter-adding T*k rows into T.
    """
    return jnp.take(x, order // k, axis=0)


def _gather_fwd(x, order, inv, k):
    return jnp.take(x, order // k, axis=0), (order, inv, x.shape[0])


def _gather_bwd(k, res, g):
    order, inv, t = res
    g_tk = jnp.take(g, inv, axis=0).reshape(t, k, *g.shape[1:])
    return g_tk.sum(axis=1), None, None


gather_replicated.defvjp(_gather_fwd, _gather_bwd)

"""Grouped matmul for XLA:CPU: a loop over experts, each over static-size row chunks.

    chunked_gmm(lhs [M, K], rhs [E, K, N], group_sizes [E], chunks=(512, 256, 128, 64)) -> [M, N]

XLA:CPU lowers `jax.lax.ragged_dot` to a dense matmul against every group (E x the FLOPs), so this
kernel never does: expert e owns rows [start_e, end_e) of the sorted `lhs` and multiplies them by
rhs[e] in chunks of `chunks[0]` rows while that many are left, then `chunks[1]` ..., the last size
being padded (at most chunks[-1] - 1 wasted rows per expert). A chunk is a `lax.dynamic_slice`
whose start is clamped into the buffer; rows of the chunk outside [start_e, end_e) are masked, so
nothing is ever written outside the expert's rows and rows past sum(group_sizes) stay zero.

The three products of forward and backward each run the same loop (custom VJP):
    out  [M, N]    = gmm(lhs, rhs)              rows of expert e: lhs_e @ rhs[e]
    dlhs [M, K]    = gmm(dout, rhs^T)           rows of expert e: dout_e @ rhs[e]^T (no transpose copy)
    drhs [E, K, N] = tgmm(lhs, dout)            drhs[e] = sum over e's chunks of lhs_c^T @ dout_c
Memory is the inputs and outputs plus one chunk: no [M, E] or [E, M, K] intermediate.
The dynamic-update-slices run in place inside the while loops (checked in the compiled HLO).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_CHUNKS = (512, 256, 128, 64)


def _chunk_sizes(chunks: tuple[int, ...], m: int) -> tuple[int, ...]:
    """Chunk sizes usable on an M-row buffer: decreasing, each <= M (a smaller M gets one chunk of M)."""
    sizes = tuple(sorted({min(c, m) for c in chunks if c > 0}, reverse=True))
    if not sizes:
        raise ValueError(f"chunks={chunks} must hold positive sizes")
    return sizes


def _expert_chunks(start, size, m: int, sizes: tuple[int, ...], body: Callable, carry):
    """Run body(carry, row0, b, valid) over the chunks of rows [start, start + size).

    Chunks of size b = sizes[i] cover the rows left while at least b remain (these are whole:
    valid is None); the last size covers the rest, its final chunk padded and masked: row0 is then
    clamped so that row0 + b <= m, and valid [b] marks the chunk's rows that are this expert's and
    not yet covered.
    """
    end = start + size
    pos = start
    for i, b in enumerate(sizes):
        last = i == len(sizes) - 1
        left = end - pos
        count = (left + b - 1) // b if last else left // b

        def step(j, c, b=b, first=pos, last=last):
            r = first + j * b
            if not last:
                return body(c, r, b, None)
            row0 = jnp.minimum(r, m - b)
            rows = row0 + jnp.arange(b, dtype=jnp.int32)
            return body(c, row0, b, (rows >= r) & (rows < end))

        carry = lax.fori_loop(0, count, step, carry)
        pos = pos + count * b
    return carry


def _vma(x: jax.Array) -> frozenset:
    """The manual mesh axes `x` varies over inside `jax.shard_map` (empty outside)."""
    return frozenset(getattr(getattr(jax.typeof(x), "mat", None), "varying", ()) or ())


def _varying_like(init: jax.Array, *refs: jax.Array) -> jax.Array:
    """`init` marked as varying over every manual mesh axis any of `refs` varies over.

    Inside `jax.shard_map(..., check_vma=True)` a loop carry must have the same varying axes on entry
    as the loop body gives it; a fresh `jnp.zeros` varies over none. Outside shard_map: `init` as is.
    """
    missing = frozenset().union(*map(_vma, refs)) - _vma(init)
    return lax.pcast(init, tuple(sorted(missing)), to="varying") if missing else init


def _offsets(group_sizes: jax.Array) -> jax.Array:
    gs = group_sizes.astype(jnp.int32)
    return jnp.cumsum(gs) - gs


def _grouped_rows(x: jax.Array, w: jax.Array, group_sizes: jax.Array, sizes, contract_w: int) -> jax.Array:
    """Rows of group e times w[e], contracting x's dim 1 with w[e]'s dim `contract_w`.

    x [M, A], w [E, A, B] (contract_w=0) or [E, B, A] (contract_w=1) -> [M, B] in x's dtype.
    """
    m = x.shape[0]
    n_out = w.shape[2] if contract_w == 0 else w.shape[1]
    dims = (((1,), (contract_w,)), ((), ()))
    starts, gs = _offsets(group_sizes), group_sizes.astype(jnp.int32)

    def expert(e, out):
        we = lax.dynamic_index_in_dim(w, e, keepdims=False)

        def body(out, row0, b, valid):
            xc = lax.dynamic_slice_in_dim(x, row0, b)
            yc = lax.dot_general(xc, we, dims, preferred_element_type=jnp.float32).astype(out.dtype)
            if valid is not None:
                yc = jnp.where(valid[:, None], yc, lax.dynamic_slice_in_dim(out, row0, b))
            return lax.dynamic_update_slice_in_dim(out, yc, row0, 0)

        return _expert_chunks(starts[e], gs[e], m, sizes, body, out)

    return lax.fori_loop(0, w.shape[0], expert, _varying_like(jnp.zeros((m, n_out), x.dtype), x, w, group_sizes))


def _grouped_outer(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, sizes) -> jax.Array:
    """tgmm: [E, K, N] with [e] = x_e^T @ dy_e over the rows of group e (float32 accumulation).

    x [M, K], dy [M, N] -> [E, K, N] in x's dtype; an empty group gives zeros.
    """
    m, k = x.shape
    n = dy.shape[1]
    num_groups = group_sizes.shape[0]
    starts, gs = _offsets(group_sizes), group_sizes.astype(jnp.int32)

    def expert(e, out):
        def body(acc, row0, b, valid):
            xc, dc = lax.dynamic_slice_in_dim(x, row0, b), lax.dynamic_slice_in_dim(dy, row0, b)
            if valid is not None:
                xc, dc = jnp.where(valid[:, None], xc, 0), jnp.where(valid[:, None], dc, 0)
            return acc + lax.dot_general(xc, dc, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

        acc = _expert_chunks(
            starts[e], gs[e], m, sizes, body, _varying_like(jnp.zeros((k, n), jnp.float32), x, dy, group_sizes)
        )
        return lax.dynamic_update_index_in_dim(out, acc.astype(out.dtype), e, 0)

    return lax.fori_loop(
        0, num_groups, expert, _varying_like(jnp.zeros((num_groups, k, n), x.dtype), x, dy, group_sizes)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_gmm(lhs, rhs, group_sizes, sizes):
    return _grouped_rows(lhs, rhs, group_sizes, sizes, 0)


def _fwd(lhs, rhs, group_sizes, sizes):
    return _grouped_rows(lhs, rhs, group_sizes, sizes, 0), (lhs, rhs, group_sizes)


def _bwd(sizes, res, g):
    lhs, rhs, group_sizes = res
    dlhs = _grouped_rows(g.astype(lhs.dtype), rhs, group_sizes, sizes, 1)
    drhs = _grouped_outer(lhs, g.astype(lhs.dtype), group_sizes, sizes).astype(rhs.dtype)
    return dlhs, drhs, None


_chunked_gmm.defvjp(_fwd, _bwd)


def chunked_gmm(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, chunks: tuple[int, ...] = DEFAULT_CHUNKS
) -> jax.Array:
    """Grouped matmul by per-expert static-size row chunks. lhs [M, K], rhs [E, K, N], group_sizes [E]
    -> [M, N]; rows past sum(group_sizes) are zero, and so are their gradients.

    `chunks`: decreasing row-chunk sizes; the waste is under chunks[-1] rows per expert, and each
    chunk is one dot of [chunk, K] x [K, N], so chunks should be large enough for an efficient GEMM.
    """
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1] or group_sizes.shape != rhs.shape[:1]:
        raise ValueError(f"chunked_gmm: bad shapes lhs {lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape}")
    if lhs.shape[0] == 0:
        return jnp.zeros((0, rhs.shape[2]), lhs.dtype)
    # Under shard_map, give both operands the axes either varies over before the custom VJP, so the
    # weight gradient (which varies over the token shards) is summed over them by pcast's transpose.
    lhs, rhs = _varying_like(lhs, rhs, group_sizes), _varying_like(rhs, lhs, group_sizes)
    return _chunked_gmm(lhs, rhs, group_sizes, _chunk_sizes(tuple(chunks), lhs.shape[0]))

"""Problems, a float64 reference and a jitted forward + VJP shared by the grouped-matmul tests (not a test
module)."""

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.moe.dispatch import DISPATCH_SPECS, get_dispatch


def with_backend(name, backend):
    """Dispatch `name`, with grouped-matmul kernel `backend` if it takes one (the reference does not)."""
    return get_dispatch(name, **({"gmm_backend": backend} if "gmm_backend" in DISPATCH_SPECS[name].options else {}))


def gmm_problem(m, k, n, sizes, seed=0):
    """float32 lhs (m, k), rhs (groups, k, n) and output cotangent dy (m, n), standard normal from `seed`."""
    rng = np.random.default_rng(seed)
    lhs = rng.standard_normal((m, k)).astype(np.float32)
    rhs = rng.standard_normal((len(sizes), k, n)).astype(np.float32)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    return lhs, rhs, dy


def gmm_reference(lhs, rhs, sizes, dy):
    """float64 per-expert loop: out, dlhs, drhs of <gmm(lhs, rhs), dy>."""
    lhs, rhs, dy = (np.asarray(a, np.float64) for a in (lhs, rhs, dy))
    out, dlhs, drhs = np.zeros((lhs.shape[0], rhs.shape[2])), np.zeros_like(lhs), np.zeros_like(rhs)
    start = 0
    for e, n in enumerate(sizes):
        rows = slice(start, start + n)
        out[rows] = lhs[rows] @ rhs[e]
        dlhs[rows] = dy[rows] @ rhs[e].T
        drhs[e] = lhs[rows].T @ dy[rows]
        start += n
    return out, dlhs, drhs


def jit_gmm_vjp(fn, lhs, rhs, dy, sizes, dtype=jnp.float32):
    """(out, dlhs, drhs) of the grouped matmul `fn(lhs, rhs, group_sizes)` under jit, inputs cast to `dtype`."""
    gs = jnp.asarray(sizes, jnp.int32)

    @jax.jit
    def run(a, b, g):
        out, vjp = jax.vjp(lambda a, b: fn(a, b, gs), a, b)
        return (out,) + vjp(g)

    return run(*(jnp.asarray(x, dtype) for x in (lhs, rhs, dy)))

"""Grouped-matmul kernels against a naive per-expert numpy loop (outputs, d lhs, d rhs), and the dropless
dispatch with every kernel against the reference dispatch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gmm_testlib import gmm_problem, gmm_reference, jit_gmm_vjp, with_backend
from helpers import assert_tree_close, max_rel_err

from moe_jax.moe.dispatch import ExpertParams
from moe_jax.moe.dispatch import gmm as G
from moe_jax.moe.dispatch.kernels_cpu import chunked_gmm
from moe_jax.moe.dispatch.permute import gather_replicated, inverse_permutation, permute_rows
from moe_jax.moe.gating import router_logits, softmax_topk

K, N = 6, 5
ON_GPU = jax.default_backend() in ("gpu", "cuda", "rocm")

# name -> kernel; chunked variants with tiny chunks exercise several phases, padding and clamping.
KERNELS = {
    "chunked": G.get_gmm("chunked"),
    "chunked_4_2": functools.partial(chunked_gmm, chunks=(4, 2)),
    "chunked_8_4_3": functools.partial(chunked_gmm, chunks=(8, 4, 3)),
    "chunked_5": functools.partial(chunked_gmm, chunks=(5,)),
    "ragged_dot": G.get_gmm("ragged_dot"),
    "ragged_dot_triton": G.get_gmm("ragged_dot_triton"),
}

GROUPS = {  # name -> (rows M, group sizes); sum < M leaves sentinel rows at the end
    "random_with_empty": (40, [3, 0, 11, 7, 0, 1, 9]),
    "sentinel_rows": (40, [5, 0, 6, 2]),
    "one_group_first": (23, [23, 0, 0]),
    "one_group_last": (23, [0, 0, 23]),
    "one_group_middle_and_sentinel": (23, [0, 17, 0]),
    "all_empty": (9, [0, 0, 0]),
    "single_row": (1, [0, 1]),
    "many_small": (64, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 9]),
}


@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_matches_per_expert_loop(kernel, groups):
    m, sizes = GROUPS[groups]
    lhs, rhs, dy = gmm_problem(m, K, N, sizes)
    gs = jnp.asarray(sizes, jnp.int32)
    fn = KERNELS[kernel]
    out, vjp = jax.vjp(lambda a, b: fn(a, b, gs), jnp.asarray(lhs), jnp.asarray(rhs))
    dlhs, drhs = vjp(jnp.asarray(dy))
    ref_out, ref_dlhs, ref_drhs = gmm_reference(lhs, rhs, sizes, dy)
    for got, ref in ((out, ref_out), (dlhs, ref_dlhs), (drhs, ref_drhs)):
        assert got.shape == ref.shape
        assert max_rel_err(got, ref) <= 1e-5 if np.any(ref) else not np.any(np.asarray(got))
    total = sum(sizes)
    assert not np.any(np.asarray(out)[total:]) and not np.any(np.asarray(dlhs)[total:])  # sentinel rows


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k.startswith("chunked")])
def test_chunked_kernel_under_jit_and_nan_in_sentinel_rows(kernel):
    m, sizes = GROUPS["sentinel_rows"]
    lhs, rhs, dy = gmm_problem(m, K, N, sizes, seed=1)
    total = sum(sizes)
    lhs[total:] = np.nan  # whatever sits past the groups never leaks
    dy[total:] = np.inf
    out, dlhs, drhs = jit_gmm_vjp(KERNELS[kernel], lhs, rhs, dy, sizes)
    clean = [np.nan_to_num(a, nan=0.0, posinf=0.0) for a in (lhs, dy)]
    ref_out, ref_dlhs, ref_drhs = gmm_reference(clean[0], rhs, sizes, clean[1])
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(dlhs)).all()
    assert np.isfinite(np.asarray(drhs)).all()
    assert max_rel_err(out, ref_out) <= 1e-5 and max_rel_err(dlhs, ref_dlhs) <= 1e-5
    assert max_rel_err(drhs, ref_drhs) <= 1e-5


def test_chunked_kernel_bfloat16_close_to_float32():
    m, sizes = GROUPS["random_with_empty"]
    lhs, rhs, _ = gmm_problem(m, K, N, sizes)
    gs = jnp.asarray(sizes, jnp.int32)
    out = chunked_gmm(jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16), gs, chunks=(8, 4))
    assert out.dtype == jnp.bfloat16
    assert max_rel_err(out, gmm_reference(lhs, rhs, sizes, np.zeros((m, N)))[0]) <= 2e-2


def test_chunked_kernel_has_no_rows_times_experts_intermediate():
    # Memory grows with the rows and the weights, never with rows x experts (the ragged_dot fallback).
    m, e = 512, 32
    lhs, rhs = jnp.ones((m, K)), jnp.ones((e, K, N))
    gs = jnp.full((e,), m // e, jnp.int32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(chunked_gmm(a, b, gs, chunks=(8,))), (0, 1)))(lhs, rhs)

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                yield int(np.prod(v.aval.shape))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else (p,):
                    if hasattr(sub, "eqns"):
                        yield from sizes(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        yield from sizes(sub.jaxpr)

    assert max(sizes(jaxpr.jaxpr)) <= max(m * K, m * N, e * K * N)


def test_auto_choice_per_platform():
    assert G.resolve_gmm("auto", "cpu") == "chunked"
    assert G.resolve_gmm("auto", "gpu") in G.GPU_PREFERENCE  # the first usable (test_gmm_mosaic.py)
    assert G.resolve_gmm("auto", "tpu") == "ragged_dot"
    assert G.resolve_gmm("ragged_dot", "cpu") == "ragged_dot"
    assert G.get_gmm("auto", "cpu") is G.get_gmm("chunked")
    with pytest.raises(ValueError):
        G.get_gmm("no_such_kernel")


# ------------------------------------------------------------------------------------------------
# The dropless dispatch with each kernel against the oracle
# ------------------------------------------------------------------------------------------------

D, F = 16, 8


def _dispatch_loss(name, backend, k, policy="greedy"):
    def f(x, kernel, wi, wo, rng):
        routing = softmax_topk(router_logits(x, kernel), k, second_expert_policy=policy, rng=rng)
        y = with_backend(name, backend)(x, routing, ExpertParams(wi=wi, wo=wo)).y
        return jnp.sum(jnp.sin(y)), y

    return f


G.register_gmm("test_chunked_tiny")(functools.partial(chunked_gmm, chunks=(8, 4, 3)))
DISPATCH_CASES = [(48, 15, 7, "greedy"), (40, 8, 2, "random"), (32, 4, 1, "greedy")]


@functools.lru_cache(maxsize=None)
def _dispatch_grad(name, backend, t, e, k, policy):
    keys = jax.random.split(jax.random.key(t + e + k), 5)
    args = (
        jax.random.normal(keys[0], (t, D)),
        jax.random.normal(keys[1], (D, e)),
        0.3 * jax.random.normal(keys[2], (e, D, 2, F)),
        0.3 * jax.random.normal(keys[3], (e, F, D)),
        keys[4],
    )
    fn = jax.value_and_grad(_dispatch_loss(name, backend, k, policy), argnums=(0, 1, 2, 3), has_aux=True)
    return jax.jit(fn)(*args)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "test_chunked_tiny", "ragged_dot", "ragged_dot_triton"])
@pytest.mark.parametrize("t,e,k,policy", DISPATCH_CASES)
def test_dropless_with_each_kernel_matches_reference(backend, t, e, k, policy):
    (_, y_ref), g_ref = _dispatch_grad("reference", "auto", t, e, k, policy)
    (_, y), g = _dispatch_grad("dropless", backend, t, e, k, policy)
    assert max_rel_err(y, y_ref) <= 1e-5
    assert_tree_close(g, g_ref, 1e-5)


def test_permutation_backward_is_a_gather_not_a_scatter():
    x = jax.random.normal(jax.random.key(0), (12, 3))
    perm = jax.random.permutation(jax.random.key(1), 36).astype(jnp.int32)
    inv = inverse_permutation(perm)
    f = lambda x: jnp.sum(jnp.sin(permute_rows(gather_replicated(x, perm, inv, 3), inv, perm)))
    text = str(jax.make_jaxpr(jax.grad(f))(x))
    assert "scatter" not in text
    np.testing.assert_allclose(jax.grad(f)(x), jax.grad(lambda x: jnp.sum(jnp.sin(jnp.repeat(x, 3, 0))))(x), rtol=1e-6)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (run with JAX_PLATFORMS=cuda): the Triton lowering of ragged_dot")
def test_triton_ragged_dot_on_gpu_matches_reference():
    from moe_jax.moe.dispatch import kernels_gpu

    assert G.prepare_gmm("ragged_dot_triton") == "ragged_dot_triton"
    m, sizes = 384, [100, 0, 37, 200, 20]
    lhs, rhs, dy = gmm_problem(m, K, N, sizes)
    with jax.default_matmul_precision("highest"):  # no TF32: the float32 bound holds
        out, dlhs, drhs = jit_gmm_vjp(G.get_gmm("ragged_dot_triton"), lhs, rhs, dy, sizes)
    for got, ref in zip((out, dlhs, drhs), gmm_reference(lhs, rhs, sizes, dy)):
        assert max_rel_err(got, ref) <= 1e-5
    assert not np.any(np.asarray(out)[sum(sizes) :])
    assert kernels_gpu.triton_lowering_available() == bool(getattr(jax.config, kernels_gpu.FLAG))

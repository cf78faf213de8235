"""The Mosaic-GPU grouped matmul (kernels_mosaic) against a float64 per-expert loop.

On CPU the wrapper runs with `emulated_kernels()` substituted for the Mosaic kernels: the padding,
slicing, masking of unwritten rows and the custom VJP are checked here; the emulated kernels keep
the real ones' contract (tile divisibility, unwritten rows = NaN, neighbour masking by a product),
so a wrapper that skipped a pad or a mask fails. The real kernels are traced (not run) on CPU with
the 2B model's shapes, and run against the reference on a Hopper GPU (skipped elsewhere).
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gmm_testlib import gmm_problem, gmm_reference, jit_gmm_vjp, with_backend
from helpers import assert_tree_close, max_rel_err

from moe_jax.moe.dispatch import ExpertParams
from moe_jax.moe.dispatch import gmm as G
from moe_jax.moe.dispatch import kernels_mosaic as KM
from moe_jax.moe.gating import router_logits, softmax_topk

ON_HOPPER = KM.available()
NEEDS_HOPPER = "needs a Hopper GPU (run with JAX_PLATFORMS=cuda on an H100/H200): the Mosaic-GPU kernels use wgmma"

EMULATED = KM.emulated_kernels()
SMALL_TILES = KM.MosaicConfig(block_m=16, block_n=32, block_k=8, max_concurrent_steps=2)

# name -> (rows M, K, N, group sizes, config); sum < M leaves rows past the groups.
CASES = {
    "padded_everywhere": (40, 70, 100, [3, 0, 11, 7, 0, 1, 9], SMALL_TILES),
    "tiles_divide": (48, 16, 32, [5, 0, 20, 2], SMALL_TILES),
    "one_group_last": (23, 9, 5, [0, 0, 23], SMALL_TILES),
    "all_empty": (9, 8, 32, [0, 0, 0], SMALL_TILES),
    "single_row": (1, 8, 32, [0, 1], SMALL_TILES),
    "default_tiles_64_wide": (200, 192, 64 * 3, [60, 0, 100, 33], KM.MosaicConfig()),
    "default_tiles_padded": (130, 100, 90, [1, 128], KM.MosaicConfig()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_wrapper_with_emulated_kernels_matches_per_expert_loop(case):
    m, k, n, sizes, cfg = CASES[case]
    lhs, rhs, dy = gmm_problem(m, k, n, sizes)
    fn = functools.partial(KM.mosaic_gmm, config=cfg, kernels=EMULATED)
    got = jit_gmm_vjp(fn, lhs, rhs, dy, sizes)
    for g, ref, what in zip(got, gmm_reference(lhs, rhs, sizes, dy), ("out", "dlhs", "drhs")):
        assert g.shape == ref.shape and g.dtype == jnp.float32, what
        assert np.isfinite(np.asarray(g)).all(), what
        assert (max_rel_err(g, ref) <= 1e-5) if np.any(ref) else not np.any(np.asarray(g)), what
    assert not np.any(np.asarray(got[0])[sum(sizes) :]) and not np.any(np.asarray(got[1])[sum(sizes) :])


@pytest.mark.parametrize("case", ["padded_everywhere", "one_group_last"])
def test_chunked_weight_gradient_fallback_matches_per_expert_loop(case):
    m, k, n, sizes, cfg = CASES[case]
    lhs, rhs, dy = gmm_problem(m, k, n, sizes)
    cfg = KM.MosaicConfig(**{**cfg.__dict__, "weight_grad": "chunked"})
    got = jit_gmm_vjp(functools.partial(KM.mosaic_gmm, config=cfg, kernels=EMULATED), lhs, rhs, dy, sizes)
    for g, ref in zip(got, gmm_reference(lhs, rhs, sizes, dy)):
        assert max_rel_err(g, ref) <= 1e-5
    with pytest.raises(ValueError, match="weight_grad"):
        KM.MosaicConfig(weight_grad="xla")


def test_nan_and_inf_past_the_groups_never_leak():
    m, k, n, sizes, cfg = CASES["padded_everywhere"]
    lhs, rhs, dy = gmm_problem(m, k, n, sizes, seed=1)
    total = sum(sizes)
    lhs[total:], dy[total:] = np.nan, np.inf
    got = jit_gmm_vjp(functools.partial(KM.mosaic_gmm, config=cfg, kernels=EMULATED), lhs, rhs, dy, sizes)
    clean = [np.nan_to_num(a, nan=0.0, posinf=0.0) for a in (lhs, dy)]
    for g, ref in zip(got, gmm_reference(clean[0], rhs, sizes, clean[1])):
        assert np.isfinite(np.asarray(g)).all() and max_rel_err(g, ref) <= 1e-5


def test_emulated_kernels_keep_the_hazards_the_wrapper_removes():
    # Without the wrapper's masks the emulated kernels leave NaN (the tests above could fail).
    gs = jnp.asarray([3, 2], jnp.int32)
    tiles = dict(block_m=8, block_n=8, block_k=8, max_concurrent_steps=2, grid_block_n=1)
    out = KM._emulated_ragged_dot(jnp.ones((8, 8)), jnp.ones((2, 8, 8)), group_sizes=gs, **tiles)
    assert np.isnan(np.asarray(out)[5:]).all() and not np.isnan(np.asarray(out)[:5]).any()
    x = jnp.ones((16, 8)).at[12].set(jnp.nan)  # past the groups, in group 1's block (rows 8-15)
    tg = KM._emulated_transposed_ragged_dot(x, jnp.ones((16, 8)), group_sizes=jnp.asarray([8, 2]), **tiles)
    assert np.isnan(np.asarray(tg)[1]).all() and np.isfinite(np.asarray(tg)[0]).all()
    with pytest.raises(ValueError, match="multiple of"):
        KM._emulated_ragged_dot(jnp.ones((8, 12)), jnp.ones((2, 12, 8)), group_sizes=gs, **tiles)


def test_bfloat16_close_to_float32_reference():
    m, k, n, sizes, cfg = CASES["padded_everywhere"]
    lhs, rhs, dy = gmm_problem(m, k, n, sizes)
    got = jit_gmm_vjp(functools.partial(KM.mosaic_gmm, config=cfg, kernels=EMULATED), lhs, rhs, dy, sizes, jnp.bfloat16)
    for g, ref in zip(got, gmm_reference(lhs, rhs, sizes, dy)):
        assert g.dtype == jnp.bfloat16 and max_rel_err(g, ref) <= 2e-2


def _refusing(*_, **__):
    raise AssertionError("the kernel must not be called for operands it does not take")


def test_other_dtypes_fall_back_to_ragged_dot():
    m, k, n, sizes, cfg = CASES["padded_everywhere"]
    lhs, rhs, dy = gmm_problem(m, k, n, sizes)
    bf16_only = KM.Kernels(_refusing, _refusing, KM.MOSAIC_DTYPES)
    got = jit_gmm_vjp(functools.partial(KM.mosaic_gmm, config=cfg, kernels=bf16_only), lhs, rhs, dy, sizes)
    for g, ref in zip(got, gmm_reference(lhs, rhs, sizes, dy)):
        assert max_rel_err(g, ref) <= 1e-5
    mixed = KM.mosaic_gmm(jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs), jnp.asarray(sizes), kernels=bf16_only)
    assert mixed.dtype == jnp.bfloat16


class _JaxWithSMs(types.ModuleType):
    """jax, except devices() is one device with 132 SMs (transposed_ragged_dot reads core_count)."""

    def __init__(self):
        super().__init__("jax")

    def __getattr__(self, name):
        return getattr(jax, name)

    def devices(self, *_):
        return [types.SimpleNamespace(core_count=132)]


@pytest.mark.parametrize(
    "k,n,sizes",
    [
        (1280, 1728, [3000, 0, 2000, 1192]),  # 2B wi: d -> 2 x 864
        (864, 1280, [3000, 0, 2000, 1192]),  # 2B wo: 864 -> d (padded)
        (853, 1280, [6000, 0, 0, 100]),
    ],
)  # paper's 2B width F/4 = 853
def test_real_kernels_accept_the_wrapper_shapes(monkeypatch, k, n, sizes):
    # Traced, not run (no GPU needed): the Mosaic kernels' own argument checks and Pallas tracing see
    # exactly what the wrapper passes them, forward and backward, at the 2B layer's shapes.
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    monkeypatch.setattr(transposed_ragged_dot_mgpu, "jax", _JaxWithSMs())
    m = 8192
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)

    def fwd_bwd(a, b, g):
        out, vjp = jax.vjp(lambda a, b: KM.mosaic_gmm(a, b, gs, kernels=KM.mosaic_kernels()), a, b)
        return (out,) + vjp(g)

    out, dlhs, drhs = jax.eval_shape(fwd_bwd, sds(m, k), sds(len(sizes), k, n), sds(m, n))
    assert (out.shape, dlhs.shape, drhs.shape) == ((m, n), (m, k), (len(sizes), k, n))
    assert out.dtype == dlhs.dtype == drhs.dtype == jnp.bfloat16


G.register_gmm("test_mosaic_emulated")(functools.partial(KM.mosaic_gmm, config=SMALL_TILES, kernels=EMULATED))


@pytest.mark.parametrize("t,e,k", [(48, 15, 7), (40, 8, 2)])
def test_dropless_dispatch_with_emulated_mosaic_matches_reference(t, e, k):
    d, f = 16, 12  # f: the hidden width is padded (12 -> 16)
    keys = jax.random.split(jax.random.key(t + e), 5)
    x, router = jax.random.normal(keys[0], (t, d)), jax.random.normal(keys[1], (d, e))
    wi, wo = 0.3 * jax.random.normal(keys[2], (e, d, 2, f)), 0.3 * jax.random.normal(keys[3], (e, f, d))

    def run(name, backend):
        def loss(x, router, wi, wo):
            y = with_backend(name, backend)(x, softmax_topk(router_logits(x, router), k), ExpertParams(wi=wi, wo=wo)).y
            return jnp.sum(jnp.sin(y)), y

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, router, wi, wo)

    (_, y), g = run("dropless", "test_mosaic_emulated")
    (_, y_ref), g_ref = run("reference", "auto")
    assert max_rel_err(y, y_ref) <= 1e-5
    assert_tree_close(g, g_ref, 1e-5)


def test_auto_for_a_gpu_takes_the_first_usable_in_preference_order(monkeypatch):
    usable = {"mosaic_gpu": True, "ragged_dot_triton": True}
    monkeypatch.setattr(G, "_USABLE", {name: (lambda name=name: usable[name]) for name in usable})
    assert G.resolve_gmm("auto", "gpu") == "mosaic_gpu" == G.resolve_gmm("auto", "cuda")
    usable["mosaic_gpu"] = False
    assert G.resolve_gmm("auto", "gpu") == "ragged_dot_triton"
    usable["ragged_dot_triton"] = False
    assert G.resolve_gmm("auto", "gpu") == "ragged_dot"
    assert G.resolve_gmm("auto", "cpu") != "mosaic_gpu" and G.resolve_gmm("mosaic_gpu", "cpu") == "mosaic_gpu"


@pytest.mark.skipif(ON_HOPPER, reason="checks the error raised where there is no Hopper GPU")
def test_mosaic_backend_without_a_hopper_gpu_names_the_fix():
    lhs, rhs = jnp.ones((8, 64), jnp.bfloat16), jnp.ones((2, 64, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="needs a Hopper GPU.*gmm_backend='auto'"):
        G.get_gmm("mosaic_gpu")(lhs, rhs, jnp.asarray([4, 4]))
    out = G.get_gmm("mosaic_gpu")(lhs.astype(jnp.float32), rhs.astype(jnp.float32), jnp.asarray([4, 4]))
    np.testing.assert_allclose(out, 64.0)  # float32: the ragged_dot fallback runs anywhere


def test_usability_checks_here():
    assert KM.importable()  # the pinned jax wheel ships both kernels
    assert KM.available() == (KM.importable() and KM.hopper_visible())
    if jax.default_backend() == "cpu":
        assert not G.gmm_usable("mosaic_gpu") and G.gmm_usable("ragged_dot") and G.gmm_usable("chunked")


# ------------------------------------------------------------------------------------------------
# On a Hopper GPU: the real kernels
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not ON_HOPPER, reason=NEEDS_HOPPER)
@pytest.mark.parametrize("backend", ["mosaic_gpu", "mosaic_gpu_chunked_dw"])
@pytest.mark.parametrize(
    "k,n,sizes", [(256, 192, [100, 0, 37, 500, 20]), (200, 100, [1, 600, 0, 80]), (1280, 1728, [4000, 0, 3000, 1000])]
)
def test_mosaic_kernels_on_gpu_match_per_expert_loop(backend, k, n, sizes):
    assert G.resolve_gmm("auto") == "mosaic_gpu"
    m = sum(sizes) + 37  # rows past the groups
    lhs, rhs, dy = gmm_problem(m, k, n, sizes)
    got = jit_gmm_vjp(G.get_gmm(backend), lhs, rhs, dy, sizes, jnp.bfloat16)
    lb, rb, db = (np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (lhs, rhs, dy))
    for g, ref, what in zip(got, gmm_reference(lb, rb, sizes, db), ("out", "dlhs", "drhs")):
        assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all(), what
        assert max_rel_err(g, ref) <= 1e-2, what  # bf16 output rounding of f32 sums
    assert not np.any(np.asarray(got[0], np.float32)[sum(sizes) :])


@pytest.mark.skipif(not ON_HOPPER, reason=NEEDS_HOPPER)
def test_dropless_dispatch_with_mosaic_on_gpu_matches_reference():
    t, d, f, e, k = 512, 128, 64, 8, 2
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (t, d), jnp.bfloat16)
    experts = ExpertParams(
        wi=(0.1 * jax.random.normal(keys[1], (e, d, 2, f))).astype(jnp.bfloat16),
        wo=(0.1 * jax.random.normal(keys[2], (e, f, d))).astype(jnp.bfloat16),
    )
    routing = softmax_topk(router_logits(x.astype(jnp.float32), jax.random.normal(keys[3], (d, e))), k)

    def loss(name, backend):
        def f(x, experts):
            y = with_backend(name, backend)(x, routing, experts).y
            return jnp.sum(y.astype(jnp.float32) ** 2), y

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, experts)

    (_, y), g = loss("dropless", "mosaic_gpu")
    (_, y_ref), g_ref = loss("reference", "auto")
    assert max_rel_err(y, y_ref) <= 2e-2
    assert_tree_close(g, g_ref, 3e-2)

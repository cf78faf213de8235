"""The expert-parallel dispatch itself: capacity semantics, counted drops, masked padding, collectives,
and the device-level balance loss's groups taken from the mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ep_testlib import mesh
from flax import nnx
from helpers import max_rel_err, one_layer_model

from moe_jax.config import MoEConfig
from moe_jax.moe.dispatch import ExpertParams, capacity_dispatch, dropless_dispatch, reference_dispatch
from moe_jax.moe.dispatch.expert_parallel import expert_parallel_dispatch
from moe_jax.moe.dispatch.gmm import get_gmm, register_gmm
from moe_jax.moe.gating import softmax_topk
from moe_jax.moe.layer import MoELayer

T, D, E, F, K = 64, 16, 8, 8, 2


def _problem(k=K, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (T, D))
    # Skewed logits so that some experts overflow their capacity.
    logits = jax.random.normal(keys[1], (T, E)) + jnp.linspace(0.0, 2.0, E)
    routing = softmax_topk(logits, k)
    experts = ExpertParams(
        wi=0.3 * jax.random.normal(keys[2], (E, D, 2, F)), wo=0.3 * jax.random.normal(keys[3], (E, F, D))
    )
    return x, routing, experts


def _ep(x, routing, experts, spec, **kw):
    m = mesh(spec)
    fn = jax.jit(lambda x, r, e: expert_parallel_dispatch(x, r, e, mesh=m, **kw))
    return fn(x, routing, experts)


def _assert_same(out, ref, tol=1e-5):
    assert max_rel_err(out.y, ref.y) <= tol
    np.testing.assert_array_equal(np.asarray(out.tokens_per_expert), np.asarray(ref.tokens_per_expert))
    np.testing.assert_array_equal(np.asarray(out.dropped), np.asarray(ref.dropped))


@pytest.mark.parametrize("scheme", ["ring", "all_to_all"])
def test_dropless_matches_single_device(scheme):
    x, routing, experts = _problem(k=3)
    ref = dropless_dispatch(x, routing, experts)
    for spec in ("expert:8", "data:2,expert:4", "data:4,expert:1,tensor:2"):
        _assert_same(_ep(x, routing, experts, spec, scheme=scheme), ref)


@pytest.mark.parametrize("scheme", ["ring", "all_to_all"])
def test_capacity_equals_single_device_capacity_per_data_group(scheme):
    x, routing, experts = _problem()
    # Expert axis only: one group of all T tokens, exactly the single-device capacity dispatch.
    ref = capacity_dispatch(x, routing, experts, capacity_factor=0.5)
    assert ref.dropped.any()
    _assert_same(_ep(x, routing, experts, "expert:8", mode="capacity", scheme=scheme, capacity_factor=0.5), ref)
    # data=2 x expert=4: each half of the tokens is a capacity group of its own (GShard's groups).
    halves = [
        capacity_dispatch(x[s], jax.tree.map(lambda a: a[s], routing), experts, capacity_factor=0.5)  # noqa: B023 (called at once)
        for s in (slice(0, T // 2), slice(T // 2, T))
    ]
    ref2 = dataclasses.replace(
        halves[0],
        y=jnp.concatenate([h.y for h in halves]),
        tokens_per_expert=halves[0].tokens_per_expert + halves[1].tokens_per_expert,
        dropped=jnp.concatenate([h.dropped for h in halves]),
    )
    _assert_same(_ep(x, routing, experts, "data:2,expert:4", mode="capacity", scheme=scheme, capacity_factor=0.5), ref2)


def test_all_to_all_buffer_factor_drops_and_counts():
    x, routing, experts = _problem()
    out = _ep(x, routing, experts, "expert:8", scheme="all_to_all", buffer_factor=0.5)
    dropped = np.asarray(out.dropped)
    assert dropped.any() and not dropped[~np.asarray(routing.mask)].any()
    kept = dataclasses.replace(routing, mask=routing.mask & ~out.dropped)
    ref = reference_dispatch(x, kept, experts)
    assert max_rel_err(out.y, ref.y) <= 1e-5
    np.testing.assert_array_equal(np.asarray(out.tokens_per_expert), np.asarray(ref.tokens_per_expert))
    # Large enough buffers drop nothing.
    _assert_same(
        _ep(x, routing, experts, "expert:8", scheme="all_to_all", buffer_factor=8.0),
        dropless_dispatch(x, routing, experts),
    )


@register_gmm("test_nan_padding")
def _nan_padding_gmm(lhs, rhs, group_sizes):
    """A legal-looking kernel that writes NaN into every row past sum(group_sizes) (the padding)."""
    out = get_gmm("ragged_dot")(lhs, rhs, group_sizes)
    rows = jnp.arange(lhs.shape[0])[:, None]
    return jnp.where(rows < group_sizes.sum(), out, jnp.nan)


@pytest.mark.parametrize(
    "scheme,mode", [("ring", "dropless"), ("all_to_all", "dropless"), ("ring", "capacity"), ("all_to_all", "capacity")]
)
def test_padded_rows_never_reach_outputs_or_gradients(scheme, mode):
    x, routing, experts = _problem(k=3)
    m = mesh("data:2,expert:4")

    def loss(x, weights, experts, backend):
        r = dataclasses.replace(routing, weights=weights)
        out = expert_parallel_dispatch(
            x, r, experts, mesh=m, scheme=scheme, mode=mode, capacity_factor=0.75, gmm_backend=backend
        )
        return jnp.sum(jnp.sin(out.y))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    value, grads = grad(x, routing.weights, experts, "test_nan_padding")
    clean_value, clean_grads = grad(x, routing.weights, experts, "ragged_dot")
    assert np.isfinite(float(value))
    for g, c in zip(jax.tree.leaves(grads), jax.tree.leaves(clean_grads)):
        assert np.isfinite(np.asarray(g)).all()
        assert max_rel_err(g, c) <= 1e-6
    assert max_rel_err(value, clean_value) <= 1e-6


@pytest.mark.parametrize(
    "scheme,collectives", [("ring", ("all_gather", "reduce_scatter")), ("all_to_all", ("all_to_all",))]
)
def test_dispatch_runs_local_experts_with_collectives(scheme, collectives):
    x, routing, experts = _problem()
    m = mesh("data:2,expert:4")
    seen = []

    def spy(lhs, rhs, group_sizes):
        seen.append(rhs.shape)
        return get_gmm("ragged_dot")(lhs, rhs, group_sizes)

    register_gmm("test_spy")(spy)
    text = (
        jax.jit(lambda x, r, e: expert_parallel_dispatch(x, r, e, mesh=m, scheme=scheme, gmm_backend="test_spy"))
        .lower(x, routing, experts)
        .as_text()
    )
    assert all(shape[0] == E // 4 for shape in seen) and seen  # each device runs E/EP experts
    for name in collectives:
        assert name in text, name


def test_device_balance_groups_default_to_expert_axis():
    moe = MoEConfig(num_experts=8, top_k=2, expert_dim=8, expert_balance_alpha=0.0, device_balance_alpha=1.0)
    cfg = one_layer_model(moe, init_std=0.5)
    x = jax.random.normal(jax.random.key(1), (8, 8, 16))

    def device_loss(c, m=None):
        layer = MoELayer(c, nnx.Rngs(0))
        if m is None:
            return float(layer(x)[1].losses.device_balance)
        with jax.set_mesh(m):
            return float(jax.jit(lambda x: layer(x)[1].losses.device_balance)(x))

    on_mesh = device_loss(cfg, mesh("data:2,expert:4"))
    assert on_mesh == pytest.approx(device_loss(cfg.replace_moe(num_device_groups=4)), rel=1e-6)
    two_groups = device_loss(cfg.replace_moe(num_device_groups=2))
    assert on_mesh != pytest.approx(two_groups, rel=1e-3)
    # A configured D wins over the mesh.
    assert device_loss(cfg.replace_moe(num_device_groups=2), mesh("data:2,expert:4")) == pytest.approx(
        two_groups, rel=1e-6
    )

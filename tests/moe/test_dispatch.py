"""Oracle tests: every dispatch strategy against the naive per-expert loop, outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_close, max_rel_err

from moe_jax.layers.mlp import swiglu
from moe_jax.moe.dispatch import DISPATCH_SPECS, ExpertParams, get_dispatch
from moe_jax.moe.dispatch.capacity import capacity_positions, expert_capacity
from moe_jax.moe.gating import Routing, router_logits, softmax_topk

D, F = 16, 8


def _problem(seed, t, e, k, policy="greedy"):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (t, D))
    kernel = jax.random.normal(keys[1], (D, e))
    wi = 0.3 * jax.random.normal(keys[2], (e, D, 2, F))
    wo = 0.3 * jax.random.normal(keys[3], (e, F, D))
    return (x, kernel, wi, wo), keys[4], policy, k


def _dispatch(name, **opts):
    """Dispatch `name` with those of `opts` it declares (a test passes one option set to every dispatch)."""
    return get_dispatch(name, **{o: v for o, v in opts.items() if o in DISPATCH_SPECS[name].options})


def _run(name, params, rng, policy, k, **opts):
    x, kernel, wi, wo = params
    routing = softmax_topk(router_logits(x, kernel), k, second_expert_policy=policy, rng=rng)
    return _dispatch(name, **opts)(x, routing, ExpertParams(wi=wi, wo=wo))


def _loss(name, **opts):
    def f(params, rng, policy, k):
        out = _run(name, params, rng, policy, k, **opts)
        return jnp.sum(jnp.sin(out.y)), out.y  # a non-linear loss so every gradient entry matters

    return f


CASES = [  # (tokens, experts, k, policy)
    (32, 4, 1, "greedy"),  # Switch-like
    (32, 8, 2, "greedy"),  # GShard-like
    (48, 15, 7, "greedy"),  # fine-grained, many active
    (40, 8, 2, "random"),  # GShard random policy: masked second choices
]


@pytest.mark.slow
@pytest.mark.parametrize("name,opts", [("dropless", {}), ("capacity", {"capacity_factor": 100.0})])
@pytest.mark.parametrize("t,e,k,policy", CASES)
def test_dispatch_matches_reference_outputs_and_gradients(name, opts, t, e, k, policy):
    params, rng, policy, k = _problem(t * e + k, t, e, k, policy)
    (l_ref, y_ref), g_ref = jax.value_and_grad(_loss("reference"), has_aux=True)(params, rng, policy, k)
    (l, y), g = jax.jit(jax.value_and_grad(_loss(name, **opts), has_aux=True), static_argnums=(2, 3))(
        params, rng, policy, k
    )
    assert max_rel_err(y, y_ref) <= 1e-5
    assert_tree_close(g, g_ref, 1e-5)  # gradients w.r.t. x, router kernel, wi, wo


@pytest.mark.slow
def test_capacity_that_drops_nothing_equals_dropless():
    params, rng, policy, k = _problem(7, 64, 8, 2)
    big = _run("capacity", params, rng, policy, k, capacity_factor=8 / 2)  # C = T: nothing can drop
    ref = _run("dropless", params, rng, policy, k)
    assert not bool(big.dropped.any())
    assert max_rel_err(big.y, ref.y) <= 1e-6
    np.testing.assert_array_equal(big.tokens_per_expert, ref.tokens_per_expert)


@pytest.mark.slow
def test_one_expert_top1_is_the_dense_mlp():
    params, rng, policy, k = _problem(3, 32, 1, 1)
    x, _, wi, wo = params
    for name in ("reference", "dropless", "capacity"):
        out = _run(name, params, rng, policy, k, capacity_factor=1.0)
        assert max_rel_err(out.y, swiglu(x, wi[0], wo[0])) <= 1e-6, name


def test_capacity_drops_exactly_the_hand_computed_tokens():
    # T=4, E=2, k=2, capacity_factor 0.5 -> C = ceil(0.5 * 4 * 2 / 2) = 2 slots per expert.
    # First choices in token order: t0->e0 (slot 0), t1->e0 (1), t2->e1 (0), t3->e0 (full: dropped).
    # Second choices after all first: t0->e1 (1), t1->e1 (full), t2->e0 (full), t3->e1 (full).
    indices = jnp.array([[0, 1], [0, 1], [1, 0], [0, 1]])
    weights = jnp.array([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])
    routing = Routing(indices=indices, weights=weights, mask=jnp.ones((4, 2), bool))
    assert expert_capacity(4, 2, 2, 0.5) == 2
    np.testing.assert_array_equal(capacity_positions(indices, routing.mask, 2), [[0, 1], [1, 2], [0, 3], [2, 3]])
    x = jax.random.normal(jax.random.key(0), (4, D))
    wi = jax.random.normal(jax.random.key(1), (2, D, 2, F))
    wo = jax.random.normal(jax.random.key(2), (2, F, D))
    out = get_dispatch("capacity", capacity_factor=0.5)(x, routing, ExpertParams(wi=wi, wo=wo))
    np.testing.assert_array_equal(out.dropped, [[False, False], [False, True], [False, True], [True, True]])
    np.testing.assert_array_equal(out.tokens_per_expert, [2, 2])
    f0, f1 = swiglu(x, wi[0], wo[0]), swiglu(x, wi[1], wo[1])
    expected = jnp.stack([0.6 * f0[0] + 0.4 * f1[0], 0.7 * f0[1], 0.8 * f1[2], jnp.zeros(D)])
    assert max_rel_err(out.y, expected) <= 1e-6


@pytest.mark.slow
def test_inactive_assignments_are_not_computed():
    params, rng, policy, k = _problem(11, 16, 4, 2)
    x, kernel, wi, wo = params
    r = softmax_topk(router_logits(x, kernel), 2)
    masked = r.replace(mask=r.mask.at[:, 1].set(False), weights=r.weights.at[:, 1].set(0.0))
    for name in ("reference", "dropless", "capacity"):
        out = _dispatch(name, capacity_factor=10.0)(x, masked, ExpertParams(wi=wi, wo=wo))
        assert int(out.tokens_per_expert.sum()) == 16, name
        assert not bool(out.dropped.any()), name


def test_dropless_dispatch_memory_is_linear_in_tokens_times_k():
    # No [T, E, C] tensor: the largest intermediate of the dropless path is O(T*k*max(d, 2f)).
    t, e, k = 256, 64, 4
    params, rng, policy, _ = _problem(0, t, e, k)
    x, kernel, wi, wo = params
    r = softmax_topk(router_logits(x, kernel), k)
    jaxpr = jax.make_jaxpr(lambda x, r: get_dispatch("dropless")(x, r, ExpertParams(wi=wi, wo=wo)).y)(x, r)
    biggest = max(int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars)
    assert biggest <= max(t * k * 2 * F, t * k * D, e * D * 2 * F) * 1.01, biggest

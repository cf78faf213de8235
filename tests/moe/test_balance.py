"""Hand-computed goldens for the balance losses of paper Eq 12-17 and the router z-loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import balance as B


def _uniform_case():
    # 1 sequence, T=4 tokens, E=4 experts, k=1, each expert chosen once, probs uniform.
    probs = jnp.full((1, 4, 4), 0.25)
    idx = jnp.array([[[0], [1], [2], [3]]])
    return probs, idx, jnp.ones(idx.shape, bool)


def test_uniform_routing_gives_exactly_one():
    probs, idx, mask = _uniform_case()
    np.testing.assert_allclose(B.expert_fraction(idx, mask, 4), [[1, 1, 1, 1]])
    assert float(B.expert_balance_loss(probs, idx, mask)) == pytest.approx(1.0, abs=1e-7)
    assert float(B.device_balance_loss(probs, idx, mask, 2)) == pytest.approx(1.0, abs=1e-7)


def test_expert_balance_per_sequence_hand_computed():
    # Sequence 0: T=2, E=3, k=2. Token choices {0,1}, {0,2}. counts = [2,1,1].
    #   f = N'/(K'T) * counts = 3/(2*2) * [2,1,1] = [1.5, .75, .75]
    #   P = mean of probs = ([.5,.3,.2] + [.4,.2,.4]) / 2 = [.45, .25, .3]
    #   sum f*P = .675 + .1875 + .225 = 1.0875
    # Sequence 1: choices {1,2}, {1,2}: counts [0,2,2] -> f = [0, 1.5, 1.5];
    #   P = ([.2,.5,.3] + [.1,.6,.3]) / 2 = [.15, .55, .3]; sum = .825 + .45 = 1.275
    # Batch mean: (1.0875 + 1.275) / 2 = 1.18125
    probs = jnp.array([[[0.5, 0.3, 0.2], [0.4, 0.2, 0.4]], [[0.2, 0.5, 0.3], [0.1, 0.6, 0.3]]])
    idx = jnp.array([[[0, 1], [0, 2]], [[1, 2], [2, 1]]])
    mask = jnp.ones(idx.shape, bool)
    np.testing.assert_allclose(B.expert_fraction(idx, mask, 3), [[1.5, 0.75, 0.75], [0, 1.5, 1.5]], rtol=1e-6)
    assert float(B.expert_balance_loss(probs, idx, mask)) == pytest.approx(1.18125, rel=1e-6)
    # Global variant: counts over both sequences [2,3,3], T=4: f = 3/(2*4)*[2,3,3] = [.75,1.125,1.125]
    #   P = mean over 4 tokens = [.3, .4, .3]; sum = .225 + .45 + .3375 = 1.0125
    assert float(B.expert_balance_loss(probs, idx, mask, scope="global")) == pytest.approx(1.0125, rel=1e-6)


def test_masked_assignments_are_not_counted():
    probs = jnp.full((1, 2, 2), 0.5)
    idx = jnp.array([[[0, 1], [0, 1]]])
    mask = jnp.array([[[True, False], [True, False]]])
    # counts [2, 0]; f = 2/(2*2)*[2,0] = [1, 0]; P = [.5,.5]; loss = 0.5
    assert float(B.expert_balance_loss(probs, idx, mask)) == pytest.approx(0.5)


def test_device_balance_hand_computed():
    # E=4 in D=2 groups {0,1},{2,3}; T=2, k=1: choices 0 and 1 (both on device 0).
    # f = 4/(1*2)*[1,1,0,0] = [2,2,0,0]; f' = mean per group = [2, 0]
    # P = mean([.4,.3,.2,.1],[.3,.3,.2,.2]) = [.35,.3,.2,.15]; P' = sum per group = [.65, .35]
    # loss = 2 * .65 = 1.3
    probs = jnp.array([[[0.4, 0.3, 0.2, 0.1], [0.3, 0.3, 0.2, 0.2]]])
    idx = jnp.array([[[0], [1]]])
    mask = jnp.ones(idx.shape, bool)
    assert float(B.device_balance_loss(probs, idx, mask, 2)) == pytest.approx(1.3, rel=1e-6)
    # With D = E the device loss is E/... per-expert: f'=f, P'=P: equals the expert loss.
    np.testing.assert_allclose(
        B.device_balance_loss(probs, idx, mask, 4), B.expert_balance_loss(probs, idx, mask), rtol=1e-6
    )
    with pytest.raises(ValueError, match="3 groups do not divide 4 experts"):
        B.device_balance_loss(probs, idx, mask, 3)


def test_balance_gradient_flows_through_probabilities_only():
    probs = jnp.array([[[0.4, 0.3, 0.2, 0.1], [0.3, 0.3, 0.2, 0.2]]])
    idx = jnp.array([[[0], [1]]])
    mask = jnp.ones(idx.shape, bool)
    g = jax.grad(lambda p: B.expert_balance_loss(p, idx, mask))(probs)
    # d/dP_i of sum f_i P_i with P_i = mean_t p: f_i / T = [2,2,0,0] / 2
    np.testing.assert_allclose(g, np.broadcast_to([1.0, 1.0, 0.0, 0.0], (1, 2, 4)), rtol=1e-6)


def test_z_loss_hand_computed():
    # logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4.
    logits = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0]])
    expected = (np.log(2.0) ** 2 + np.log(4.0) ** 2) / 2
    assert float(B.router_z_loss(logits)) == pytest.approx(expected, rel=1e-6)

"""Routing goldens: softmax gates without renormalisation, top-k, GShard's random policy, hash tables."""

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.moe import gating as R


def test_softmax_gate_values_are_raw_probabilities():
    # Hand computation: logits [ln 1, ln 2, ln 3, ln 4] -> probs [0.1, 0.2, 0.3, 0.4].
    logits = jnp.log(jnp.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    r = R.softmax_topk(logits, 2)
    np.testing.assert_array_equal(r.indices, [[3, 2], [0, 1]])
    np.testing.assert_allclose(r.weights, [[0.4, 0.3], [0.4, 0.3]], rtol=1e-6)  # not 4/7, 3/7
    np.testing.assert_allclose(r.probs.sum(-1), 1.0, rtol=1e-6)
    assert r.mask.all()


def test_renormalised_gates_sum_to_one():
    logits = jnp.log(jnp.array([[1.0, 2.0, 3.0, 4.0]]))
    r = R.softmax_topk(logits, 2, renormalize=True)
    np.testing.assert_allclose(r.weights, [[4 / 7, 3 / 7]], rtol=1e-6)


def test_router_math_is_float32():
    x = jnp.ones((3, 8), jnp.bfloat16)
    kernel = jnp.ones((8, 4), jnp.bfloat16)
    assert R.router_logits(x, kernel).dtype == jnp.float32


def test_random_second_expert_policy_keeps_with_gshard_probability():
    # g1 = 0.5, g2 = 0.125: keep probability 2 * 0.125 / 0.625 = 0.4; first choices always kept.
    probs = jnp.array([0.5, 0.125, 0.125, 0.125, 0.125])
    logits = jnp.tile(jnp.log(probs)[None], (20000, 1))
    r = R.softmax_topk(logits, 2, second_expert_policy="random", rng=jax.random.key(0))
    assert bool(r.mask[:, 0].all())
    assert abs(float(r.mask[:, 1].mean()) - 0.4) < 0.02
    np.testing.assert_array_equal(np.where(r.mask[:, 1], r.weights[:, 1], 0.0), r.weights[:, 1])
    assert float(jnp.where(r.mask[:, 1], 0.0, r.weights[:, 1]).max()) == 0.0
    # Without an rng (evaluation) the policy is greedy.
    assert R.softmax_topk(logits[:4], 2, second_expert_policy="random").mask.all()


def test_hash_routing_same_token_same_expert():
    table = jnp.asarray(R.random_hash_table(100, 8, seed=3))
    ids = jnp.array([5, 7, 5, 99, 7, 5])
    r = R.hash_route(ids, table)
    assert r.indices.shape == (6, 1) and r.probs is None
    assert r.indices[0, 0] == r.indices[2, 0] == r.indices[5, 0] == table[5]
    assert r.indices[1, 0] == r.indices[4, 0] == table[7]
    np.testing.assert_array_equal(r.weights, 1.0)
    np.testing.assert_array_equal(R.random_hash_table(100, 8, 3), R.random_hash_table(100, 8, 3))
    assert not np.array_equal(R.random_hash_table(100, 8, 3), R.random_hash_table(100, 8, 4))


def test_balanced_hash_table_is_within_ten_percent_of_mean():
    # A token-frequency sample shaped like BPE text (Zipf-Mandelbrot: p(rank) ~ 1 / (rank + 10)).
    vocab, experts = 8192, 16
    rng = np.random.default_rng(0)
    p = 1.0 / (np.arange(vocab) + 10.0)
    sample = rng.permutation(vocab)[rng.choice(vocab, size=200_000, p=p / p.sum())]
    freqs = np.bincount(sample, minlength=vocab).astype(np.float64)
    assert freqs.max() < freqs.sum() / experts, "fixture: no single token may exceed an expert's share"
    table = R.balanced_hash_table(freqs, experts, seed=0)
    loads = np.bincount(table[sample], minlength=experts)
    assert loads.max() <= 1.1 * loads.mean(), loads
    random_loads = np.bincount(R.random_hash_table(vocab, experts, 0)[sample], minlength=experts)
    assert random_loads.max() > loads.max()  # the balancing does something
    np.testing.assert_array_equal(table, R.balanced_hash_table(freqs, experts, seed=0))

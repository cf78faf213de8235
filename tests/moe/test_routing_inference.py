"""Inference-time routing controls of the §4.5 analyses: disable the top-r routed experts, drop the
shared experts; the defaults change nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.model.transformer import Transformer
from moe_jax.moe import gating as R
from moe_jax.moe.layer import MoELayer


def test_disable_top_masks_the_highest_probabilities_and_keeps_raw_gates():
    # probs [0.1, 0.2, 0.3, 0.4]: disabling the top 1 (expert 3) leaves top-2 = experts 2, 1.
    logits = jnp.log(jnp.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    r = R.softmax_topk(logits, 2, disable_top=1)
    np.testing.assert_array_equal(r.indices, [[2, 1], [1, 2]])
    np.testing.assert_allclose(r.weights, [[0.3, 0.2], [0.3, 0.2]], rtol=1e-6)  # original probabilities
    np.testing.assert_allclose(r.probs, jax.nn.softmax(logits, -1), rtol=1e-6)  # scores untouched
    r2 = R.softmax_topk(logits, 1, disable_top=3)
    np.testing.assert_array_equal(r2.indices, [[0], [3]])
    np.testing.assert_allclose(r2.weights, [[0.1], [0.1]], rtol=1e-6)


def test_disable_top_zero_is_plain_topk_and_too_many_is_an_error():
    logits = jax.random.normal(jax.random.key(0), (32, 8))
    a, b = R.softmax_topk(logits, 3), R.softmax_topk(logits, 3, disable_top=0)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.weights, b.weights)
    with pytest.raises(ValueError, match="exceeds"):
        R.softmax_topk(logits, 3, disable_top=6)


def test_disable_top_equals_topk_of_the_rest():
    logits = jax.random.normal(jax.random.key(1), (64, 16))
    r = R.softmax_topk(logits, 2, disable_top=3)
    order = np.argsort(-np.asarray(jax.nn.softmax(logits, -1)), axis=-1)
    np.testing.assert_array_equal(r.indices, order[:, 3:5])


def test_config_validation():
    with pytest.raises(ValueError, match="disable_top_experts"):
        MoEConfig(num_experts=8, top_k=2, disable_top_experts=7)
    with pytest.raises(ValueError, match="disable_top_experts"):
        MoEConfig(num_experts=8, top_k=1, router="hash", disable_top_experts=1)
    MoEConfig(num_experts=8, top_k=2, disable_top_experts=6, disable_shared=True)


def _cfg(**moe) -> ModelConfig:
    m = dict(num_experts=8, num_shared_experts=1, expert_dim=16, top_k=2)
    m.update(moe)
    return ModelConfig(
        vocab_size=64, d_model=32, num_layers=2, num_heads=2, head_dim=16, ffn_dim=32, moe=MoEConfig(**m), init_std=0.05
    )


@pytest.mark.slow
def test_layer_disable_shared_removes_exactly_the_shared_output():
    cfg = _cfg()
    layer = MoELayer(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 5, 32))
    y_full, _ = layer(x)
    layer_off = MoELayer(cfg.replace_moe(disable_shared=True), nnx.Rngs(0))  # same init
    y_off, _ = layer_off(x)
    shared = layer.shared(x.reshape(10, 32)).reshape(2, 5, 32)
    np.testing.assert_allclose(y_off, y_full - shared, atol=1e-6)


@pytest.mark.slow
def test_model_defaults_unchanged_and_routing_changes_the_logits():
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 1, 64)
    base = Transformer(_cfg(), nnx.Rngs(0))
    state = nnx.state(base)
    logits = base(tokens).logits
    explicit = Transformer(_cfg(disable_top_experts=0, disable_shared=False), nnx.Rngs(1))
    nnx.update(explicit, state)
    np.testing.assert_array_equal(explicit(tokens).logits, logits)
    for moe in (dict(disable_top_experts=2), dict(disable_shared=True, top_k=3), dict(top_k=1)):
        other = Transformer(_cfg(**moe), nnx.Rngs(1))
        nnx.update(other, state)  # same weights, different routing
        assert float(jnp.max(jnp.abs(other(tokens).logits - logits))) > 1e-6, moe

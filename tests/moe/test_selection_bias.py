"""DeepSeek-V3's auxiliary-loss-free balancing (arXiv:2412.19437 §2.1.2, Eq 16): a per-expert bias that
changes which experts are selected but not the gate values, its update rule, that it balances a skewed
router, the layer with every dispatch against the per-expert reference loop, and the config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import max_rel_err, one_layer_model

from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.moe import gating as R
from moe_jax.moe.layer import MoELayer
from moe_jax.moe.router import RouterBias

# 3 tokens, 4 experts: sigmoid scores chosen by hand; the logits are their inverses ln(s / (1 - s)).
SCORES = np.array([[0.9, 0.5, 0.2, 0.6], [0.1, 0.7, 0.3, 0.2], [0.4, 0.2, 0.5, 0.75]])
LOGITS = jnp.asarray(np.log(SCORES / (1.0 - SCORES)), jnp.float32)
BIAS = jnp.asarray([-0.5, 0.0, 0.35, 0.0], jnp.float32)


def test_bias_changes_the_selection_but_not_the_gates_by_hand():
    r = R.biased_topk(LOGITS, BIAS, 2)
    # s + b: [0.4, 0.5, 0.55, 0.6], [-0.4, 0.7, 0.65, 0.2], [-0.1, 0.2, 0.85, 0.75]: top-2, best first.
    np.testing.assert_array_equal(r.indices, [[3, 2], [1, 2], [2, 3]])
    # Gates: the un-biased scores of those experts, renormalised: 0.6/0.8, 0.2/0.8; 0.7, 0.3; 0.5/1.25, 0.75/1.25.
    np.testing.assert_allclose(r.weights, [[0.75, 0.25], [0.7, 0.3], [0.4, 0.6]], rtol=1e-6)
    raw = R.biased_topk(LOGITS, BIAS, 2, renormalize=False)
    np.testing.assert_allclose(raw.weights, [[0.6, 0.2], [0.7, 0.3], [0.5, 0.75]], rtol=1e-6)
    # Scores for the losses and the logits are those of the un-biased router.
    unbiased = R.sigmoid_topk(LOGITS, 2)
    np.testing.assert_array_equal(r.probs, unbiased.probs)
    np.testing.assert_array_equal(r.logits, unbiased.logits)
    assert r.mask.all() and r.indices.dtype == jnp.int32


def test_softmax_scores_with_a_bias_gate_with_their_probabilities():
    r = R.biased_topk(LOGITS, BIAS, 2, score="softmax", renormalize=False)
    probs = jax.nn.softmax(LOGITS, axis=-1)
    # The top-2 of probability + bias (numpy), gated by the probabilities alone.
    want = np.argsort(-(np.asarray(probs) + np.asarray(BIAS)), axis=-1, kind="stable")[:, :2]
    np.testing.assert_array_equal(r.indices, want)
    np.testing.assert_array_equal(r.weights, np.take_along_axis(np.asarray(probs), want, axis=-1))
    np.testing.assert_array_equal(r.probs, probs)


@pytest.mark.parametrize("renormalize", [True, False])
def test_a_zero_bias_routes_bitwise_like_the_unbiased_router(renormalize):
    logits = jax.random.normal(jax.random.key(0), (64, 16)) * 3.0
    zero = jnp.zeros((16,), jnp.float32)
    for score, plain in [
        ("sigmoid", R.sigmoid_topk(logits, 4, renormalize=renormalize)),
        ("softmax", R.softmax_topk(logits, 4, renormalize=renormalize)),
    ]:
        biased = R.biased_topk(logits, zero, 4, score=score, renormalize=renormalize)
        for field in ("indices", "weights", "mask", "probs", "logits"):
            np.testing.assert_array_equal(getattr(biased, field), getattr(plain, field), err_msg=f"{score} {field}")


def test_the_bias_gets_no_gradient_and_the_gates_do():
    def total_gate(logits, bias):
        return jnp.sum(R.biased_topk(logits, bias, 2, renormalize=False).weights)

    g_logits, g_bias = jax.grad(total_gate, argnums=(0, 1))(LOGITS, BIAS)
    np.testing.assert_array_equal(g_bias, np.zeros(4))
    # d sigmoid(u)/du = s (1 - s) on the selected experts only.
    chosen = np.zeros((3, 4), bool)
    np.put_along_axis(chosen, np.asarray([[3, 2], [1, 2], [2, 3]]), True, axis=-1)
    np.testing.assert_allclose(g_logits, np.where(chosen, SCORES * (1 - SCORES), 0.0), rtol=1e-5)


def test_selection_load_counts_active_choices_only():
    ids = jnp.asarray([[[0, 2], [2, -1], [3, 2]], [[1, 1], [-1, -1], [0, 3]]], jnp.int32)  # [L=2, T=3, k=2]
    load = R.selection_load(ids, 4)
    np.testing.assert_array_equal(load, [[1, 0, 3, 1], [1, 2, 0, 1]])
    assert load.dtype == jnp.int32


def test_update_rule_by_hand():
    bias = jnp.asarray([[0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], jnp.float32)
    load = jnp.asarray(
        [
            [5, 3, 4, 4],  # mean 4: overloaded -, underloaded +, exactly at the mean unchanged
            [3, 2, 2, 0],  # mean 7/4 = 1.75: 3 and 2 above it, 0 below
            [2, 2, 2, 2],  # balanced: nothing moves
        ],
        jnp.int32,
    )
    new = R.update_selection_bias(bias, load, 0.25)
    np.testing.assert_array_equal(new, [[0.25, 0.75, 0.5, 0.5], [-0.25, -0.25, -0.25, 0.25], [1.0, 1.0, 1.0, 1.0]])
    # A mean that is not an integer: q = 2, r = 1 (mean 2.2 over 5): a load of 2 is below it.
    np.testing.assert_array_equal(
        R.update_selection_bias(jnp.zeros(5), jnp.asarray([2, 2, 3, 2, 2]), 0.001),
        np.float32([0.001, 0.001, -0.001, 0.001, 0.001]),
    )
    np.testing.assert_array_equal(R.update_selection_bias(bias, load, 0.0), bias)  # gamma = 0: frozen


def test_the_update_balances_a_skewed_router():
    """Tokens whose sigmoid scores strongly prefer the first experts: a fixed router (no training),
    only the bias moves. The load's max/mean falls from about 3.5 to near 1."""
    t, e, k, speed = 512, 8, 2, 0.01
    skew = jnp.linspace(3.0, -3.0, e)  # expert 0 most preferred
    logits = jax.random.normal(jax.random.key(3), (t, e)) + skew

    def max_over_mean(bias):
        load = R.selection_load(R.biased_topk(logits, bias, k).indices[None], e)[0]
        return load.max() / load.mean()

    def step(_, bias):
        load = R.selection_load(R.biased_topk(logits, bias, k).indices[None], e)[0]
        return R.update_selection_bias(bias, load, speed)

    zero = jnp.zeros((e,), jnp.float32)
    bias = jax.jit(lambda b: jax.lax.fori_loop(0, 400, step, b))(zero)
    assert float(max_over_mean(zero)) > 3.0
    assert float(max_over_mean(bias)) < 1.15
    assert float(bias[0]) < 0 < float(bias[-1])  # preferred experts pushed down, shunned ones up


F = 32


def _model_cfg(**moe) -> ModelConfig:
    base = MoEConfig.fine_grained(8, 2, 2, 1, F, router_score="sigmoid", renormalize_topk=True)  # 15 routed, top-3
    return one_layer_model(dataclasses.replace(base, **{"selection_bias": True, "bias_update_speed": 0.001, **moe}), F)


def _layer_with_bias(cfg: ModelConfig, bias) -> MoELayer:
    layer = MoELayer(cfg, nnx.Rngs(0))
    layer.router.bias[...] = jnp.asarray(bias, jnp.float32)
    return layer


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_layer_with_a_bias_matches_the_reference_loop(dispatch, score):
    x = jax.random.normal(jax.random.key(1), (2, 12, 16))
    bias = jnp.linspace(-0.3, 0.3, 15)
    ref_layer = _layer_with_bias(_model_cfg(dispatch="reference", router_score=score), bias)
    # A capacity that drops nothing, so both compute every assignment.
    layer = _layer_with_bias(_model_cfg(dispatch=dispatch, capacity_factor=8.0, router_score=score), bias)
    y, aux = layer(x)
    y_ref, aux_ref = ref_layer(x)
    assert max_rel_err(y, y_ref) <= 1e-5
    np.testing.assert_array_equal(aux.expert_ids, aux_ref.expert_ids)
    # The bias did change the routing: the un-biased router picks other experts for some tokens.
    logits = R.router_logits(x.reshape(-1, 16), layer.router.kernel[...])
    plain = R.sigmoid_topk(logits, 3) if score == "sigmoid" else R.softmax_topk(logits, 3, renormalize=True)
    assert not np.array_equal(aux.expert_ids, plain.indices)


def test_the_bias_is_state_not_a_parameter():
    layer = MoELayer(_model_cfg(), nnx.Rngs(0))
    params = nnx.state(layer, nnx.Param)
    bias = nnx.state(layer, RouterBias)
    assert "bias" not in params["router"] and bias["router"]["bias"][...].shape == (15,)
    assert bias["router"]["bias"].get_metadata()["axes"] == ("router_experts",)
    np.testing.assert_array_equal(bias["router"]["bias"][...], np.zeros(15))
    # A model without it has no such variable at all (its module tree and checkpoints are unchanged).
    assert not jax.tree.leaves(
        nnx.state(MoELayer(_model_cfg(selection_bias=False, bias_update_speed=0.0), nnx.Rngs(0)), RouterBias)
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(bias_update_speed=0.001), "set MoEConfig.selection_bias=True"),
        (dict(selection_bias=True, bias_update_speed=-1.0), "must be a finite number >= 0"),
        (dict(selection_bias=True, bias_update_speed=float("nan")), "must be a finite number >= 0"),
        (dict(selection_bias=True, router="hash", top_k=1), "set router='softmax'"),
        (dict(selection_bias=True, second_expert_policy="random"), "second_expert_policy='greedy'"),
        (dict(selection_bias=True, disable_top_experts=1), "disable_top_experts=0"),
    ],
)
def test_config_errors_name_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        MoEConfig(**{"num_experts": 8, "top_k": 2, "expert_dim": 16, **overrides})


def test_selection_bias_is_allowed_with_either_score_and_frozen():
    for score in ("sigmoid", "softmax"):
        MoEConfig(num_experts=8, top_k=2, expert_dim=16, router_score=score, selection_bias=True)
    MoEConfig(num_experts=8, top_k=2, expert_dim=16, selection_bias=True, bias_update_speed=0.0)  # V3's last phase


def test_with_group_limited_routing_the_bias_also_chooses_the_groups():
    """V3 (arXiv:2412.19437 §2.1.2) scores the groups with the biased scores too: a large bias on one
    expert pulls every token into that expert's group, while the gates stay the un-biased scores."""
    cfg = _model_cfg(topk_groups=1, num_expert_groups=3)  # 15 routed experts in 3 groups of 5, top-3
    bias = jnp.zeros(15).at[12].set(10.0)
    layer = _layer_with_bias(cfg, bias)
    x = jax.random.normal(jax.random.key(2), (2, 12, 16)).reshape(-1, 16)
    routing = layer.router(x, None, None)
    assert np.all(np.asarray(routing.indices) >= 10) and np.all(np.asarray(routing.indices)[:, 0] == 12)
    logits = R.router_logits(x, layer.router.kernel[...])
    expected = R.group_limited_topk(
        logits, 3, num_groups=3, topk_groups=1, score="sigmoid", renormalize=True, bias=bias
    )
    np.testing.assert_array_equal(routing.indices, expected.indices)
    np.testing.assert_array_equal(routing.weights, expected.weights)
    scores = jax.nn.sigmoid(logits)
    gates = jnp.take_along_axis(scores, routing.indices, axis=-1)
    np.testing.assert_allclose(routing.weights, gates / gates.sum(-1, keepdims=True), rtol=1e-6)

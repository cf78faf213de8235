"""Expert-choice routing (Zhou et al. 2022, arXiv:2202.09368): hand-computed goldens, the MoE layer
against the per-expert reference loop and an independent numpy selection, scopes and causal leakage,
stats, config errors, the KV-cache refusal and the parameter count (issue 20)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_tree_close, max_rel_err, one_layer_model
from layer_testlib import layer_grads

from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.layers.mlp import swiglu
from moe_jax.model.params import count_params
from moe_jax.model.transformer import KVCache, Transformer
from moe_jax.moe import gating as R
from moe_jax.moe.layer import MoELayer

# 4 tokens, 3 experts: softmax scores chosen by hand (rows sum to 1, so the logits ln S give them back).
SCORES = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.7, 0.1, 0.2]])
LOGITS = jnp.asarray(np.log(SCORES), jnp.float32)


def test_capacity_is_the_rounded_up_share_capped_at_the_group():
    assert R.expert_choice_capacity(16, 2, 8, 1.0) == 4  # 16 * 2 / 8 exactly
    assert R.expert_choice_capacity(4, 1, 3, 1.0) == 2  # ceil(4/3)
    assert R.expert_choice_capacity(4, 1, 3, 0.5) == 1  # ceil(2/3)
    assert R.expert_choice_capacity(4, 4, 4, 2.0) == 4  # 8 capped at the 4 tokens
    assert R.expert_choice_capacity(1, 1, 64, 0.01) == 1  # never below one token


def test_each_expert_takes_its_top_tokens_by_hand():
    r = R.expert_choice(LOGITS, 1)  # C = ceil(1 * 4 * 1 / 3) = 2 tokens per expert over the batch
    # Expert 0's scores (.5, .1, .2, .7) -> tokens 3, 0; expert 1 (.3, .6, .2, .1) -> 1, 0;
    # expert 2 (.2, .3, .6, .2) -> 2, 1. Columns: the chosen experts best first, then the others.
    np.testing.assert_array_equal(r.indices, [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 2, 1]])
    np.testing.assert_array_equal(r.mask, [[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]])
    np.testing.assert_allclose(r.weights, [[0.5, 0.3, 0], [0.6, 0.3, 0], [0.6, 0, 0], [0.7, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(r.probs, SCORES, rtol=1e-6)
    assert r.indices.dtype == jnp.int32 and int(r.mask.sum()) == 3 * 2  # E * C assignments


def test_per_sequence_selection_by_hand():
    r = R.expert_choice(LOGITS, 1, num_groups=2)  # sequences (tokens 0, 1) and (2, 3): C = ceil(2/3) = 1
    # Sequence 0: expert 0 -> token 0 (.5 > .1), expert 1 -> token 1, expert 2 -> token 1 (.3 > .2).
    # Sequence 1: expert 0 -> token 3 (.7 > .2), expert 1 -> token 2 (.2 > .1), expert 2 -> token 2.
    chosen = [sorted(np.asarray(r.indices[t])[np.asarray(r.mask[t])].tolist()) for t in range(4)]
    assert chosen == [[0], [1, 2], [1, 2], [0]]
    np.testing.assert_allclose(r.weights[:, :2], [[0.5, 0], [0.6, 0.3], [0.6, 0.2], [0.7, 0]], rtol=1e-6)


def test_a_token_may_get_no_expert():
    r = R.expert_choice(LOGITS, 1, capacity_factor=0.5)  # C = ceil(0.5 * 4 / 3) = 1
    # Experts 0, 1, 2 take tokens 3 (.7), 1 (.6) and 2 (.6); token 0 gets none.
    np.testing.assert_array_equal(r.mask.sum(-1), [0, 1, 1, 1])
    assert float(r.weights[0].sum()) == 0.0


def test_equal_scores_go_to_the_earlier_token():
    r = R.expert_choice(jnp.zeros((4, 2)), 1)  # every score 0.5; C = ceil(4 / 2) = 2
    np.testing.assert_array_equal(r.mask.sum(-1), [2, 2, 0, 0])


def test_gradient_flows_through_the_chosen_scores_only():
    logits = jax.random.normal(jax.random.key(0), (6, 4))
    a = jax.random.normal(jax.random.key(1), (6, 4))  # a weight per (token, expert id)
    picked = np.zeros((6, 4), bool)
    r = R.expert_choice(logits, 2)
    for t in range(6):
        picked[t, np.asarray(r.indices[t])[np.asarray(r.mask[t])]] = True

    def through_routing(lg):
        r = R.expert_choice(lg, 2)
        return jnp.sum(r.weights * jnp.take_along_axis(a, r.indices, axis=-1))

    def fixed_selection(lg):
        return jnp.sum(jnp.where(picked, jax.nn.softmax(lg, axis=-1), 0.0) * a)

    np.testing.assert_allclose(jax.grad(through_routing)(logits), jax.grad(fixed_selection)(logits), rtol=1e-5)


def test_groups_must_divide_the_tokens():
    with pytest.raises(ValueError, match="3 selection groups do not divide the 4 tokens"):
        R.expert_choice(LOGITS, 1, num_groups=3)


# ---- the MoE layer ----

F = 32


def _model_cfg(**moe) -> ModelConfig:
    base = MoEConfig(num_experts=8, num_shared_experts=1, top_k=2, expert_dim=F, router="expert_choice")
    return one_layer_model(dataclasses.replace(base, expert_balance_alpha=0.01, device_balance_alpha=0.05, **moe), F)


def _inputs():
    return jax.random.normal(jax.random.key(1), (2, 12, 16))  # 2 sequences of 12: C = 12 * 2 / 8 = 3


def _numpy_expert_choice(layer: MoELayer, x: np.ndarray, groups: int) -> np.ndarray:
    """The routed output by a plain loop: per group and expert, its C best tokens by softmax score."""
    xf = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    logits = xf @ np.asarray(layer.router.kernel[...], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    t, e = probs.shape
    tg = t // groups
    cap = min(tg, int(np.ceil(layer.cfg.expert_choice_capacity_factor * tg * layer.cfg.top_k / e)))
    y = np.zeros_like(xf)
    for i in range(e):
        ffn = np.asarray(swiglu(jnp.asarray(x).reshape(t, -1), layer.wi[i], layer.wo[i]), np.float64)  # every token
        for g in range(groups):
            for tok in g * tg + np.argsort(-probs[g * tg : (g + 1) * tg, i], kind="stable")[:cap]:
                y[tok] += probs[tok, i] * ffn[tok]
    return y


@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_layer_is_the_per_expert_loop(scope):
    cfg = _model_cfg(num_shared_experts=0, dispatch="reference", expert_choice_scope=scope)
    layer, x = MoELayer(cfg, nnx.Rngs(0)), _inputs()
    y, aux = layer(x)
    expected = _numpy_expert_choice(layer, np.asarray(x), 2 if scope == "sequence" else 1)
    assert max_rel_err(y.reshape(-1, 16), expected) <= 1e-5
    assert aux.expert_ids.shape == (24, 8)
    np.testing.assert_array_equal(aux.stats.tokens_per_expert, np.full(8, 6.0))  # 3 per sequence or 6 of 24


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_dispatches_match_the_reference_loop(dispatch):
    x, results = _inputs(), {}
    for d in ("reference", dispatch):
        # capacity: ceil(1.25 * T * E / E) slots, more than any expert takes
        results[d] = layer_grads(_model_cfg(dispatch=d), x)
    (_, (y_ref, aux_ref)), g_ref = results["reference"]
    (_, (y, aux)), g = results[dispatch]
    assert max_rel_err(y, y_ref) <= 1e-5
    assert_tree_close(g, g_ref, 1e-5)  # every parameter (the router kernel included) and the input
    assert float(aux.stats.dropped_fraction) == 0.0
    assert float(jnp.abs(g[0]["router"]["kernel"][...]).max()) > 0.0


def test_capacity_dispatch_below_the_expert_choice_load_drops_and_counts():
    cfg = _model_cfg(num_shared_experts=0, dispatch="capacity", capacity_factor=0.1)  # ceil(0.1 * 24) = 3 slots
    _, aux = MoELayer(cfg, nnx.Rngs(0))(_inputs())
    np.testing.assert_allclose(aux.stats.dropped_fraction, 0.5)  # each expert took 6 tokens, computes 3
    np.testing.assert_array_equal(aux.stats.tokens_per_expert, np.full(8, 3.0))


def test_balanced_by_construction_no_loss_and_the_stats():
    cfg = _model_cfg()
    layer, x = MoELayer(cfg, nnx.Rngs(0)), _inputs()
    _, aux = layer(x)
    assert float(aux.losses.total) == 0.0  # the balance alphas are ignored: the load is C per expert
    s = aux.stats
    assert (float(s.max_load), float(s.load_cv), float(s.dead_experts)) == (1.0, 0.0, 0.0)
    routing = R.expert_choice(R.router_logits(x.reshape(-1, 16), layer.router.kernel[...]), 2, num_groups=2)
    per_token = np.asarray(routing.mask.sum(-1))
    np.testing.assert_allclose(s.unrouted_fraction, np.mean(per_token == 0), rtol=1e-6)
    mass = np.asarray(jnp.sum(routing.weights, -1)).mean()  # summed scores of the experts that took the token
    np.testing.assert_allclose(s.topk_mass, mass, rtol=1e-5)
    assert 0.0 < float(s.router_entropy_norm) <= 1.0
    softmax = MoELayer(cfg.replace_moe(router="softmax"), nnx.Rngs(0))(x)[1].stats
    assert float(softmax.unrouted_fraction) == 0.0


def test_scope_sequence_isolates_sequences_and_both_scopes_leak_the_future():
    x = _inputs()
    other = x.at[1].set(jax.random.normal(jax.random.key(5), (12, 16)))  # a different second sequence
    later = x.at[0, -1].set(30.0 * jax.random.normal(jax.random.key(6), (16,)))  # seq 0's last token
    for scope, isolated in (("sequence", True), ("batch", False)):
        layer = MoELayer(_model_cfg(num_shared_experts=0, expert_choice_scope=scope), nnx.Rngs(0))
        y = layer(x)[0]
        same = np.allclose(layer(other)[0][0], y[0], rtol=0, atol=0)
        assert same == isolated, scope
        # Causal leakage: changing the last token of sequence 0 changes an earlier token's output.
        assert not np.array_equal(layer(later)[0][0, :-1], y[0, :-1]), scope


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_experts": 0, "num_shared_experts": 2}, "num_experts=0 \\(shared experts only\\): set num_experts > 0"),
        ({"router_score": "sigmoid"}, "set router_score='softmax'"),
        ({"renormalize_topk": True}, "set renormalize_topk=False"),
        ({"second_expert_policy": "random"}, "set second_expert_policy='greedy'"),
        ({"router_z_loss_alpha": 1e-3}, "set router_z_loss_alpha=0"),
        ({"disable_top_experts": 1}, "needs softmax routing"),
        ({"expert_choice_scope": "document"}, "expert_choice_scope='document' is not one of"),
        ({"expert_choice_capacity_factor": 0.0}, "expert_choice_capacity_factor=0.0 must be a finite number > 0"),
    ],
)
def test_config_errors_name_the_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{"num_experts": 8, "top_k": 2, "router": "expert_choice", **fields})


def test_kv_cached_decoding_is_refused_and_the_full_forward_runs():
    cfg = _model_cfg()
    model = Transformer(cfg, nnx.Rngs(0))
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    out = model(tokens)
    assert np.isfinite(np.asarray(out.logits)).all() and out.expert_ids.shape == (1, 16, 8)
    with pytest.raises(ValueError, match="use_cache=False"):
        model(tokens[:, :1], cache=KVCache.init(cfg, 2, 8))


def test_activated_parameters_count_the_average_experts_per_token():
    token_choice = count_params(_model_cfg().replace_moe(router="softmax"), 64)
    ec = count_params(_model_cfg(), 64)
    routed = ec.by_category["routed_experts"]
    assert ec.total == token_choice.total and ec.activated == token_choice.activated  # 2 of 8 on average
    double = count_params(_model_cfg(expert_choice_capacity_factor=2.0), 64)
    assert double.activated == ec.activated + routed * 2 // 8
    assert _model_cfg(expert_choice_capacity_factor=8.0).moe.routed_per_token == 8.0  # capped at E


@pytest.mark.slow
def test_expert_choice_trains_and_logs_its_stats(train_cache, tmp_path):
    from helpers import tiny_model, tiny_train

    from moe_jax.parallel import MeshConfig
    from moe_jax.train.loop import train
    from moe_jax.train.metrics import read_metrics

    model = tiny_model(router="expert_choice")  # 1 shared + 7 routed, 1 on average
    cfg = tiny_train(train_cache, steps=20, eval_every=20, checkpoint_every=20)
    train(tmp_path, model, cfg, MeshConfig(data=-1), progress=False)
    steps = [r for r in read_metrics(tmp_path) if "ce" in r]
    assert steps[-1]["ce"] < steps[0]["ce"] - 0.3, (steps[0]["ce"], steps[-1]["ce"])
    last = steps[-1]
    assert last["expert_balance"] == 0.0 and last["moe/mean_max_load"] == 1.0
    assert 0.0 <= last["moe/mean_unrouted_fraction"] < 1.0 and "moe/layer1/unrouted_fraction" in last

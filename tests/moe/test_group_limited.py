"""Group-limited routing (DeepSeek-V2 device-limited, arXiv:2405.04434 §2.1.3; DeepSeek-V3 node-limited,
arXiv:2412.19437 §2.1.2) and V2's communication balance loss (§2.1.4, Eq 29-31): hand-computed goldens,
a naive per-token loop, the layer against the per-expert reference loop, expert parallelism against one
device, the per-token device bound, config errors and the export refusal."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_tree_close, max_rel_err, one_layer_model
from layer_testlib import layer_grads

from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.moe import balance
from moe_jax.moe import gating as R
from moe_jax.moe.layer import MoELayer

# 2 tokens, 6 experts in 3 groups of 2: softmax probabilities chosen by hand (logits = log p).
PROBS = np.array([[0.05, 0.30, 0.25, 0.20, 0.10, 0.10], [0.36, 0.02, 0.21, 0.19, 0.12, 0.10]])
LOGITS = jnp.asarray(np.log(PROBS), jnp.float32)


def _route(logits, k=2, **kw):
    return R.group_limited_topk(logits, k, **{"num_groups": 3, "topk_groups": 1, **kw})


def test_group_scores_by_hand():
    # Groups {0,1}, {2,3}, {4,5}: max (V2) and the sum of the top 2 (V3).
    np.testing.assert_allclose(R.group_scores(jnp.asarray(PROBS), 3, "max"), [[0.30, 0.25, 0.10], [0.36, 0.21, 0.12]])
    np.testing.assert_allclose(
        R.group_scores(jnp.asarray(PROBS), 3, "top2_sum"), [[0.35, 0.45, 0.20], [0.38, 0.40, 0.22]], rtol=1e-6
    )


def test_softmax_device_limited_top1_group_by_hand():
    r = _route(LOGITS)  # V2: the group with the highest expert; token 0 -> {0,1}, token 1 -> {0,1}
    np.testing.assert_array_equal(r.indices, [[1, 0], [0, 1]])
    # Gates: the softmax over all six experts (not renormalised over the kept group).
    np.testing.assert_allclose(r.weights, [[0.30, 0.05], [0.36, 0.02]], rtol=1e-5)
    np.testing.assert_allclose(r.probs, PROBS, rtol=1e-5)
    assert r.mask.all() and r.indices.dtype == jnp.int32
    # Unrestricted top-2 of token 0 would be experts 1 and 2 (two groups).
    np.testing.assert_array_equal(R.softmax_topk(LOGITS, 2).indices[0], [1, 2])


def test_top2_sum_group_score_picks_other_groups_by_hand():
    r = _route(LOGITS, group_score="top2_sum")  # V3's score: token 0 -> {2,3} (0.45), token 1 -> {2,3} (0.40)
    np.testing.assert_array_equal(r.indices, [[2, 3], [2, 3]])
    np.testing.assert_allclose(r.weights, [[0.25, 0.20], [0.21, 0.19]], rtol=1e-5)
    renorm = _route(LOGITS, group_score="top2_sum", renormalize=True)
    np.testing.assert_allclose(renorm.weights, [[0.25 / 0.45, 0.20 / 0.45], [0.21 / 0.40, 0.19 / 0.40]], rtol=1e-5)


def test_two_of_three_groups_by_hand():
    r = _route(LOGITS, k=3, topk_groups=2)  # max: token 0 keeps {0,1},{2,3}; token 1 keeps {0,1},{2,3}
    np.testing.assert_array_equal(r.indices, [[1, 2, 3], [0, 2, 3]])
    np.testing.assert_allclose(r.weights, [[0.30, 0.25, 0.20], [0.36, 0.21, 0.19]], rtol=1e-5)


def test_sigmoid_node_limited_with_selection_bias_by_hand():
    scores = np.array([[0.9, 0.5, 0.2, 0.6], [0.1, 0.7, 0.3, 0.65]])
    logits = jnp.asarray(np.log(scores / (1 - scores)), jnp.float32)
    kw = dict(num_groups=2, topk_groups=1, score="sigmoid", renormalize=True)
    r = R.group_limited_topk(logits, 2, **kw)  # max: token 0 -> {0,1} (0.9), token 1 -> {0,1} (0.7)
    np.testing.assert_array_equal(r.indices, [[0, 1], [1, 0]])
    np.testing.assert_allclose(r.weights, [[0.9 / 1.4, 0.5 / 1.4], [0.7 / 0.8, 0.1 / 0.8]], rtol=1e-5)
    np.testing.assert_allclose(r.probs, scores / scores.sum(1, keepdims=True), rtol=1e-5)
    v3 = R.group_limited_topk(logits, 2, **kw, group_score="top2_sum")  # token 1 -> {2,3} (0.95 > 0.8)
    np.testing.assert_array_equal(v3.indices[1], [3, 2])
    np.testing.assert_allclose(v3.weights[1], [0.65 / 0.95, 0.3 / 0.95], rtol=1e-5)
    # A selection bias of 0.8 on expert 2 moves token 0 to group {2,3}; the gates stay unbiased scores.
    biased = R.group_limited_topk(logits, 2, **kw, bias=jnp.array([0.0, 0.0, 0.8, 0.0]))
    np.testing.assert_array_equal(biased.indices[0], [2, 3])
    np.testing.assert_allclose(biased.weights[0], [0.25, 0.75], rtol=1e-5)


def _naive(logits, k, num_groups, topk_groups, group_score, score, renormalize, bias):
    """Per-token loop in float64 numpy: scores, group scores, kept groups, top-k among their experts."""
    logits = np.asarray(logits, np.float64)
    if score == "softmax":
        s = np.exp(logits - logits.max(1, keepdims=True))
        s /= s.sum(1, keepdims=True)
    else:
        s = 1 / (1 + np.exp(-logits))
    indices, gates = [], []
    size = logits.shape[1] // num_groups
    for row in s:
        c = row + bias
        groups = [np.sort(c[g * size : (g + 1) * size])[::-1] for g in range(num_groups)]
        a = [grp[0] if group_score == "max" else grp[0] + grp[1] for grp in groups]
        kept = np.argsort(-np.asarray(a), kind="stable")[:topk_groups]
        candidates = [i for g in kept for i in range(g * size, (g + 1) * size)]
        chosen = sorted(candidates, key=lambda i: -c[i])[:k]
        g = row[chosen]
        indices.append(chosen)
        gates.append(g / g.sum() if renormalize else g)
    return np.array(indices), np.array(gates)


@pytest.mark.parametrize(
    "score, group_score, renormalize, topk_groups, with_bias",
    [
        ("softmax", "max", False, 2, False),
        ("softmax", "top2_sum", True, 1, False),
        ("sigmoid", "top2_sum", True, 2, True),
        ("sigmoid", "max", False, 3, True),
    ],
)
def test_matches_a_naive_per_token_loop(score, group_score, renormalize, topk_groups, with_bias):
    logits = 2.0 * jax.random.normal(jax.random.key(0), (64, 16))
    bias = np.asarray(0.1 * jax.random.normal(jax.random.key(1), (16,))) if with_bias else np.zeros(16)
    r = R.group_limited_topk(
        logits,
        3,
        num_groups=4,
        topk_groups=topk_groups,
        group_score=group_score,
        score=score,
        renormalize=renormalize,
        bias=jnp.asarray(bias, jnp.float32) if with_bias else None,
    )
    indices, gates = _naive(logits, 3, 4, topk_groups, group_score, score, renormalize, bias)
    np.testing.assert_array_equal(r.indices, indices)
    np.testing.assert_allclose(r.weights, gates, rtol=1e-5, atol=1e-7)
    groups = np.asarray(r.indices) // 4
    assert max(len(set(row)) for row in groups) <= topk_groups


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_keeping_every_group_is_plain_topk_bitwise(score):
    logits = jax.random.normal(jax.random.key(2), (32, 12))
    r = R.group_limited_topk(logits, 4, num_groups=3, topk_groups=3, score=score, renormalize=True)
    plain = R.softmax_topk(logits, 4, renormalize=True) if score == "softmax" else R.sigmoid_topk(logits, 4)
    for name in ("indices", "weights", "mask", "probs", "logits"):
        np.testing.assert_array_equal(getattr(r, name), getattr(plain, name), err_msg=name)


def test_routing_errors_name_the_fix():
    with pytest.raises(ValueError, match="raise topk_groups or lower top_k"):
        R.group_limited_topk(LOGITS, 3, num_groups=3, topk_groups=1)
    with pytest.raises(ValueError, match="3 groups must divide the 4"):
        R.group_scores(jnp.zeros((1, 4)), 3)
    with pytest.raises(ValueError, match="use group_score='max' or fewer groups"):
        R.group_scores(jnp.zeros((1, 4)), 4, "top2_sum")


# ---- V2's communication balance loss (Eq 29-31) ----------------------------------------------------


def test_communication_balance_loss_by_hand():
    # 1 sequence of 2 tokens, 4 experts in D = 2 groups, M = 2. Token 0 -> experts 0, 1 (group 0 only);
    # token 1 -> experts 0, 2 (groups 0 and 1). Counts [2, 1]; f'' = D/(M T) counts = [1, 0.5].
    probs = jnp.array([[[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]]])
    idx = jnp.array([[[0, 1], [0, 2]]])
    mask = jnp.ones(idx.shape, bool)
    np.testing.assert_allclose(balance.group_fraction(idx, mask, 4, 2, 2), [[1.0, 0.5]])
    # P = [0.25, 0.2, 0.15, 0.4]; P'' = [0.45, 0.55]; L = 1 * 0.45 + 0.5 * 0.55.
    loss = balance.communication_balance_loss(probs, idx, mask, 2, 2)
    np.testing.assert_allclose(loss, 0.725, rtol=1e-6)
    assert loss.dtype == jnp.float32
    # An inactive assignment sends nothing: token 1 no longer reaches group 1.
    masked = balance.communication_balance_loss(probs, idx, mask.at[0, 1, 1].set(False), 2, 2)
    np.testing.assert_allclose(masked, 0.45, rtol=1e-6)
    # Global scope over one sequence is the per-sequence value; f'' carries no gradient.
    np.testing.assert_allclose(balance.communication_balance_loss(probs, idx, mask, 2, 2, "global"), 0.725, rtol=1e-6)
    grad = jax.grad(lambda p: balance.communication_balance_loss(p, idx, mask, 2, 2))(probs)
    np.testing.assert_allclose(grad[0, 0], [0.5, 0.5, 0.25, 0.25], rtol=1e-6)  # f''_group / T


def test_communication_balance_loss_is_one_for_uniform_routing():
    # 8 experts in D = 4 groups of 2, M = 2: token t uses groups t % 4 and (t + 1) % 4; uniform scores.
    t = np.arange(8)
    idx = jnp.asarray(np.stack([2 * (t % 4), 2 * ((t + 1) % 4) + 1], -1)[None].repeat(2, 0))
    probs = jnp.full((2, 8, 8), 1 / 8)
    mask = jnp.ones(idx.shape, bool)
    np.testing.assert_allclose(balance.group_fraction(idx, mask, 8, 4, 2), np.ones((2, 4)))
    for scope in ("sequence", "global"):
        np.testing.assert_allclose(balance.communication_balance_loss(probs, idx, mask, 4, 2, scope), 1.0, rtol=1e-6)


# ---- the layer ----------------------------------------------------------------------------------


def _cfg(**moe) -> ModelConfig:
    base = dict(
        num_experts=16,
        num_shared_experts=1,
        expert_dim=8,
        top_k=4,
        topk_groups=2,
        num_expert_groups=4,
        expert_balance_alpha=0.003,
        device_balance_alpha=0.05,
        num_device_groups=4,
        comm_balance_alpha=0.02,
        router_z_loss_alpha=1e-3,
    )
    return one_layer_model(MoEConfig(**{**base, **moe}))


X = jax.random.normal(jax.random.key(1), (8, 4, 16))  # 8 sequences: one per device of a data axis


@functools.cache
def _one_device():
    """The dropless layer with G = 4 configured on one device (shared by the tests below)."""
    return layer_grads(_cfg(), X)


@pytest.mark.parametrize("dispatch", ["reference", "capacity"])
def test_group_limited_layer_matches_reference_loop(dispatch):
    (_, (y_ref, aux_ref)), g_ref = layer_grads(_cfg(dispatch=dispatch, capacity_factor=64.0), X)
    (_, (y, aux)), g = _one_device()
    assert max_rel_err(y, y_ref) <= 1e-5
    assert_tree_close(g, g_ref, 1e-5)
    assert_tree_close(aux.losses, aux_ref.losses, 1e-6)
    assert float(aux.losses.comm_balance) > 0.0 and float(jnp.abs(g[0]["router"]["kernel"][...]).max()) > 0.0
    groups = np.asarray(aux.expert_ids) // 4
    assert max(len(set(row)) for row in groups) <= 2


def test_comm_balance_is_alpha_times_the_loss_of_the_routing():
    layer = MoELayer(_cfg(), nnx.Rngs(0))
    (_, (_, aux)), _ = _one_device()
    routing = layer.router(X.reshape(-1, 16), None, None)
    expected = balance.communication_balance_loss(
        routing.probs.reshape(8, 4, -1), routing.indices.reshape(8, 4, -1), routing.mask.reshape(8, 4, -1), 4, 2
    )
    np.testing.assert_allclose(aux.losses.comm_balance, 0.02 * expected, rtol=1e-6)
    losses = MoELayer(_cfg(comm_balance_alpha=0.0), nnx.Rngs(0))._losses(routing, 8, 4)  # the same routing
    assert float(losses.comm_balance) == 0.0
    np.testing.assert_allclose(losses.total, aux.losses.total - aux.losses.comm_balance, rtol=1e-6)


@pytest.mark.parametrize("spec, scheme", [("expert:8", "ring"), ("data:2,expert:4", "all_to_all")])
def test_group_limited_layer_under_expert_parallelism_matches_one_device(spec, scheme):
    from moe_jax.parallel import MeshConfig, build_mesh

    (loss0, (y0, aux0)), g0 = _one_device()
    with jax.set_mesh(build_mesh(MeshConfig.from_string(spec))):
        # G = 4 configured: the same routing anywhere
        (loss, (y, aux)), g = layer_grads(_cfg(expert_parallel=scheme), X)
    assert max_rel_err(loss, loss0) <= 1e-5 and max_rel_err(y, y0) <= 1e-5
    assert_tree_close(g, g0, 1e-5)
    assert_tree_close(aux.losses, aux0.losses, 1e-6)


def test_groups_follow_the_expert_axis_and_bound_the_devices_per_token():
    from moe_jax.parallel import MeshConfig, build_mesh

    follow = _cfg(num_expert_groups=0)  # G = the expert-axis size, read per call
    with jax.set_mesh(build_mesh(MeshConfig.from_string("data:2,expert:4"))):
        (_, (y, aux)), g = layer_grads(follow, X)
    (_, (y4, aux4)), g4 = _one_device()  # the same as G = 4 configured, on one device
    assert max_rel_err(y, y4) <= 1e-5 and np.array_equal(aux.expert_ids, aux4.expert_ids)
    assert_tree_close(g, g4, 1e-5)
    # Device j owns experts [4j, 4j + 4) (16 experts over EP = 4): every token reaches <= M = 2 devices,
    # whereas unrestricted top-4 routing reaches more. On one device G = 1: no restriction (plain top-k).
    devices = lambda ids: max(len(set(row)) for row in np.asarray(ids) // 4)
    assert devices(aux.expert_ids) <= 2
    layer = MoELayer(follow, nnx.Rngs(0))
    free = R.softmax_topk(R.router_logits(X.reshape(-1, 16), layer.router.kernel[...]), 4)
    assert devices(free.indices) > 2
    np.testing.assert_array_equal(layer.router(X.reshape(-1, 16), None, None).indices, free.indices)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"topk_groups": -1}, "must be >= 0"),
        ({"topk_groups": 0, "num_expert_groups": 4}, "set topk_groups"),
        ({"topk_groups": 0, "comm_balance_alpha": 0.02}, "set topk_groups"),
        ({"router": "hash", "top_k": 1}, "set topk_groups=0 or router='softmax'"),
        ({"second_expert_policy": "random"}, "second_expert_policy='greedy'"),
        ({"disable_top_experts": 1}, "disable_top_experts=0"),
        ({"num_expert_groups": 3}, "must divide num_experts=16"),
        ({"num_expert_groups": 4, "topk_groups": 5}, "be >= topk_groups=5"),
        ({"topk_groups": 1, "top_k": 5}, "raise topk_groups or lower top_k"),
        ({"num_expert_groups": 16, "group_score": "top2_sum", "top_k": 2}, "use group_score='max'"),
        ({"group_score": "mean"}, r"group_score='mean' is not one of \('max', 'top2_sum'\)"),
    ],
)
def test_config_errors_name_the_fix(fields, message):
    base = dict(num_experts=16, top_k=4, topk_groups=2, num_expert_groups=4)
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{**base, **fields})


def test_mesh_groups_that_cannot_hold_top_k_name_the_fix():
    from moe_jax.parallel import MeshConfig, build_mesh

    cfg = _cfg(num_expert_groups=0, topk_groups=1, top_k=4)  # 16 experts over EP = 8: 2 per group < 4
    layer = MoELayer(cfg, nnx.Rngs(0))
    with jax.set_mesh(build_mesh(MeshConfig.from_string("expert:8"))):
        with pytest.raises(ValueError, match="set MoEConfig.num_expert_groups, topk_groups or top_k"):
            jax.jit(lambda x: layer(x)[0])(jnp.zeros((8, 2, 16)))


def test_defaults_leave_routing_unlimited():
    m = MoEConfig()
    assert (m.topk_groups, m.num_expert_groups, m.group_score, m.comm_balance_alpha) == (0, 0, "max", 0.0)


def test_export_refuses_group_limited_models():
    from moe_jax.export.layout import DEEPSEEK, QWEN2_MOE, LayoutError, check_exportable

    cfg = _cfg(comm_balance_alpha=0.0)
    for layout in (DEEPSEEK, QWEN2_MOE):
        with pytest.raises(LayoutError, match="no exported architecture holds this softmax model"):
            check_exportable(cfg, layout)
    check_exportable(_cfg(topk_groups=0, num_expert_groups=0, comm_balance_alpha=0.0))  # the plain model exports


def test_params_table_counts_group_limited_models_like_plain_ones(capsys):
    from moe_jax import cli

    def counts(*bindings):
        assert cli.main(["params", "--model=deepseekmoe_tiny", *bindings, "--json"]) == 0
        return capsys.readouterr().out

    groups = ["--gin.MoEConfig.topk_groups=3", "--gin.MoEConfig.num_expert_groups=7"]
    assert counts(*groups, "--gin.MoEConfig.comm_balance_alpha=0.02") == counts()  # no parameters added


def test_plan_names_mesh_groups_that_cannot_hold_top_k(capsys):
    from moe_jax.train import plan

    args = ["--model=gshard_tiny", "--gin_file=runs/proxy_cpu.gin", "--batch_size=8", "--seq_len=32"]
    # 16 experts over the expert axis of 8: groups of 2 cannot hold top-3 with topk_groups=1.
    bindings = ["--gin.MoEConfig.topk_groups=1", "--gin.BASE_TOP_K=3"]
    assert plan.main([*args, "--mesh=data:1,expert:8", *bindings]) == 2
    assert "set MoEConfig.num_expert_groups, topk_groups or top_k" in capsys.readouterr().err


@pytest.mark.slow
def test_train_step_logs_the_communication_balance_loss():
    import optax

    from moe_jax.model.transformer import Transformer
    from moe_jax.train.step import TrainState, make_train_step

    graphdef, params, rest = nnx.split(Transformer(_cfg(), nnx.Rngs(0)), nnx.Param, ...)
    tx = optax.sgd(0.1)
    toks = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    batch = {"decoder_input_tokens": toks, "decoder_target_tokens": jnp.roll(toks, -1, 1)}
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    _, metrics = jax.jit(make_train_step(graphdef, rest, tx, optax.constant_schedule(0.1)))(
        state, batch, jax.random.key(1)
    )
    terms = [float(metrics[k]) for k in ("ce", "expert_balance", "device_balance", "z_loss", "comm_balance")]
    assert bool(metrics["finite"]) and terms[-1] > 0.0
    assert float(metrics["loss"]) == pytest.approx(sum(terms), rel=1e-6)

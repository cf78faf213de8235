"""DeepSeek-V3's sigmoid gates (arXiv:2412.19437 §2.1.2, Eq 13-15) and the routed scaling factor:
hand-computed goldens, the layer against the per-expert reference loop, config errors, and a gin binding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_tree_close, max_rel_err, one_layer_model
from layer_testlib import layer_grads, layer_loss

from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.configs import gin_utils
from moe_jax.model.transformer import Transformer
from moe_jax.moe import gating as R
from moe_jax.moe.dispatch import ExpertParams
from moe_jax.moe.dispatch.reference import reference_dispatch
from moe_jax.moe.layer import MoELayer

# 3 tokens, 4 experts: sigmoid scores chosen by hand; the logits are their inverses ln(s / (1 - s)).
SCORES = np.array([[0.9, 0.5, 0.2, 0.6], [0.1, 0.7, 0.3, 0.2], [0.4, 0.2, 0.5, 0.75]])
LOGITS = jnp.asarray(np.log(SCORES / (1.0 - SCORES)), jnp.float32)


def test_sigmoid_scores_top2_selection_and_renormalised_gates_by_hand():
    r = R.sigmoid_topk(LOGITS, 2)
    # Top-2 of each row's sigmoid scores, best first.
    np.testing.assert_array_equal(r.indices, [[0, 3], [1, 2], [3, 2]])
    # g = g' / sum g': 0.9/1.5, 0.6/1.5; 0.7/1.0, 0.3/1.0; 0.75/1.25, 0.5/1.25.
    np.testing.assert_allclose(r.weights, [[0.6, 0.4], [0.7, 0.3], [0.6, 0.4]], rtol=1e-6)
    # probs: s' = s / sum_j s_j over all four experts (V3 Eq 19): sums 2.2, 1.3, 1.85.
    np.testing.assert_allclose(r.probs, SCORES / np.array([[2.2], [1.3], [1.85]]), rtol=1e-6)
    np.testing.assert_array_equal(r.logits, LOGITS)
    assert r.mask.all() and r.indices.dtype == jnp.int32


def test_without_renormalisation_the_gates_are_the_raw_sigmoid_scores():
    r = R.sigmoid_topk(LOGITS, 2, renormalize=False)
    np.testing.assert_allclose(r.weights, [[0.9, 0.6], [0.7, 0.3], [0.75, 0.5]], rtol=1e-6)  # g' of Eq 14
    # Softmax over the same logits selects the same experts (both are monotone) with other gates.
    soft = R.softmax_topk(LOGITS, 2, renormalize=True)
    np.testing.assert_array_equal(soft.indices, r.indices)
    assert not np.allclose(soft.weights, R.sigmoid_topk(LOGITS, 2).weights, rtol=1e-3)


def test_sigmoid_gates_survive_underflowing_scores():
    r = R.sigmoid_topk(jnp.full((1, 4), -200.0), 2)  # every sigmoid is 0 in float32
    assert np.isfinite(np.asarray(r.weights)).all() and np.isfinite(np.asarray(r.probs)).all()


F = 32


def _model_cfg(**moe) -> ModelConfig:
    base = MoEConfig.fine_grained(
        8, 2, 2, 1, F, router_score="sigmoid", renormalize_topk=True, routed_scaling_factor=2.5
    )  # 1 shared + 15 routed of width F/2, top-3
    return one_layer_model(dataclasses.replace(base, router_z_loss_alpha=1e-3, **moe), F)


def _inputs():
    return jax.random.normal(jax.random.key(1), (2, 12, 16))


def test_layer_output_is_the_scaled_reference_loop_by_hand():
    cfg = _model_cfg(num_shared_experts=0, dispatch="reference")
    layer, x = MoELayer(cfg, nnx.Rngs(0)), _inputs()
    y, _ = layer(x)
    xf = x.reshape(-1, 16)
    routing = R.sigmoid_topk(R.router_logits(xf, layer.router.kernel[...]), cfg.moe.top_k)
    expected = 2.5 * reference_dispatch(xf, routing, ExpertParams(wi=layer.wi[...], wo=layer.wo[...])).y
    np.testing.assert_allclose(y.reshape(-1, 16), expected, rtol=1e-6, atol=1e-7)
    unscaled, _ = MoELayer(cfg.replace_moe(routed_scaling_factor=1.0), nnx.Rngs(0))(x)
    np.testing.assert_allclose(y, 2.5 * unscaled, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_sigmoid_layer_matches_reference_loop(dispatch):
    x, results = _inputs(), {}
    for d in ("reference", dispatch):
        results[d] = layer_grads(_model_cfg(dispatch=d, capacity_factor=64.0), x)
    (_, (y_ref, aux_ref)), g_ref = results["reference"]
    (_, (y, aux)), g = results[dispatch]
    assert max_rel_err(y, y_ref) <= 1e-5
    assert_tree_close(g, g_ref, 1e-5)  # every parameter (the router kernel included) and the input
    assert_tree_close(aux.losses, aux_ref.losses, 1e-6)
    assert float(jnp.abs(g[0]["router"]["kernel"][...]).max()) > 0.0


def test_capacity_dispatch_with_drops_scales_what_it_computes():
    cfg = _model_cfg(num_shared_experts=0, dispatch="capacity", capacity_factor=0.5)
    x = _inputs()
    y, aux = MoELayer(cfg, nnx.Rngs(0))(x)
    y1, _ = MoELayer(cfg.replace_moe(routed_scaling_factor=1.0), nnx.Rngs(0))(x)
    assert float(aux.stats.dropped_fraction) > 0.0
    np.testing.assert_allclose(y, 2.5 * y1, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor=0.0 must be a finite number > 0"),
        ({"router_score": "tanh"}, r"router_score='tanh' is not one of \('softmax', 'sigmoid'\)"),
        ({"router_score": "sigmoid", "router": "hash", "top_k": 1}, "set router_score='softmax' or router='softmax'"),
        ({"router_score": "sigmoid", "second_expert_policy": "random"}, "second_expert_policy='greedy'"),
        ({"router_score": "sigmoid", "disable_top_experts": 1}, "disable_top_experts=0"),
        ({"router_score": "sigmoid", "renormalize_topk": True, "top_k": 1}, "set top_k >= 2 or renormalize_topk=False"),
    ],
)
def test_config_errors_name_the_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(num_experts=8, **{"top_k": 2, **fields})


def test_defaults_are_the_paper_softmax_unscaled():
    m = MoEConfig()
    assert (m.router_score, m.routed_scaling_factor) == ("softmax", 1.0)


def test_gin_binding_turns_on_sigmoid_gates_for_a_tiny_model():
    cfg = gin_utils.model_config_from_gin(
        [gin_utils.model_gin_path("deepseekmoe_tiny")],
        [
            "MoEConfig.router_score = 'sigmoid'",
            "MoEConfig.renormalize_topk = True",
            "MoEConfig.routed_scaling_factor = 2.5",
            "ModelConfig.num_layers = 1",
        ],
    )
    m = cfg.moe
    assert (m.router, m.router_score, m.renormalize_topk, m.routed_scaling_factor) == ("softmax", "sigmoid", True, 2.5)
    model = Transformer(cfg, nnx.Rngs(0))
    out = model(jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % cfg.vocab_size)
    assert np.isfinite(np.asarray(out.logits)).all()
    assert out.expert_ids.shape == (1, 16, m.top_k) and int(out.expert_ids.min()) >= 0
    assert np.isfinite(float(out.moe_losses.total))


@pytest.mark.parametrize("spec", ["expert:8", "data:2,expert:4"])
def test_sigmoid_layer_under_expert_parallelism_matches_one_device(spec):
    from moe_jax.parallel import MeshConfig, build_mesh

    cfg = _model_cfg(dispatch="dropless", num_experts=16)  # 16 routed experts split over 8 or 4 devices
    graphdef, params, rest = nnx.split(MoELayer(cfg, nnx.Rngs(0)), nnx.Param, ...)
    grad_fn = jax.jit(jax.value_and_grad(layer_loss, argnums=(0, 3), has_aux=True), static_argnums=2)
    x = jax.random.normal(jax.random.key(1), (8, 4, 16))  # 8 sequences: one per device of the data axis
    (_, (y0, aux0)), g0 = grad_fn(params, rest, graphdef, x)
    with jax.set_mesh(build_mesh(MeshConfig.from_string(spec))):
        (_, (y, aux)), g = grad_fn(params, rest, graphdef, x)
    assert max_rel_err(y, y0) <= 1e-5
    assert_tree_close(g, g0, 1e-5)
    assert_tree_close(aux.losses, aux0.losses, 1e-6)

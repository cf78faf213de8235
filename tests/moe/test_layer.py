"""The MoE layer: each paper model by configuration, dispatches against the oracle, losses and stats."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_tree_close, max_rel_err, one_layer_model

from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.layers.mlp import MLP
from moe_jax.moe import balance
from moe_jax.moe.layer import MoELayer

F = 32  # the "standard FFN" width of these tiny layers

LAYERS = {
    "deepseekmoe": MoEConfig.fine_grained(8, 2, 4, 1, F),  # 1 shared + 31 routed, top-7
    "gshard": MoEConfig.fine_grained(8, 2, 1, 0, F),
    "gshard_random": MoEConfig.fine_grained(8, 2, 1, 0, F, second_expert_policy="random"),
    "switch": MoEConfig(num_experts=8, top_k=1, expert_dim=F),
    "hash": MoEConfig(num_experts=8, top_k=1, expert_dim=F, router="hash"),
    "dense_x4": MoEConfig(num_experts=0, num_shared_experts=4, expert_dim=F),
}


def _model_cfg(moe: MoEConfig) -> ModelConfig:
    groups = 2 if moe.num_experts % 2 == 0 else 1
    return one_layer_model(
        dataclasses.replace(moe, router_z_loss_alpha=1e-3, device_balance_alpha=0.05, num_device_groups=groups), F
    )


def _inputs():
    x = jax.random.normal(jax.random.key(1), (2, 12, 16))
    ids = jax.random.randint(jax.random.key(2), (2, 12), 0, 64)
    return x, ids


def _layer_loss(dispatch, cfg):
    def f(params, rest, graphdef, x, ids, rng):
        layer = nnx.merge(graphdef, params, rest)
        y, aux = layer(x, ids, rng)
        aux_total = 0.0 if aux is None else aux.losses.total
        return jnp.sum(jnp.sin(y)) + aux_total, (y, aux)

    return f


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_layer_matches_reference_loop(name, dispatch):
    cfg = _model_cfg(LAYERS[name])
    x, ids = _inputs()
    rng = jax.random.key(3)
    results = {}
    for d in ("reference", dispatch):
        c = cfg.replace_moe(dispatch=d, capacity_factor=64.0)
        graphdef, params, rest = nnx.split(MoELayer(c, nnx.Rngs(0)), nnx.Param, ...)
        grad_fn = jax.value_and_grad(_layer_loss(d, c), argnums=(0, 3), has_aux=True)
        results[d] = jax.jit(grad_fn, static_argnums=2)(params, rest, graphdef, x, ids, rng)
    (l_ref, (y_ref, aux_ref)), g_ref = results["reference"]
    (l, (y, aux)), g = results[dispatch]
    assert max_rel_err(y, y_ref) <= 1e-5
    assert_tree_close(g, g_ref, 1e-5)  # every parameter and the input
    if aux_ref is not None:
        assert_tree_close(aux.losses, aux_ref.losses, 1e-6)


def test_layer_losses_are_the_alpha_weighted_equations():
    cfg = _model_cfg(LAYERS["deepseekmoe"])
    layer = MoELayer(cfg, nnx.Rngs(0))
    x, ids = _inputs()
    _, aux = layer(x, ids)
    m = cfg.moe
    routing = layer.router(x.reshape(-1, 16), None, None)
    probs, idx, mask = (a.reshape(2, 12, -1) for a in (routing.probs, routing.indices, routing.mask))
    np.testing.assert_allclose(
        aux.losses.expert_balance, m.expert_balance_alpha * balance.expert_balance_loss(probs, idx, mask), rtol=1e-6
    )
    np.testing.assert_allclose(
        aux.losses.device_balance, m.device_balance_alpha * balance.device_balance_loss(probs, idx, mask, 1), rtol=1e-6
    )
    np.testing.assert_allclose(
        aux.losses.z_loss, m.router_z_loss_alpha * balance.router_z_loss(routing.logits), rtol=1e-6
    )
    assert int(aux.stats.tokens_per_expert.sum()) == 2 * 12 * m.top_k
    assert float(aux.stats.max_load) >= 1.0 and float(aux.stats.dropped_fraction) == 0.0
    assert 0.0 < float(aux.stats.router_entropy) <= np.log(m.num_experts) + 1e-5


def test_hash_layer_has_no_balance_loss_and_a_fixed_untrained_table():
    cfg = _model_cfg(LAYERS["hash"])
    layer = MoELayer(cfg, nnx.Rngs(0))
    x, ids = _inputs()
    _, aux = layer(x, ids)
    assert float(aux.losses.total) == 0.0 and float(aux.stats.router_entropy) == 0.0
    params = nnx.state(layer, nnx.Param)
    assert "table" not in str(jax.tree_util.tree_flatten_with_path(params)[0])
    table_before = np.asarray(layer.router.table[...])
    # The same token id goes to the same expert wherever it appears.
    np.testing.assert_array_equal(
        np.asarray(layer.router(x.reshape(-1, 16), ids.reshape(-1), None).indices[:, 0]),
        table_before[np.asarray(ids).reshape(-1)],
    )
    np.testing.assert_array_equal(MoELayer(cfg, nnx.Rngs(5)).router.table[...], table_before)  # seed, not rngs


def test_fine_grained_parametrisation():
    g = MoEConfig.fine_grained(16, 2, 1, 0, 3456)
    assert (g.num_experts, g.top_k, g.num_shared_experts, g.expert_dim) == (16, 2, 0, 3456)
    ds = MoEConfig.fine_grained(16, 2, 4, 1, 3456)
    assert (ds.num_experts, ds.top_k, ds.num_shared_experts, ds.expert_dim) == (63, 7, 1, 864)
    assert ds.activated_dim == g.activated_dim == 2 * 3456
    with pytest.raises(ValueError, match="not divisible"):
        MoEConfig.fine_grained(16, 2, 5, 1, 3456)


def test_deepseekmoe_with_m1_no_shared_k2_is_gshard_greedy():
    gshard = MoEConfig(num_experts=8, top_k=2, expert_dim=F, second_expert_policy="greedy")
    ds = MoEConfig.fine_grained(8, 2, 1, 0, F)
    assert ds == gshard
    x, ids = _inputs()
    y1, a1 = MoELayer(_model_cfg(ds), nnx.Rngs(0))(x, ids)
    y2, a2 = MoELayer(_model_cfg(gshard), nnx.Rngs(0))(x, ids)
    np.testing.assert_array_equal(y1, y2)


def test_shared_only_layer_is_a_wide_dense_mlp():
    cfg = _model_cfg(LAYERS["dense_x4"])
    layer = MoELayer(cfg, nnx.Rngs(0))
    x, ids = _inputs()
    y, aux = layer(x, ids)
    assert aux is None and layer.router is None
    mlp = MLP(16, 4 * F, init_std=0.006, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    mlp.wi[...], mlp.wo[...] = layer.shared.wi[...], layer.shared.wo[...]
    np.testing.assert_allclose(y, mlp(x), rtol=1e-6)


def test_bad_moe_configs_are_rejected():
    with pytest.raises(ValueError, match="top_k=9"):
        MoEConfig(num_experts=8, top_k=9)
    with pytest.raises(ValueError, match="hash routing is top-1"):
        MoEConfig(num_experts=8, top_k=2, router="hash")
    with pytest.raises(ValueError, match="dispatch='dropples'"):
        MoEConfig(dispatch="dropples")
    with pytest.raises(ValueError, match="num_device_groups=3"):
        MoEConfig(num_experts=8, top_k=2, num_device_groups=3)

"""One registry per concept: router modules and dispatches are keyed by the names `MoEConfig` validates
(moe_jax.config.ROUTERS / DISPATCHES), each dispatch declares its options, and the MoE layer binds
its dispatch once at construction; a mistyped option is an error naming the valid ones."""

from __future__ import annotations

import pytest
from flax import nnx

from moe_jax import config
from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.moe.dispatch import DISPATCH_SPECS, Dispatch, dispatch_from_config, get_dispatch
from moe_jax.moe.dispatch.expert_parallel import expert_parallel_dispatch
from moe_jax.moe.layer import MoELayer
from moe_jax.moe.router import ROUTER_CLASSES


def test_registries_implement_exactly_the_names_config_accepts():
    assert tuple(ROUTER_CLASSES) == config.ROUTERS
    assert tuple(DISPATCH_SPECS) == config.DISPATCHES
    with pytest.raises(RuntimeError, match="accepts .* but its registry implements"):
        config.check_registry("dispatch", {**DISPATCH_SPECS, "sparse": None})


def test_dispatch_options_are_declared_and_checked():
    assert get_dispatch("capacity", capacity_factor=2.0) == Dispatch("capacity", (("capacity_factor", 2.0),))
    with pytest.raises(
        ValueError, match="dispatch 'capacity' has no option 'capacity_factr'; its options: capacity_factor"
    ):
        get_dispatch("capacity", capacity_factr=2.0)
    with pytest.raises(
        ValueError, match="dispatch 'dropless' has no option 'capacity_factor'; its options: gmm_backend"
    ):
        get_dispatch("dropless", capacity_factor=2.0)
    with pytest.raises(ValueError, match="dispatch 'reference' has no option 'gmm_backend'; its options: none"):
        get_dispatch("reference", gmm_backend="auto")
    with pytest.raises(
        ValueError, match=r"unknown dispatch 'sorted'; available: \('dropless', 'capacity', 'reference'\)"
    ):
        get_dispatch("sorted")


def test_expert_parallel_dispatch_takes_no_stray_option():
    with pytest.raises(TypeError, match="capacity_factr"):
        expert_parallel_dispatch(None, None, None, capacity_factr=1.0)


@pytest.mark.parametrize(
    "moe, expected",
    [
        (MoEConfig(dispatch="capacity", capacity_factor=2.0), Dispatch("capacity", (("capacity_factor", 2.0),))),
        (
            MoEConfig(dispatch="dropless", gmm_backend="ragged_dot"),
            Dispatch("dropless", (("gmm_backend", "ragged_dot"),)),
        ),
        (MoEConfig(dispatch="reference"), Dispatch("reference")),
    ],
)
def test_layer_binds_its_dispatch_once_from_the_config(moe, expected):
    assert dispatch_from_config(moe) == expected
    cfg = ModelConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2, head_dim=8, ffn_dim=32, moe=moe)
    layer = MoELayer(cfg, nnx.Rngs(0))
    assert layer.dispatch == expected
    assert hash(layer.dispatch) == hash(expected)  # static, hashable configuration of the module

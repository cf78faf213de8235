"""Issue 4, item 5: each bad configuration raises, before compiling, an error naming the sizes."""

import jax
import jax.numpy as jnp
import pytest
from ep_testlib import mesh, model_config
from flax import nnx

from moe_jax.model.transformer import Transformer
from moe_jax.parallel import (
    MeshConfig,
    ShardingError,
    abstract_state,
    build_mesh,
    distributed_config,
    resolve_axis_sizes,
    validate,
)


def test_mesh_must_match_the_device_count():
    with pytest.raises(
        ValueError,
        match=r"mesh data=2 x fsdp=1 x expert=2 x tensor=1 needs 4 devices, "
        r"but 8 devices are available",
    ):
        build_mesh(MeshConfig(data=2, expert=2))
    with pytest.raises(ValueError, match=r"the fixed axes use 3 devices, which does not divide the 8 available"):
        build_mesh(MeshConfig(data=-1, expert=3))
    assert resolve_axis_sizes(MeshConfig(data=-1, expert=4), 8) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    # A mesh over fewer devices than the job has.
    with pytest.raises(ShardingError, match=r"has 4 devices but 8 devices are available"):
        validate(model_config("switch"), mesh("expert:4", jax.devices()[:4]), global_batch=8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, expert=-1)
    with pytest.raises(ValueError, match="bad mesh item 'pipeline:2'"):
        MeshConfig.from_string("data:2,pipeline:2")


def test_experts_must_divide_by_the_expert_axis():
    cfg = model_config("switch")  # 8 routed experts
    with pytest.raises(ShardingError, match=r"num_experts=8 routed experts do not divide by the expert axis size 3"):
        validate(cfg, mesh("expert:3", jax.devices()[:3]), num_devices=3)
    # The dispatch itself refuses at trace time, before compiling.
    m = mesh("expert:3", jax.devices()[:3])
    model = Transformer(cfg, nnx.Rngs(0))
    with (
        jax.set_mesh(m),
        pytest.raises(
            ValueError,
            match=r"num_experts=8 routed experts do not divide by the "
            r"expert axis size 3",
        ),
    ):
        jax.jit(lambda t: model(t).logits).lower(jnp.zeros((6, 4), jnp.int32))


def test_batch_must_divide_by_the_data_axes():
    with pytest.raises(
        ShardingError,
        match=r"global batch 6 does not divide by the 8 batch shards "
        r"\(data=2 x fsdp=1 x expert=4\)",
    ):
        validate(model_config("switch"), mesh("data:2,expert:4"), global_batch=6)


def test_parameter_dimensions_must_divide_by_their_mesh_axes():
    cfg = model_config("gshard").replace(num_heads=3, head_dim=16)
    state = abstract_state(lambda: Transformer(cfg, nnx.Rngs(0)))
    with pytest.raises(ShardingError) as err:
        validate(cfg, mesh("data:4,tensor:2"), global_batch=8, state=state)
    assert "attn/wq: dimension 2 ('heads') of size 3 does not divide by tensor=2 = 2" in str(err.value)


def test_all_problems_are_listed_at_once():
    with pytest.raises(ShardingError) as err:
        validate(model_config("switch"), mesh("expert:3", jax.devices()[:3]), global_batch=4, num_devices=8)
    message = str(err.value)
    for fragment in ("3 devices but 8 devices", "num_experts=8", "global batch 4 does not divide by the 3"):
        assert fragment in message


def test_distributed_config_from_flags_and_environment():
    env = {"MOE_JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "MOE_JAX_NUM_PROCESSES": "2", "MOE_JAX_PROCESS_ID": "1"}
    assert distributed_config(env=env).process_id == 1
    assert distributed_config(process_id=0, env=env).process_id == 0  # flags win
    assert not distributed_config(env={}).enabled
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        distributed_config(process_id=2, env=env)
    with pytest.raises(ValueError, match="num_processes=2 needs a coordinator address"):
        distributed_config(num_processes=2, env={})

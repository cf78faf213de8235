"""The rules table and placement: every device holds only its experts; shared experts, attention,
optimizer state and batches follow the data/fsdp/tensor rules."""

import jax
import numpy as np
import optax
import pytest
from ep_testlib import mesh, model_config, tokens
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe_jax.model.transformer import Transformer
from moe_jax.parallel import (
    batch_sharding,
    create_sharded,
    logical_to_spec,
    process_batch_rows,
    shard_batch,
    state_shardings,
    tree_shardings_like,
)


def test_logical_to_spec():
    assert logical_to_spec(("layers", "experts", "embed", None, "expert_mlp")) == P(
        None, "expert", "fsdp", None, "tensor"
    )
    assert logical_to_spec(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
    assert logical_to_spec(("batch", None)) == P(("data", "fsdp", "expert"), None)
    with pytest.raises(KeyError, match="'nonsense' has no sharding rule"):
        logical_to_spec(("nonsense",))
    with pytest.raises(ValueError, match="both map to mesh axis 'tensor'"):
        logical_to_spec(("heads", "mlp"))
    # Mesh axes the mesh lacks are left out.
    small = jax.sharding.AbstractMesh((2, 4), ("data", "expert"))
    assert logical_to_spec(("experts", "embed", "expert_mlp"), mesh=small) == P("expert", None, None)


def test_each_device_holds_only_its_experts():
    cfg = model_config("deepseekmoe")  # 16 routed experts, layer 1 is MoE
    m = mesh("data:2,expert:4")
    model = create_sharded(lambda: Transformer(cfg, nnx.Rngs(0)), m)
    full = Transformer(cfg, nnx.Rngs(0))  # same seed on one device
    ffn, full_ffn = model.stacks[1].blocks.ffn, full.stacks[1].blocks.ffn
    for name in ("wi", "wo"):
        arr = getattr(ffn, name)[...]
        ref = np.asarray(getattr(full_ffn, name)[...])
        assert tuple(arr.sharding.spec)[:2] == (None, "expert")
        assert arr.sharding.shard_shape(arr.shape)[1] == 16 // 4
        expert_of = {dev: idx[m.axis_names.index("expert")] for idx, dev in np.ndenumerate(m.devices)}
        for shard in arr.addressable_shards:
            j = expert_of[shard.device]
            assert shard.data.shape[1] == 4
            assert shard.index[1] == slice(4 * j, 4 * (j + 1))
            # (jit-compiled and eager initialisers differ in the last ulp, sharded or not)
            np.testing.assert_allclose(np.asarray(shard.data), ref[:, 4 * j : 4 * (j + 1)], rtol=1e-6, atol=1e-8)
    # Shared experts and attention are not split over `expert` (replicated there, fsdp/tensor = 1).
    for arr in (ffn.shared.wi[...], model.stacks[1].blocks.attn.wq[...], ffn.router.kernel[...]):
        assert "expert" not in jax.tree.leaves(tuple(arr.sharding.spec))
        assert arr.sharding.shard_shape(arr.shape) == arr.shape


def test_shared_experts_and_attention_follow_fsdp_and_tensor():
    cfg = model_config("deepseekmoe")
    m = mesh("fsdp:2,expert:2,tensor:2")
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    sh = state_shardings(state, m)
    blocks = sh["stacks"][1]["blocks"]
    assert blocks["ffn"]["shared"]["wi"].get_value().spec == P(None, "fsdp", None, "tensor")
    assert blocks["ffn"]["wi"].get_value().spec == P(None, "expert", "fsdp", None, "tensor")
    assert blocks["attn"]["wo"].get_value().spec == P(None, "tensor", None, "fsdp")
    assert sh["embed"].get_value().spec == P("tensor", "fsdp")
    assert blocks["attn_norm"]["scale"].get_value().spec == P(None, None)


def test_optimizer_state_is_sharded_like_the_params():
    cfg = model_config("switch")
    m = mesh("data:2,expert:4")
    model = create_sharded(lambda: Transformer(cfg, nnx.Rngs(0)), m)
    opt = create_sharded(lambda: nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param), m)
    mu = opt.opt_state[0].mu["stacks"][0]["blocks"]["ffn"]["wi"][...]
    assert mu.sharding.spec == P(None, "expert", "fsdp", None, "tensor")
    assert mu.sharding.shard_shape(mu.shape)[1] == 2
    # A plain optax state over nnx.State params.
    params = nnx.state(model, nnx.Param)
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
    sh = tree_shardings_like(opt_state, params, jax.tree.map(lambda a: a.sharding, params), m)
    assert sh[0].mu["stacks"][0]["blocks"]["ffn"]["wo"].get_value().spec == P(None, "expert", "tensor", "fsdp")
    assert sh[0].count.spec == P()


def test_batch_is_split_over_data_and_expert():
    m = mesh("data:2,expert:4")
    toks = tokens()
    batch = shard_batch({"tokens": toks}, m)["tokens"]
    assert batch.sharding == batch_sharding(m)
    assert batch.sharding.shard_shape(batch.shape) == (1, toks.shape[1])
    np.testing.assert_array_equal(np.asarray(batch), toks)
    assert process_batch_rows(m, 8) == slice(0, 8)  # one process feeds everything

"""DeepSeek-V3's selection bias in training (arXiv:2412.19437 §2.1.2): carried in `TrainState.router_bias`,
moved by the train step from the whole step's global load, kept on a non-finite step, equal on one device
and on an 8-device mesh with expert parallelism, exact across checkpoint and resume; and the checkpoints
of models without it keep the format they had before the field existed."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct
from helpers import TRAIN_VOCAB, assert_tree_close, tiny_train

from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.moe import gating as R
from moe_jax.parallel import MeshConfig, build_mesh
from moe_jax.train import loop
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.config import TrainConfig
from moe_jax.train.restore import load_trained
from moe_jax.train.state import build_train_state
from moe_jax.train.step import TrainState, forward, update_router_bias

SPEED = 0.01


def _model(num_layers=3, moe_layer_freq=1, **moe) -> ModelConfig:
    """Layer 0 dense, then MoE layers: 8 routed sigmoid experts, top-2, 1 shared; V3's bias balancing."""
    options = dict(
        num_experts=8,
        top_k=2,
        expert_dim=16,
        num_shared_experts=1,
        router_score="sigmoid",
        renormalize_topk=True,
        selection_bias=True,
        bias_update_speed=SPEED,
        expert_balance_alpha=0.0,
    )
    return ModelConfig(
        vocab_size=TRAIN_VOCAB,
        d_model=32,
        num_layers=num_layers,
        num_heads=2,
        head_dim=16,
        ffn_dim=64,
        init_std=0.05,
        first_k_dense=1,
        moe_layer_freq=moe_layer_freq,
        moe=MoEConfig(**{**options, **moe}),
    )


def _train_cfg(**kw) -> TrainConfig:
    options = dict(steps=8, warmup_steps=1, batch_size=8, seq_len=16, learning_rate=3e-3)
    return TrainConfig(**{**options, **kw})


def _batches(n, batch=8, seq=16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = rng.integers(0, TRAIN_VOCAB, (batch, seq + 1)).astype(np.int32)
        ones = np.ones((batch, seq), np.int32)
        out.append(
            dict(
                decoder_input_tokens=t[:, :-1],
                decoder_target_tokens=t[:, 1:],
                decoder_loss_weights=ones,
                decoder_segment_ids=ones,
                decoder_positions=np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            )
        )
    return out


def _mesh(spec="data:1"):
    devices = jax.devices()[:1] if spec == "data:1" else jax.devices()
    return build_mesh(MeshConfig.from_string(spec), devices)


def _bias_rows(bias) -> np.ndarray:
    """[L_moe, E] of a router-bias State, in layer order."""
    return np.concatenate([np.asarray(x) for x in jax.tree.leaves(jax.device_get(bias))])


def test_each_layer_gets_its_own_load_in_layer_order():
    # 24 layers, MoE at 2, 4, ..., 22: eleven one-layer MoE stacks between dense ones.
    cfg = _model(num_layers=24, moe_layer_freq=2)
    built = build_train_state(cfg, _train_cfg(), _mesh())
    bias = built.initial_router_bias()
    e, moe_layers = 8, [l for l in range(24) if cfg.is_moe_layer(l)]
    load = np.full((len(moe_layers), e), 10, np.int32)
    for j in range(len(moe_layers)):
        load[j, j % e] = 30  # MoE layer j overloads expert j % E; the rest sit below the mean
    new = update_router_bias(bias, jnp.asarray(load), SPEED)
    for path, leaf in jax.tree_util.tree_flatten_with_path(new)[0]:
        _, first_layer, _ = cfg.layer_segments()[int(path[1].key)]  # path: stacks/<i>/blocks/...
        j = moe_layers.index(first_layer)
        want = np.full(e, SPEED, np.float32)
        want[j % e] = -SPEED
        np.testing.assert_array_equal(np.asarray(leaf)[0], want, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_step_moves_the_bias_by_the_whole_steps_load_and_not_on_a_non_finite_step():
    cfg, batch = _model(), _batches(1)[0]
    mesh = _mesh()
    results = {}
    for accum in (1, 2):
        built = build_train_state(cfg, _train_cfg(grad_accum_steps=accum), mesh)
        rest = built.rest()
        state = built.init()
        with jax.set_mesh(mesh):
            expected_load = R.selection_load(
                forward(built.graphdef, rest, state.variables(), batch, None).expert_ids, 8
            )
            step = built.jit_train_step(rest)
            new, metrics = step(state, batch, jax.random.key(0))
        results[accum] = _bias_rows(new.router_bias)  # on the host: the step donates its state argument
        # b = 0 + gamma * sign(mean load - load), per layer, from the global batch's counts.
        want = R.update_selection_bias(jnp.zeros((2, 8)), expected_load, SPEED)
        np.testing.assert_array_equal(_bias_rows(new.router_bias), want)
        assert np.abs(want).max() == np.float32(SPEED)
        np.testing.assert_array_equal(metrics["router_bias_range"], np.ptp(np.asarray(want), axis=-1))
    # Two micro-batches count the load of the whole step: the same bias as one batch.
    np.testing.assert_array_equal(results[1], results[2])
    # A non-finite step keeps the old state, bias included.
    poisoned = new.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), new.params))
    with jax.set_mesh(mesh):
        kept, metrics = step(poisoned, batch, jax.random.key(1))
    assert not bool(metrics["finite"])
    np.testing.assert_array_equal(_bias_rows(kept.router_bias), results[2])
    assert int(kept.step) == 1


def _train(cfg: ModelConfig, tc: TrainConfig, spec: str, steps: int) -> TrainState:
    mesh = _mesh(spec)
    built = build_train_state(cfg, tc, mesh, global_batch=tc.batch_size, num_devices=mesh.size)
    state = built.init()
    step = built.jit_train_step(built.rest())
    with jax.set_mesh(mesh):
        for i, batch in enumerate(_batches(steps)):
            state, _ = step(state, batch, jax.random.key(i))
    return jax.device_get(state)


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_bias_is_equal_on_one_device_and_under_expert_parallelism(dispatch):
    # Capacity for every token (a sharded capacity dispatch drops per shard, so only then do the two
    # meshes compute the same); the load is counted from the selection, before any drop, either way.
    cfg = _model(dispatch=dispatch, capacity_factor=8.0)
    tc = _train_cfg()
    one = _train(cfg, tc, "data:1", 4)
    eight = _train(cfg, tc, "data:2,expert:4", 4)
    assert np.abs(_bias_rows(one.router_bias)).max() > 0  # it moved
    np.testing.assert_array_equal(_bias_rows(eight.router_bias), _bias_rows(one.router_bias))
    assert_tree_close(eight.params, one.params, tol=1e-4)


def _loop_cfg(cache, steps) -> TrainConfig:
    return tiny_train(cache, steps=steps, warmup_steps=1, log_every=1, eval_every=0, eval_batches=1, checkpoint_every=2)


def _gin(cfg: ModelConfig, tc: TrainConfig) -> str:
    """A workdir's config.gin for these configurations (what `load_trained` reads)."""
    lines = [f"ModelConfig.{f} = {getattr(cfg, f)!r}" for f in cfg.__dataclass_fields__ if f != "moe"]
    lines += ["ModelConfig.moe = @MoEConfig()"] + [
        f"MoEConfig.{f} = {getattr(cfg.moe, f)!r}" for f in cfg.moe.__dataclass_fields__
    ]
    return "\n".join(lines + [f"TrainConfig.{f} = {getattr(tc, f)!r}" for f in tc.__dataclass_fields__]) + "\n"


def _restored(workdir, cfg: ModelConfig, tc: TrainConfig, step: int, host: bool = True):
    """(state, data position) of a workdir's checkpoint `step`, on the host or on one device."""
    built = build_train_state(cfg, tc, _mesh())
    ckpt = Checkpointer(workdir, async_save=False)
    state, data_state = ckpt.restore(step, built.restore_target())
    ckpt.close()
    return (jax.device_get(state) if host else state), data_state


def _bitwise_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_bias_and_params_are_exact_across_checkpoint_and_resume(train_cache, tmp_path):
    cfg, tc = _model(), _loop_cfg(train_cache, 4)
    loop.train(tmp_path / "straight", cfg, tc, progress=False)
    loop.train(tmp_path / "resumed", cfg, _loop_cfg(train_cache, 2), progress=False, gin_config=_gin(cfg, tc))
    loop.train(tmp_path / "resumed", cfg, tc, progress=False)  # restores step 2
    straight = _restored(tmp_path / "straight", cfg, tc, 4)[0]
    resumed = _restored(tmp_path / "resumed", cfg, tc, 4)[0]
    assert np.abs(_bias_rows(straight.router_bias)).max() > 0
    _bitwise_equal(resumed.router_bias, straight.router_bias)
    _bitwise_equal(resumed.params, straight.params)
    # The bias spread per MoE layer is logged; `load_trained` hands the trained bias to evaluation.
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert all(f"moe/layer{l}/router_bias_range" in r for r in rows if "loss" in r for l in (1, 2))
    trained = load_trained(tmp_path / "resumed")
    bias = nnx.state(trained.model(), nnx.Variable)  # every variable of the merged model
    np.testing.assert_array_equal(
        _bias_rows(nnx.filter_state(bias, lambda path, _: "bias" in path)), _bias_rows(straight.router_bias)
    )


@struct.dataclass
class _TrainStateBefore:
    """`TrainState` as it was before the router bias: what checkpoints written by that code hold."""

    step: jax.Array
    params: nnx.State
    opt_state: object


def _tree_metadata(workdir, step):
    """Every array's key path and value type in a checkpoint (not its chunk shape, which follows the mesh)."""
    tree = json.loads((workdir / "checkpoints" / str(step) / "state" / "_METADATA").read_text())["tree_metadata"]
    return {path: (leaf["key_metadata"], leaf["value_metadata"]["value_type"]) for path, leaf in tree.items()}


@pytest.mark.slow
def test_checkpoints_written_before_the_router_bias_restore_and_resume_exactly(train_cache, tmp_path):
    cfg, tc = _model(selection_bias=False, bias_update_speed=0.0), _loop_cfg(train_cache, 2)  # without the bias
    loop.train(tmp_path / "new", cfg, tc, progress=False, gin_config=_gin(cfg, tc))
    state, data_state = _restored(tmp_path / "new", cfg, tc, 2, host=False)
    assert state.router_bias is None
    # The same step written as the code before the field did (copy the workdir, replace its checkpoint).
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    shutil.rmtree(old / "checkpoints")
    ckpt = Checkpointer(old, async_save=False)
    ckpt.save(2, _TrainStateBefore(state.step, state.params, state.opt_state), data_state)
    ckpt.close()
    assert _tree_metadata(old, 2) == _tree_metadata(tmp_path / "new", 2)  # the on-disk format is unchanged
    # It loads for evaluation, and training resumes from it exactly as from the new code's checkpoint.
    np.testing.assert_array_equal(jax.tree.leaves(load_trained(old).params)[0], jax.tree.leaves(state.params)[0])
    for wd in (old, tmp_path / "new"):
        loop.train(wd, cfg, _loop_cfg(train_cache, 3), progress=False)
    tc3 = _loop_cfg(train_cache, 3)
    _bitwise_equal(_restored(old, cfg, tc3, 3)[0], _restored(tmp_path / "new", cfg, tc3, 3)[0])


BIAS_BINDINGS = [
    "--gin.MoEConfig.router_score='sigmoid'",
    "--gin.MoEConfig.renormalize_topk=True",
    "--gin.MoEConfig.selection_bias=True",
    "--gin.MoEConfig.bias_update_speed=0.001",
]


def test_params_counts_a_bias_model_like_the_model_without_it(capsys):
    from moe_jax.configs.params_cli import main as params_main

    assert params_main(["--model=gshard_tiny"]) == 0
    plain = capsys.readouterr().out
    assert params_main(["--model=gshard_tiny", *BIAS_BINDINGS]) == 0
    assert capsys.readouterr().out == plain  # the bias is state, not a parameter


@pytest.mark.slow
def test_plan_lowers_the_step_of_a_bias_model():
    from moe_jax.train import plan

    tc = _train_cfg()
    built, lowered = plan.lower_step(_model(), tc, _mesh("data:2,expert:4"))
    assert _bias_rows(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), built.abstract.router_bias)).shape == (2, 8)
    assert len(jax.tree.leaves(lowered.out_info[0].router_bias)) == 1  # the step returns the moved bias

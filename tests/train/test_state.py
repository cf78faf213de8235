"""The one sharded train-state builder (`moe_jax.train.state`): `moe-jax plan` lowers the very step that
`train` runs, on a multi-device mesh (the 8 fake CPU devices of tests/conftest.py)."""

import re

import jax
import pytest
from helpers import tiny_model, tiny_train

from moe_jax.config import ModelConfig
from moe_jax.parallel import MeshConfig, build_mesh
from moe_jax.train import loop, plan
from moe_jax.train.config import TrainConfig
from moe_jax.train.state import build_train_state

MESH = "data:2,fsdp:2,expert:2"  # batch, parameter and expert sharding all in play


def _same(a, b) -> bool:
    """Two pytrees of the same structure with equal leaves."""
    return jax.tree.structure(a) == jax.tree.structure(b) and jax.tree.leaves(a) == jax.tree.leaves(b)


def _functions(module_text: str) -> set[str]:
    """The functions of a StableHLO module, private names without the counter jax appends per process
    (`@_where_128` -> `@_where`); a set, because how often jax deduplicates a helper varies too."""
    text = re.sub(r"(@[A-Za-z_][\w.$-]*?)_\d+\b", r"\1", module_text)
    body = text.rstrip().removesuffix("}").rstrip()  # the module's closing brace, after the last function
    return {f.rstrip() for f in body.split("\n  func.func ")}


def _shapes(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _shardings(tree):
    return jax.tree.map(lambda a: a.sharding, tree)


class _Stop(Exception):
    pass


def _model() -> ModelConfig:
    # 8 routed experts of width 32, top-2 (fine_grained(4, 1, 2, 0, 32)): divisible by the expert axis.
    return tiny_model(shared=0)


def _train_cfg(cache) -> TrainConfig:
    """One step, checkpointed, never evaluated, at TrainConfig's default learning rate."""
    return tiny_train(
        cache,
        steps=1,
        warmup_steps=0,
        learning_rate=TrainConfig.learning_rate,
        log_every=1,
        eval_every=0,
        eval_batches=1,
        checkpoint_every=1,
    )


@pytest.mark.slow
def test_plan_lowers_the_step_the_trainer_runs(train_cache, tmp_path, monkeypatch):
    model_cfg, cfg = _model(), _train_cfg(train_cache)
    ran = {}
    build = loop._Steps.build.__func__

    def spy(cls, built, rest):  # keep the trainer's jitted step and stop before it runs (no compile needed)
        ran.update(built=built, steps=build(cls, built, rest))
        raise _Stop

    monkeypatch.setattr(loop._Steps, "build", classmethod(spy))
    with pytest.raises(_Stop):
        loop.train(tmp_path, model_cfg, cfg, MeshConfig.from_string(MESH), progress=False)

    trainer = ran["built"]
    with jax.set_mesh(trainer.mesh):
        trained = ran["steps"].train.lower(
            trainer.restore_target(),
            trainer.abstract_batch(cfg.batch_size, cfg.seq_len),
            jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
        )
    planned_state, planned = plan.lower_step(model_cfg, cfg, build_mesh(MeshConfig.from_string(MESH), jax.devices()))
    # The same program: shapes, dtypes, shardings of every argument and output, and every operation.
    assert _functions(planned.as_text()) == _functions(trained.as_text())
    assert _same(planned_state.shardings, trainer.shardings)
    assert _same(_shapes(planned_state.abstract), _shapes(trainer.abstract))


@pytest.mark.slow
def test_init_and_restore_target_carry_the_shardings():
    mesh = build_mesh(MeshConfig.from_string(MESH), jax.devices())
    built = build_train_state(_model(), TrainConfig(steps=2, warmup_steps=1, batch_size=8, seq_len=16), mesh)
    state = built.init()
    target = built.restore_target()
    assert _same(_shardings(state), built.shardings) and _same(_shardings(target), built.shardings)
    assert _same(_shapes(state), _shapes(target))
    # An imported state: given parameters in their shardings, a fresh optimizer state, the given step.
    again = built.from_params(jax.device_get(state.params), 7)
    assert int(again.step) == 7 and _same(_shardings(again), built.shardings)

"""Issue 18: nothing lost, nothing silent. Fault injection per checkpoint case (garbled bytes of the same
size, a truncated file, a missing file, non-finite values under valid checksums), shapes that do not
match the model, --restore_step with later steps, a NaN held-out loss. Each test asserts the message
and that nothing was lost: the earlier checkpoint byte-identical, config.gin unchanged, metrics.jsonl
without duplicate rows."""

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import TRAIN_SEQ, TRAIN_VOCAB, cli_env, tiny_model, tiny_train, tiny_train_cmd

from moe_jax.parallel import MeshConfig
from moe_jax.train import loop
from moe_jax.train.checkpoint import Checkpointer, CheckpointError, abstract_like
from moe_jax.train.integrity import MANIFEST
from moe_jax.train.loop import NonFiniteLossError, train

REPO = Path(__file__).resolve().parents[2]
CONFIG = "# the configuration this workdir was trained with\n"


def cfg(cache, steps=4, **kw):
    return tiny_train(
        cache, steps=steps, warmup_steps=1, log_every=1, eval_every=0, eval_batches=1, checkpoint_every=2, **kw
    )


def run(workdir, cache, steps=4, model=None, **kw) -> tuple[object, str]:
    """train() in this process; returns (result or exception, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            result = train(
                workdir,
                model or tiny_model(),
                cfg(cache, steps),
                MeshConfig(data=-1),
                progress=False,
                gin_config=CONFIG,
                **kw,
            )
        except (CheckpointError, NonFiniteLossError) as err:
            result = err
    return result, out.getvalue()


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def metric_steps(workdir: Path) -> list[int]:
    return [
        json.loads(line)["step"]
        for line in (workdir / "metrics.jsonl").read_text().splitlines()
        if "ce" in json.loads(line)
    ]


@pytest.fixture(scope="module")
def trained(train_cache, tmp_path_factory) -> Path:
    """Steps 1-4 of the tiny model, checkpoints at 2 and 4 (each with its checksum manifest)."""
    wd = tmp_path_factory.mktemp("trained") / "run"
    result, _ = run(wd, train_cache)
    assert result.step == 4
    assert (wd / "checkpoints" / "2" / MANIFEST).is_file() and (wd / "checkpoints" / "4" / MANIFEST).is_file()
    return wd


@pytest.fixture
def workdir(trained, tmp_path) -> Path:
    wd = tmp_path / "run"
    shutil.copytree(trained, wd)
    return wd


def largest_data_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid, n = len(data) // 2, min(4096, len(data) // 4)
    data[mid : mid + n] = bytes(255 - b for b in data[mid : mid + n])  # flipped bits, same size
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage,expected",
    [
        (garble, "contents differ from the SHA-256 written at save"),
        (truncate, "were written (truncated or overwritten)"),
        (Path.unlink, ": missing"),
    ],
)
def test_damaged_latest_step_is_set_aside_and_the_previous_one_restores(workdir, train_cache, damage, expected):
    ckpts = workdir / "checkpoints"
    before = tree_hashes(ckpts / "2")
    bad_file = largest_data_file(ckpts / "4")
    damage(bad_file)
    result, out = run(workdir, train_cache, steps=5)
    assert f"checkpoint step 4 is damaged ({bad_file}: " in out and expected in out, out
    assert f"moved it to {ckpts / 'corrupt' / '4'}; restoring the previous step 2 instead" in out
    assert f"restored checkpoint {ckpts / '2'} (step 2)" in out
    assert result.step == 5 and np.isfinite(result.heldout_loss)
    assert (ckpts / "corrupt" / "4" / bad_file.relative_to(ckpts / "4")).exists() or damage is Path.unlink
    assert tree_hashes(ckpts / "2") == before  # the good checkpoint is untouched
    assert metric_steps(workdir) == [1, 2, 3, 4, 5]  # steps 3-4 replaced, not duplicated
    assert (workdir / "config.gin").read_text() == CONFIG
    backups = list(workdir.glob("metrics.jsonl.*.bak"))
    assert len(backups) == 1 and [json.loads(l)["step"] for l in backups[0].read_text().splitlines() if "ce" in l] == [
        1,
        2,
        3,
        4,
    ]


@pytest.mark.slow
def test_nonfinite_values_with_valid_checksums_are_refused(workdir, train_cache):
    """A step saved with NaN in the AdamW second moment (its checksums match): found after restoring."""
    ckpts = workdir / "checkpoints"
    ckpt = Checkpointer(workdir, async_save=False)
    state, data = ckpt.restore(4, abstract_like(*_abstract_state(train_cache)))
    target = next(
        p
        for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
        if ".nu" in jax.tree_util.keystr(p) or "'nu'" in jax.tree_util.keystr(p)
    )
    state = state.replace(
        opt_state=jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.full_like(x, jnp.nan) if p == target else x, state.opt_state
        )
    )
    shutil.rmtree(ckpts / "4")
    ckpt.manager.reload()
    ckpt.save(4, state, data)
    ckpt.close()
    before = tree_hashes(ckpts / "2")
    result, out = run(workdir, train_cache, steps=5)
    assert "checkpoint step 4 is damaged" in out and "non-finite values in opt_state/1/0/nu/" in out, out
    assert "restoring the previous step 2 instead" in out and result.step == 5
    assert tree_hashes(ckpts / "2") == before and metric_steps(workdir) == [1, 2, 3, 4, 5]


def _abstract_state(cache):
    from flax import nnx

    from moe_jax.model.transformer import Transformer
    from moe_jax.train.optimizer import make_optimizer
    from moe_jax.train.step import TrainState

    _, params, _ = nnx.split(nnx.eval_shape(lambda: Transformer(tiny_model(), nnx.Rngs(0))), nnx.Param, ...)
    opt = jax.eval_shape(make_optimizer(cfg(cache)).init, params)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt)
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return abstract, jax.tree.map(lambda _: single, abstract)


@pytest.mark.slow
def test_explicit_restore_step_that_is_damaged_is_an_error_and_nothing_moves(workdir, train_cache):
    ckpts = workdir / "checkpoints"
    garble(largest_data_file(ckpts / "4"))
    everything = tree_hashes(workdir)
    err, _ = run(workdir, train_cache, steps=5, restore_step=4)
    assert isinstance(err, CheckpointError)
    assert "checkpoint step 4" in str(err) and "is damaged" in str(err) and "Nothing was moved" in str(err)
    assert tree_hashes(workdir) == everything


def test_shapes_that_do_not_match_the_model_are_named_and_nothing_is_written(workdir, train_cache):
    everything = tree_hashes(workdir)
    other = tiny_model().replace_moe(num_experts=8, top_k=2)  # the workdir has 7 routed experts
    err, _ = run(workdir, train_cache, steps=6, model=other)
    message = str(err)
    assert isinstance(err, CheckpointError) and "different model configuration" in message, message
    assert "params/stacks/0/blocks/ffn/router/kernel/value: checkpoint (2, 32, 7), model (2, 32, 8)" in message
    assert "params/stacks/0/blocks/ffn/wi/value: checkpoint (2, 7, 32, 2, 16), model (2, 8, 32, 2, 16)" in message
    assert "params/embed" not in message  # only what differs
    assert "and 6 optimizer-state arrays (AdamW moments) of the parameters above" in message, message
    assert "--restore_step" not in message and "Nothing was written" in message
    assert tree_hashes(workdir) == everything  # config.gin, checkpoints, metrics


@pytest.mark.slow
def test_restore_step_with_later_steps_refuses_up_front_then_discards_behind_the_flag(workdir, train_cache):
    ckpts = workdir / "checkpoints"
    everything = tree_hashes(workdir)
    later = tree_hashes(ckpts / "4")
    err, _ = run(workdir, train_cache, steps=4, restore_step=2)
    assert isinstance(err, CheckpointError)
    assert "later checkpoints exist (steps [4])" in str(err) and "--discard_later_steps" in str(err)
    assert tree_hashes(workdir) == everything
    result, out = run(workdir, train_cache, steps=4, restore_step=2, discard_later_steps=True)
    assert f"moved 4 to {ckpts / 'discarded' / '4'}" in out and result.step == 4
    assert tree_hashes(ckpts / "discarded" / "4") == later  # set aside byte-identical
    assert metric_steps(workdir) == [1, 2, 3, 4]


def test_nan_heldout_loss_is_an_error(workdir, train_cache, monkeypatch):
    class Nan:
        loss, bits_per_byte = float("nan"), float("nan")

    monkeypatch.setattr(loop, "heldout_pass", lambda *a, **k: Nan())
    (workdir / "result.json").unlink()
    err, _ = run(workdir, train_cache, steps=4)  # finished: only the final evaluation
    assert isinstance(err, NonFiniteLossError) and "held-out loss is nan at step 4" in str(err)
    assert not (workdir / "result.json").exists()


@pytest.mark.slow
def test_train_step_refuses_nonfinite_parameters_even_when_the_loss_is_finite():
    from flax import nnx

    from moe_jax.model.transformer import Transformer
    from moe_jax.train.step import TrainState, make_train_step

    graphdef, params, rest = nnx.split(Transformer(tiny_model(), nnx.Rngs(0)), nnx.Param, ...)
    tx = optax.scale(float("nan"))  # finite loss and gradient, NaN update
    toks = jax.random.randint(jax.random.key(0), (2, 8), 0, TRAIN_VOCAB)
    batch = {"decoder_input_tokens": toks, "decoder_target_tokens": toks, "decoder_loss_weights": jnp.ones_like(toks)}
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    new, metrics = jax.jit(make_train_step(graphdef, rest, tx, optax.constant_schedule(1.0)))(
        state, batch, jax.random.key(1)
    )
    assert np.isfinite(float(metrics["loss"])) and not bool(metrics["finite"])
    assert int(new.step) == 0 and all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params))
    )


@pytest.mark.subprocess
def test_cli_shape_mismatch_is_one_message_without_tracebacks(workdir, train_cache):
    """Through the command line: exit 1, the arrays named, no orbax advice or asyncio tracebacks."""
    everything = tree_hashes(workdir)
    cmd = tiny_train_cmd(
        workdir,
        f"--gin.VOCAB_SIZE={TRAIN_VOCAB}",
        f"--gin.SEQ_LEN={TRAIN_SEQ}",
        "--gin.BATCH_SIZE=8",
        "--gin.TRAIN_STEPS=6",
        "--gin.WARMUP_STEPS=2",
        f"--gin.TrainConfig.data_cache='{train_cache}'",
        "--gin.TrainConfig.peak_flops_per_device=1e10",
        "--no_progress",
    )
    env = cli_env()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "moe-jax train: checkpoint" in proc.stderr and "different model configuration" in proc.stderr
    assert "params/embed/value: checkpoint (320, 32), model (320," in proc.stderr, proc.stderr[-3000:]
    for noise in ("Traceback", "Event loop is closed", "orbax", "--restore_step"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
    assert tree_hashes(workdir) == everything

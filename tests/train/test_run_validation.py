"""Issue 18: values that cannot be right are refused before any compile and before anything is written
to the workdir (config.gin of an earlier run stays as it was); a run that drops most assignments says so."""

import contextlib
import io

import numpy as np
import pytest
from helpers import TRAIN_VOCAB, tiny_model, tiny_train

from moe_jax.config import MoEConfig
from moe_jax.parallel import MeshConfig, ShardingError, build_mesh
from moe_jax.train.config import TrainConfig
from moe_jax.train.loop import train
from moe_jax.train.validate import RunConfigError

OLD_CONFIG = "# an earlier run's configuration\n"


@pytest.fixture
def used_workdir(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "config.gin").write_text(OLD_CONFIG)
    return wd


def assert_untouched(wd):
    assert sorted(p.name for p in wd.iterdir()) == ["config.gin"]
    assert (wd / "config.gin").read_text() == OLD_CONFIG


@pytest.mark.parametrize("factor", [0.0, -1.0])
def test_capacity_factor_must_be_positive(factor):
    with pytest.raises(ValueError, match=rf"MoEConfig.capacity_factor={factor} must be > 0"):
        MoEConfig(dispatch="capacity", capacity_factor=factor)


@pytest.mark.parametrize("rate", [0.0, -1e-3])
def test_learning_rate_must_be_positive(rate):
    with pytest.raises(ValueError, match=rf"TrainConfig.learning_rate={rate} must be > 0.*--gin.LEARNING_RATE"):
        TrainConfig(learning_rate=rate)


def test_unknown_gmm_backend_is_refused_before_anything_is_written(used_workdir, train_cache):
    model = tiny_model(gmm_backend="cutlass")
    with pytest.raises(RunConfigError, match=r"MoEConfig.gmm_backend='cutlass' is not one of \('auto', .*'chunked'"):
        train(used_workdir, model, tiny_train(train_cache), MeshConfig(data=-1), progress=False, gin_config="x")
    assert_untouched(used_workdir)


def test_hash_frequencies_of_the_wrong_shape_are_refused(used_workdir, train_cache, tmp_path):
    freqs = tmp_path / "freqs.npy"
    np.save(freqs, np.ones(TRAIN_VOCAB + 5))
    model = tiny_model().replace(
        moe=MoEConfig(
            num_experts=4, top_k=1, expert_dim=16, router="hash", hash_table="balanced", hash_frequencies=str(freqs)
        )
    )
    with pytest.raises(
        RunConfigError,
        match=rf"has shape \({TRAIN_VOCAB + 5},\), but the model's vocabulary needs "
        rf"\({TRAIN_VOCAB},\)",
    ):
        train(used_workdir, model, tiny_train(train_cache), MeshConfig(data=-1), progress=False, gin_config="x")
    assert_untouched(used_workdir)


def test_batch_that_does_not_split_over_the_mesh_leaves_config_gin(used_workdir, train_cache):
    with pytest.raises(ShardingError, match=r"global batch 6 does not divide by the 8 batch shards"):
        train(
            used_workdir,
            tiny_model(),
            tiny_train(train_cache, batch_size=6),
            MeshConfig(data=-1),
            progress=False,
            gin_config="x",
        )
    assert_untouched(used_workdir)


def test_micro_batch_message_names_the_micro_batch(used_workdir, train_cache):
    cfg = tiny_train(train_cache, batch_size=8, grad_accum_steps=4)  # micro-batches of 2 over 8 shards
    with pytest.raises(
        RunConfigError,
        match=r"the micro-batch of 2 sequences \(batch_size 8 / grad_accum_steps 4\) "
        r"does not divide by the 8 batch shards .*grad_accum_steps to one of \[1\]",
    ):
        train(used_workdir, tiny_model(), cfg, MeshConfig(data=-1), progress=False, gin_config="x")
    assert_untouched(used_workdir)


def test_mesh_flag_errors_name_the_flag_and_fake_devices():
    with pytest.raises(ValueError, match=r"--mesh=expert:two: the size of axis 'expert' is 'two', not an integer"):
        MeshConfig.from_string("expert:two")
    with pytest.raises(
        ValueError,
        match=r"needs 16 devices, but 8 devices are available \(on a CPU, start that many "
        r"fake devices with XLA_FLAGS=--xla_force_host_platform_device_count=16",
    ):
        build_mesh(MeshConfig(data=2, expert=8))


def test_restore_step_that_does_not_exist_is_refused(used_workdir, train_cache):
    from moe_jax.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"--restore_step=7: there is no checkpoint"):
        train(
            used_workdir,
            tiny_model(),
            tiny_train(train_cache),
            MeshConfig(data=-1),
            restore_step=7,
            progress=False,
            gin_config="x",
        )
    assert_untouched(used_workdir)


@pytest.mark.slow
def test_a_run_that_drops_most_assignments_says_so(used_workdir, train_cache):
    model = tiny_model(dispatch="capacity", capacity_factor=0.02)
    cfg = tiny_train(
        train_cache, steps=4, warmup_steps=1, log_every=1, eval_every=0, eval_batches=1, checkpoint_every=4
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train(used_workdir, model, cfg, MeshConfig(data=-1), progress=False, gin_config="# this run\n")
    assert (
        "warning: at step 3 the MoE layers have dropped more than half of the token-to-expert assignments "
        "for 3 logged steps running"
    ) in out.getvalue()
    assert "capacity_factor=0.02" in out.getvalue() and out.getvalue().count("warning: at step") == 1
    # The run started, so config.gin is now this run's; the earlier one is kept beside it.
    assert (used_workdir / "config.gin").read_text() == "# this run\n"
    kept = list(used_workdir.glob("config.gin.*.prev"))
    assert len(kept) == 1 and kept[0].read_text() == OLD_CONFIG and f"the previous one is {kept[0]}" in out.getvalue()


def test_data_build_refuses_a_vocab_of_another_size(tmp_path, train_cache, capsys):
    from moe_jax.data.cli import main

    vocab = train_cache.parent / "vocab.model"
    rc = main(
        [
            "build",
            "--data_dir",
            str(tmp_path / "d"),
            "--text_files",
            f"x={tmp_path}/*.txt",
            "--vocab",
            str(vocab),
            "--vocab_size",
            "4096",
            "--quiet",
        ]
    )
    assert rc == 1
    assert f"--vocab {vocab} has {TRAIN_VOCAB} pieces, but --vocab_size 4096 was given" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()

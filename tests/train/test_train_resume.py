"""Resume through the real command line: SIGKILL then resume is bitwise exact; a save killed midway
leaves the previous checkpoint; a 1-device checkpoint continues on 8 devices with expert parallelism."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import TRAIN_SEQ, TRAIN_VOCAB, cli_env, tiny_train_cmd

pytestmark = pytest.mark.subprocess  # every test trains in `moe-jax train` processes


REPO = Path(__file__).resolve().parents[2]


def train_cmd(workdir, cache, steps, *extra):
    return tiny_train_cmd(
        workdir,
        f"--gin.TRAIN_STEPS={steps}",
        "--gin.WARMUP_STEPS=2",
        f"--gin.VOCAB_SIZE={TRAIN_VOCAB}",
        "--gin.D_MODEL=32",
        "--gin.NUM_HEADS=2",
        "--gin.HEAD_DIM=16",
        "--gin.FFN_DIM=64",
        "--gin.NUM_EXPERTS=8",
        "--gin.TOP_K=3",
        "--gin.EXPERT_DIM=16",
        f"--gin.SEQ_LEN={TRAIN_SEQ}",
        "--gin.BATCH_SIZE=8",
        "--gin.LEARNING_RATE=3e-3",
        f"--gin.TrainConfig.data_cache='{cache}'",
        "--gin.TrainConfig.log_every=1",
        "--gin.TrainConfig.eval_every=0",
        "--gin.TrainConfig.eval_batches=1",
        "--gin.TrainConfig.peak_flops_per_device=1e10",
        "--no_progress",
        *extra,
    )


def run(cmd, devices=1, env=None, **kw):
    return subprocess.run(
        cmd, cwd=REPO, env=cli_env(devices, **(env or {})), capture_output=True, text=True, timeout=600, **kw
    )


def losses(workdir) -> dict[int, float]:
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]  # a resumed run overwrites the steps it repeats
    return out


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_exact(train_cache, tmp_path):
    full = run(train_cmd(tmp_path / "full", train_cache, 8, "--gin.TrainConfig.checkpoint_every=4"))
    assert full.returncode == 0, full.stderr[-3000:]
    # The same run, killed with SIGKILL once the step-4 checkpoint is committed, then resumed.
    wd = tmp_path / "killed"
    proc = subprocess.Popen(
        train_cmd(
            wd, train_cache, 8, "--gin.TrainConfig.checkpoint_every=4", "--gin.TrainConfig.async_checkpointing=False"
        ),
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while (
        not (wd / "checkpoints" / "4" / "commit_success.txt").exists()
        and not (wd / "checkpoints" / "4" / "_CHECKPOINT_METADATA").exists()
    ):
        assert proc.poll() is None and time.time() < deadline, "run ended or timed out before its step-4 checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()}
    assert 4 in done and 8 not in done
    resumed = run(train_cmd(wd, train_cache, 8, "--gin.TrainConfig.checkpoint_every=4"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "restored checkpoint" in resumed.stdout
    a, b = losses(tmp_path / "full"), losses(wd)
    assert sorted(a) == list(range(1, 9))
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]  # bitwise: exact float equality


@pytest.mark.slow
def test_kill_during_checkpoint_save_resumes_from_the_previous_one(train_cache, tmp_path):
    wd = tmp_path / "run"
    crashed = run(
        train_cmd(wd, train_cache, 6, "--gin.TrainConfig.checkpoint_every=3"), env={"MOE_JAX_KILL_DURING_SAVE": "6"}
    )
    assert crashed.returncode == -signal.SIGKILL
    ckpts = wd / "checkpoints"
    assert (ckpts / "3").is_dir() and (ckpts / "3" / "moe_jax_sha256.json").is_file()  # checksummed
    before = {p: p.read_bytes() for p in sorted((ckpts / "3").rglob("*")) if p.is_file()}
    config = (wd / "config.gin").read_text()
    resumed = run(train_cmd(wd, train_cache, 6, "--gin.TrainConfig.checkpoint_every=3"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"restored checkpoint {ckpts / '3'}" in resumed.stdout and "damaged" not in resumed.stdout
    assert "done: step 6" in resumed.stdout
    # Nothing lost: step 3 byte-identical, config.gin as it was, one metrics row per step.
    assert {p: p.read_bytes() for p in sorted((ckpts / "3").rglob("*")) if p.is_file()} == before
    assert (wd / "config.gin").read_text() == config and not list(wd.glob("config.gin.*"))
    rows = [json.loads(line)["step"] for line in (wd / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert rows == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_checkpoint_moves_between_one_and_eight_devices(train_cache, tmp_path):
    base = tmp_path / "one"
    first = run(train_cmd(base, train_cache, 4, "--gin.TrainConfig.checkpoint_every=4"))
    assert first.returncode == 0, first.stderr[-3000:]
    results = {}
    for name, devices, mesh in [("1dev", 1, "data:1"), ("8dev", 8, "data:2,expert:4")]:
        wd = tmp_path / name
        subprocess.run(["cp", "-r", str(base), str(wd)], check=True)
        cont = run(
            train_cmd(wd, train_cache, 7, "--gin.TrainConfig.checkpoint_every=7", f"--mesh={mesh}"), devices=devices
        )
        assert cont.returncode == 0, cont.stderr[-3000:]
        results[name] = losses(wd)
    for step in (5, 6, 7):
        assert results["8dev"][step] == pytest.approx(results["1dev"][step], rel=1e-5)
    # And back: the 8-device checkpoint of step 7 continues on one device.
    back = tmp_path / "back"
    subprocess.run(["cp", "-r", str(tmp_path / "8dev"), str(back)], check=True)
    cont = run(train_cmd(back, train_cache, 9, "--gin.TrainConfig.checkpoint_every=9"), devices=1)
    assert cont.returncode == 0, cont.stderr[-3000:]
    ref = run(train_cmd(tmp_path / "1dev", train_cache, 9, "--gin.TrainConfig.checkpoint_every=9"), devices=1)
    assert ref.returncode == 0, ref.stderr[-3000:]
    for step in (8, 9):
        assert losses(back)[step] == pytest.approx(losses(tmp_path / "1dev")[step], rel=1e-5)

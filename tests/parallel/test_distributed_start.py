"""Issue 18: multi-host start-up says whom it waits for and for how long, the timeout is a flag, and a
coordinator that never answers or a process_id out of range ends in one line (no hang, no traceback),
before anything is written to the workdir."""

import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers import cli_env, tiny_train_cmd

pytestmark = pytest.mark.subprocess  # every test starts `moe-jax train` processes


REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(workdir, *flags):
    cmd, env = tiny_train_cmd(workdir, *flags), cli_env()
    t = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return proc, time.time() - t


def _one_line(text: str) -> str:
    lines = [l for l in text.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "process_id,expected",
    [
        (1, "the coordinator at 127.0.0.1:{port} was unreachable for 3 s (process 1 of 2)"),
        (0, "not every one of the 2 processes joined the coordinator at 127.0.0.1:{port} within 3 s"),
    ],
)
def test_nobody_answers_within_the_timeout(tmp_path, process_id, expected):
    port = _free_port()
    proc, seconds = _train(
        tmp_path / "wd",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={process_id}",
        "--distributed_timeout=3",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "waiting up to 3 s for " in proc.stdout
    assert (
        "the coordinator (process 0) at 127.0.0.1:" in proc.stdout
        if process_id
        else "for the other 1 process(es) to join" in proc.stdout
    )
    line = _one_line(proc.stderr)
    assert expected.format(port=port) in line and "--distributed_timeout" in line
    assert seconds < 60
    assert not (tmp_path / "wd").exists()


def test_process_id_out_of_range_is_one_line(tmp_path):
    proc, _ = _train(tmp_path / "wd", "--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=5")
    assert proc.returncode == 2
    line = _one_line(proc.stderr)
    assert "process_id=5 must be in [0, num_processes=2)" in line and "--process_id from 0 to 1" in line
    assert not (tmp_path / "wd").exists()

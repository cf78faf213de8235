"""Issue 4, item 4: 2 processes x 4 CPU devices on 127.0.0.1 (jax.distributed, gloo collectives) train
a tiny DeepSeekMoE model with its routed experts split across both processes, each process feeding
its own half of the global batch, and reach the losses of 1 process x 8 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from multihost_worker import train_losses

pytestmark = pytest.mark.subprocess  # every test starts processes that talk over jax.distributed


WORKER = Path(__file__).with_name("multihost_worker.py")
STEPS = 3
TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(process_id: int, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [
        sys.executable,
        str(WORKER),
        "--mesh=expert:8",
        "--local_devices=4",
        f"--steps={STEPS}",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={process_id}",
    ]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parents[2]
    )


@pytest.mark.slow
def test_two_processes_match_one_process():
    port = _free_port()
    procs = [_launch(i, port) for i in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:  # only the processes this test started
            if p.poll() is None:
                p.kill()
                p.communicate()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    reports = [next(line for line in out.splitlines() if line.startswith("PROCESS")) for out in outputs]
    assert "rows=0:4 expert_shard_starts=[0, 2, 4, 6]" in reports[0]  # process 0: experts 0-7
    assert "rows=4:8 expert_shard_starts=[8, 10, 12, 14]" in reports[1]  # process 1: experts 8-15
    two = json.loads(next(line for line in outputs[0].splitlines() if line.startswith("LOSSES"))[len("LOSSES ") :])

    one, report = train_losses("expert:8", STEPS)  # this process: 1 x 8 devices
    assert "devices=8 rows=0:8" in report
    print(f"1 process x 8 devices: {one}\n2 processes x 4 devices: {two}")
    np.testing.assert_allclose(two, one, rtol=1e-5)
    assert two[-1] < two[0]

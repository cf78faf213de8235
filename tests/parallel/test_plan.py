"""`moe-jax plan` (issue 5 item 4): ahead-of-time compile of one training step on a fake-device mesh."""

import json

import pytest

from moe_jax import cli
from moe_jax.train import plan


@pytest.mark.slow
def test_plan_reports_per_device_memory(capsys):
    code = cli.main(
        [
            "plan",
            "--model=gshard_tiny",
            "--gin_file=runs/proxy_cpu.gin",
            "--mesh=data:2,expert:4",
            "--batch_size=8",
            "--seq_len=32",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["fits"]
    assert report["mesh"] == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert 0 < 2 * report["params"] <= report["opt_state"] < 2 * report["params"] + 64  # AdamW mu, nu + counts
    assert report["peak"] >= report["arguments"] > report["params"]
    assert report["temporaries"] > 0


def test_plan_names_bad_sizes(capsys):
    code = plan.main(["--model=deepseekmoe_tiny", "--gin_file=runs/proxy_cpu.gin", "--mesh=data:2,expert:4"])
    err = capsys.readouterr().err
    assert code == 2
    assert "num_experts=63 routed experts do not divide by the expert axis size 4" in err
    assert plan.main(["--model=gshard_tiny", "--mesh=data:-1,expert:4"]) == 2
    assert "give every axis size explicitly" in capsys.readouterr().err

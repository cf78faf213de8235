"""`moe-jax sweep --status`: each run's state, training time and an estimate of the hours left, read from
fake workdirs (runs/proxy_cpu.gin: 300 steps of 16 x 256 = 4096 tokens), writing nothing."""

import json
import os
from pathlib import Path

import pytest

from moe_jax.sweep.family import Family, Member, load_family
from moe_jax.sweep.status import family_status, format_status

FAMILY_FILE = """from moe_jax.sweep.family import Family, Member
FAMILY = Family(
    name="fam",
    members=(
        Member("gshard", "gshard_tiny"),
        Member("dsm", "deepseekmoe_tiny", seeds=(0, 1)),
        Member("gshard2", "gshard_tiny", seeds=(0, 1)),
    ),
    seeds=(0, 1, 2),
    base=("runs/proxy_cpu.gin",),
)
"""


def _family_file(tmp_path: Path) -> Path:
    path = tmp_path / "experiments" / "fam.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(FAMILY_FILE)
    return path


def _workdir(wd: Path, member: str, model: str, records=(), finished: bool = False) -> Path:
    """A run's workdir as `moe-jax train` leaves it: config.gin, member.json, metrics.jsonl rows and, once
    finished, result.json."""
    from moe_jax.configs.gin_utils import model_gin_path

    wd.mkdir(parents=True)
    (wd / "config.gin").write_text(f"include '{model_gin_path(model)}'\ninclude 'runs/proxy_cpu.gin'\n")
    (wd / "member.json").write_text(json.dumps({"member": member, "seed": int(wd.name[-1]), "model": model}))
    if records:
        (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        (wd / "result.json").write_text(json.dumps({"stopped": "done", "heldout_loss": 5.0}))
    return wd


def _flops(model: str) -> float:
    """Training FLOPs per token of a tiny model at runs/proxy_cpu.gin's 256 tokens (`count_params`)."""
    from moe_jax.config import ModelConfig
    from moe_jax.configs.gin_utils import model_gin_path, parse_gin
    from moe_jax.model.params import count_params

    parse_gin([str(model_gin_path(model)), "runs/proxy_cpu.gin"], ())
    return count_params(ModelConfig(), 256).flops / 256


@pytest.fixture
def sweep_dirs(tmp_path):
    """gshard_s0 finished (150 s + 300 s = 450 s), gshard_s1 a link to a finished run of another family
    (1200 s), dsm_s0 interrupted at step 30 (40 s + 10 s = 50 s), gshard2_s1 just started (config.gin, no
    metrics yet); gshard_s2, dsm_s1 and gshard2_s0 not started."""
    root = tmp_path / "runs"
    rows = [{"step": 150, "tokens_per_second": 4096.0}, {"step": 300, "tokens_per_second": 2048.0}]
    _workdir(root / "gshard_s0", "gshard", "gshard_tiny", rows + [{"step": 300, "heldout/loss": 5.0}], True)
    other = _workdir(
        tmp_path / "other" / "gshard_s1", "gshard", "gshard_tiny", [{"step": 300, "tokens_per_second": 1024.0}], True
    )
    (root / "gshard_s1").symlink_to(other)
    dsm = _workdir(
        root / "dsm_s0",
        "dsm",
        "deepseekmoe_tiny",
        [
            {"step": 20, "tokens_per_second": 2048.0},
            {"step": 20, "heldout/loss": 6.0},
            {"step": 30, "tokens_per_second": 4096.0},
        ],
    )
    with (dsm / "metrics.jsonl").open("a") as f:
        f.write('{"step": 40, "tokens_per')  # a row the live run is still writing
    _workdir(root / "gshard2_s1", "gshard2", "gshard_tiny")
    return tmp_path


def test_status_states_links_and_remaining_hours(sweep_dirs):
    """Hand-computed: gshard's finished runs took 450 s and 1200 s; at their median window rates (3072 and
    1024 tokens/s) their 300 steps take 400 s and 1200 s (mean 800 s); dsm_s0 ran 30 steps in 50 s (mean
    30 x 4096 / 50 = 2457.6 tokens/s; median of its windows (2048 + 4096) / 2 = 3072 tokens/s), so its 270
    steps left take 270 x 4096 / 3072 = 360 s; gshard_s2 (same member) and gshard2_s0, gshard2_s1 (no
    finished run of their own, same model gshard_tiny) take 800 s each; dsm_s1 (no finished run of its
    member or model) takes its 300 x 4096 tokens at the median training FLOP/s of the finished runs (median
    of 3072 and 1024 tokens/s = 2048, times gshard_tiny's FLOPs per token): 600 s x the FLOP ratio r.
    360 + 3 x 800 + 600 r s = 0.93 run-hours, 0.47 with 2 at once."""
    fam = load_family(_family_file(sweep_dirs))
    root = sweep_dirs / "runs"
    status = {s.name: s for s in family_status(fam, root)}
    assert list(status) == ["gshard_s0", "gshard_s1", "gshard_s2", "dsm_s0", "dsm_s1", "gshard2_s0", "gshard2_s1"]
    assert {n: s.state for n, s in status.items()} == {
        "gshard_s0": "finished",
        "gshard_s1": "finished",
        "gshard_s2": "not started",
        "dsm_s0": "running or interrupted",
        "dsm_s1": "not started",
        "gshard2_s0": "not started",
        "gshard2_s1": "running or interrupted",
    }
    assert status["gshard_s1"].link == sweep_dirs / "other" / "gshard_s1" and status["gshard_s0"].link is None
    assert [status[n].hours * 3600 for n in ("gshard_s0", "gshard_s1", "dsm_s0")] == pytest.approx([450, 1200, 50])
    assert status["gshard_s0"].tokens_per_second == pytest.approx(300 * 4096 / 450)
    dsm = status["dsm_s0"]
    assert (dsm.step, dsm.steps, dsm.tokens_per_step) == (30, 300, 4096)
    assert dsm.tokens_per_second == pytest.approx(2457.6) and dsm.median_tokens_per_second == pytest.approx(3072)
    left = {n: None if s.left is None else s.left * 3600 for n, s in status.items()}
    assert left == {
        "gshard_s0": 0.0,
        "gshard_s1": 0.0,
        "gshard_s2": pytest.approx(800),
        "dsm_s0": pytest.approx(360),
        "dsm_s1": pytest.approx(600 * _flops("deepseekmoe_tiny") / _flops("gshard_tiny")),
        "gshard2_s0": pytest.approx(800),
        "gshard2_s1": pytest.approx(800),
    }
    assert status["gshard2_s0"].left_from == "mean of 2 finished run(s) of model gshard_tiny"
    text = format_status(fam, root, list(status.values()), parallel=2)
    lines = text.splitlines()
    assert lines[0] == f"fam in {root}: 7 runs (2 finished, 2 running or interrupted, 3 not started)"
    assert (
        lines[2].startswith("gshard_s1")
        and f"finished; link -> {sweep_dirs / 'other' / 'gshard_s1'}; 0.33 h" in lines[2]
    )
    assert "running or interrupted: step 30/300; 0.01 h trained, 2,458 tokens/s; left ~0.1" in lines[4]
    assert lines[4].endswith(" h (own throughput)")
    assert (
        "running or interrupted: step 0/300; left ~0.22 h (mean of 2 finished run(s) of model gshard_tiny)" in lines[7]
    )
    assert lines[5].endswith("not started; left ~0.17 h (its FLOPs at the median FLOP/s of 2 finished run(s))")
    assert lines[8].startswith("Remaining: ~0.9 run-hours; with --parallel 2: ~0.5 wall-hours.")
    assert "own throughput" in lines[9]


def test_status_estimate_ignores_a_paused_window(tmp_path):
    """A run stopped for an hour between steps 40 and 50 (e.g. by a benchmark pausing other processes): that
    window logs 10 x 4096 / 3610 s. Its mean throughput falls to 50 x 4096 / 3650 s, but the steps left are
    estimated at its median window rate, 4096 tokens/s: 250 x 4096 / 4096 = 250 s, not about 5 hours."""
    rows = [{"step": s, "tokens_per_second": 4096.0} for s in (10, 20, 30, 40)]
    rows.append({"step": 50, "tokens_per_second": 10 * 4096 / 3610})
    _workdir(tmp_path / "runs" / "dsm_s0", "dsm", "deepseekmoe_tiny", rows)
    fam = load_family(_family_file(tmp_path))
    dsm = {s.name: s for s in family_status(fam, tmp_path / "runs")}["dsm_s0"]
    assert dsm.hours * 3600 == pytest.approx(3650) and dsm.tokens_per_second == pytest.approx(50 * 4096 / 3650)
    assert dsm.left * 3600 == pytest.approx(250) and dsm.left_from == "own throughput"
    # Finished with the pause in it, it estimates its next seed at its own rate too: 300 steps in 300 s.
    rows += [{"step": s, "tokens_per_second": 4096.0} for s in range(60, 310, 10)]
    (tmp_path / "runs" / "dsm_s0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "runs" / "dsm_s0" / "result.json").write_text(json.dumps({"stopped": "done"}))
    nxt = {s.name: s for s in family_status(fam, tmp_path / "runs")}["dsm_s1"]
    assert nxt.left * 3600 == pytest.approx(300) and nxt.left_from == "mean of 1 finished run(s) of member dsm"


def test_status_estimates_from_finished_runs_not_asked_for(sweep_dirs):
    """With --seeds 2 only gshard_s2 is listed; its estimate still comes from the finished seeds 0 and 1."""
    fam = Family(name="fam", members=(Member("gshard", "gshard_tiny"),), seeds=(0, 1, 2), base=("runs/proxy_cpu.gin",))
    (only,) = family_status(fam, sweep_dirs / "runs", seeds=[2])
    assert only.name == "gshard_s2" and only.left * 3600 == pytest.approx(800)
    assert only.left_from == "mean of 2 finished run(s) of member gshard"


def _snapshot(top: Path) -> dict:
    """Every path under `top` (links not followed) with its kind, link target or content, and mtime."""
    out = {}
    for folder, dirs, files in os.walk(top):
        for name in dirs + files:
            p = Path(folder) / name
            what = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
            out[str(p.relative_to(top))] = (what, p.lstat().st_mtime_ns)
    return out


def test_status_writes_nothing_and_a_missing_root_is_all_not_started(sweep_dirs, tmp_path_factory, capsys):
    from moe_jax.sweep.cli import main

    family_file = _family_file(tmp_path_factory.mktemp("experiments"))
    before = _snapshot(sweep_dirs)
    assert main([str(family_file), "--status", f"--workdir={sweep_dirs / 'runs'}", "--parallel", "2"]) == 0
    assert _snapshot(sweep_dirs) == before  # no report, member.json, link or directory
    out = capsys.readouterr().out
    assert "7 runs (2 finished, 2 running or interrupted, 3 not started)" in out and "2: ~0.5 wall-hours" in out
    missing = sweep_dirs / "nowhere"
    assert main([str(family_file), "--status", f"--workdir={missing}", "--only", "gshard"]) == 0
    assert not missing.exists()
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"fam in {missing}: 3 runs (0 finished, 0 running or interrupted, 3 not started)"
    assert "3 run(s) have no estimate" in out


def test_status_and_report_are_exclusive(tmp_path, capsys):
    from moe_jax.sweep.cli import main

    with pytest.raises(SystemExit) as err:
        main(["experiments/table1.py", "--status", "--report", f"--workdir={tmp_path}"])
    assert err.value.code == 2
    assert "--status and --report are exclusive" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_an_unseen_model_is_estimated_from_its_flops_at_the_finished_runs_flop_rate(tmp_path):
    """No finished run of DeepSeekMoE: its 300 steps x 4096 tokens are costed at the training FLOP/s of
    the finished GShard (4096 tokens/s x its FLOPs per token); with several families, a run not started
    that is exactly another family's run left is counted once."""
    from moe_jax.sweep.status import sweep_total

    rows = [{"step": 150, "tokens_per_second": 4096.0}, {"step": 300, "tokens_per_second": 4096.0}]
    _workdir(tmp_path / "a" / "gshard_s0", "gshard", "gshard_tiny", rows, True)
    base = ("runs/proxy_cpu.gin",)
    a = Family(name="a", members=(Member("gshard", "gshard_tiny"), Member("dsm", "deepseekmoe_tiny")), base=base)
    b = Family(name="b", members=(Member("1s_7of63", "ablation_1s_7of63_tiny"),), base=base)
    a_status = family_status(a, tmp_path / "a")
    dsm = a_status[1]
    assert dsm.name == "dsm_s0" and dsm.left_from == "its FLOPs at the median FLOP/s of 1 finished run(s)"
    ratio = _flops("deepseekmoe_tiny") / _flops("gshard_tiny")
    assert ratio > 1.0 and dsm.left * 3600 == pytest.approx(300 * ratio, rel=1e-6)
    total = sweep_total([a, b], [a_status, family_status(b, tmp_path / "b")])
    assert total.startswith("All 2 families: 2 runs left, of which 1 are another family's run")
    assert f"~{dsm.left:.1f} run-hours" in total

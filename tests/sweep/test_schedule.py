"""Several families in one queue (moe_jax.sweep.schedule): seed-major order, a run shared by families
trained once and linked, each family's follow-ups on the linked run, runs stored and families reported
as they end, a failure failing only the runs waiting on it. Training is faked by a script that writes
what a finished run leaves (result.json, config.gin), so the queue's logic runs in seconds."""

import json
import sys
from pathlib import Path

import pytest

from moe_jax.sweep import runner, schedule
from moe_jax.sweep.family import Family, FollowUp, Member

FAKE_TRAIN = """
import json, os, sys
from pathlib import Path
wd, name, log, config = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
with open(log, "a") as f:
    f.write(f"train {wd.parent.name}/{name}\\n")
if os.environ.get("FAIL_RUN") == name:
    sys.exit(3)
wd.mkdir(parents=True, exist_ok=True)
(wd / "config.gin").write_text(config)
(wd / "result.json").write_text(json.dumps({"stopped": "done", "heldout_loss": 5.0 + len(name) / 100}))
"""

FAKE_FOLLOW_UP = """
import sys
from pathlib import Path
wd, out, log = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(log, "a") as f:
    f.write(f"follow-up {wd.name}\\n")
(wd / out).parent.mkdir(parents=True, exist_ok=True)
(wd / out).write_text("{}")
"""

SPEC = FollowUp(("analyze",), "analysis/x.json")


def _families():
    base = ("runs/proxy_cpu.gin",)
    t1 = Family(name="t1", members=(Member("dense", "dense_tiny"), Member("gshard", "gshard_tiny")), base=base)
    fig = Family(
        name="fig",
        members=(Member("0s_2of16", "ablation_0s_2of16_tiny"), Member("1s_3of31", "ablation_1s_3of31_tiny")),
        base=base,
    )
    spec = Family(name="spec", members=(Member("gshard", "gshard_tiny", seeds=(0,)),), base=base, follow_ups=(SPEC,))
    return [t1, fig, spec]


def _config(run, extra=()) -> str:
    """The config.gin `moe-jax train` would write for the run (what `restore_runs` compares)."""
    import gin
    from moe_jax.configs.gin_utils import model_gin_path, parse_gin

    files = (str(model_gin_path(run.model)), *run.gin_files)
    parse_gin(files, (*run.bindings, *extra), modules=("moe_jax.train.config",))
    return gin.config_str()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    log = tmp_path / "launches.log"
    monkeypatch.setattr(
        runner,
        "train_command",
        lambda run, wd, extra=(): [sys.executable, "-c", FAKE_TRAIN, str(wd), run.name, str(log), _config(run, extra)],
    )
    monkeypatch.setattr(
        runner,
        "follow_up_command",
        lambda step, wd: [sys.executable, "-c", FAKE_FOLLOW_UP, str(wd), step.output, str(log)],
    )
    monkeypatch.setattr(schedule, "POLL_SECONDS", 0.02)
    return log


def test_shared_runs_train_once_seed_by_seed_and_are_stored_as_they_end(tmp_path, fake, capsys):
    families, work, results = _families(), tmp_path / "work", tmp_path / "results"
    roots = [work / f.name for f in families]
    opts = schedule.Options(seeds=(0, 1))
    schedule.run_sweep(families, roots, opts, parallel=1, results=results)
    assert fake.read_text().splitlines() == [
        "train t1/dense_s0",
        "train t1/gshard_s0",
        "follow-up gshard_s0",  # spec's analysis of t1's GShard, linked, not retrained, before any training
        "train fig/1s_3of31_s0",
        "train t1/dense_s1",
        "train t1/gshard_s1",
        "train fig/1s_3of31_s1",
    ]
    for name in ("0s_2of16_s0", "0s_2of16_s1"):
        assert (work / "fig" / name).resolve() == (work / "t1" / name.replace("0s_2of16", "gshard")).resolve()
    assert (work / "spec" / "gshard_s0").resolve() == (work / "t1" / "gshard_s0").resolve()
    out = capsys.readouterr().out
    assert "fig/0s_2of16_s0: queued, waits for t1/gshard_s0 (the same run), then links it" in out
    assert "[1/9] t1/dense_s0: launched on CPU core" in out
    # Stored as they ended: a linked run once, under the family that trained it; each family reported.
    assert (results / "fig" / "runs" / "0s_2of16_s1").resolve() == results / "t1" / "runs" / "gshard_s1"
    assert (results / "t1" / "runs" / "gshard_s0" / "analysis" / "x.json").exists()
    for family in ("t1", "fig", "spec"):
        assert (results / family / "summary.md").exists(), family
    member = json.loads((work / "t1" / "dense_s0" / "member.json").read_text())
    assert member["code"] == [runner.code_version()] or runner.code_version() is None
    # Rerun: everything is finished, nothing launched.
    before = fake.read_text()
    schedule.run_sweep(families, roots, opts, parallel=1, results=results)
    assert fake.read_text() == before
    assert "launched" not in capsys.readouterr().out


def test_a_new_machine_restores_the_stored_runs_and_trains_only_the_rest(tmp_path, fake, capsys):
    """Workdirs lost, the store kept (a new VM): the sweep copies each stored finished run back, links
    the runs families share again, trains only what the store lacks, and never retrains a stored run; a stored
    run trained with other settings is trained again, not restored. `--status` counts the stored runs."""
    import shutil

    from moe_jax.sweep.status import family_status

    families, results, work = _families(), tmp_path / "results", tmp_path / "work"
    roots = [work / f.name for f in families]
    schedule.run_sweep(families, roots, schedule.Options(seeds=(0,)), parallel=1, results=results)
    shutil.rmtree(work)
    fake.write_text("")
    states = [s.state for s in family_status(families[0], roots[0], seeds=(0, 1), results=results)]
    assert states == ["finished", "not started", "finished", "not started"]
    assert {s.state for s in family_status(families[0], roots[0], seeds=(0, 1))} == {"not started"}
    other = results / "t1" / "runs" / "dense_s0" / "config.gin"
    other.write_text(other.read_text() + "TrainConfig.steps = 7\n")
    capsys.readouterr()
    schedule.run_sweep(families, roots, schedule.Options(seeds=(0, 1)), parallel=1, results=results)
    assert fake.read_text().splitlines() == [
        "train t1/dense_s0",  # its stored config.gin says another number of steps
        "train t1/dense_s1",
        "train t1/gshard_s1",
        "train fig/1s_3of31_s1",
    ]
    out = capsys.readouterr().out
    assert f"t1/gshard_s0: restored from {results / 't1' / 'runs' / 'gshard_s0'} (finished; no checkpoint)" in out
    assert "t1/dense_s0: the stored run at" in out and "was trained otherwise; training it" in out
    for link in (work / "fig" / "0s_2of16_s0", work / "spec" / "gshard_s0"):
        assert link.is_symlink() and link.resolve() == (work / "t1" / "gshard_s0").resolve()
    assert (work / "t1" / "gshard_s0" / "analysis" / "x.json").exists()  # the follow-up's output came back
    assert (work / "fig" / "1s_3of31_s0" / "result.json").read_bytes() == (
        results / "fig" / "runs" / "1s_3of31_s0" / "result.json"
    ).read_bytes()


def test_a_failed_run_fails_only_the_runs_waiting_on_it(tmp_path, fake, monkeypatch, capsys):
    monkeypatch.setenv("FAIL_RUN", "gshard_s0")
    families, work = _families(), tmp_path / "work"
    with pytest.raises(RuntimeError, match=r"\['t1/gshard_s0', 'fig/0s_2of16_s0', 'spec/gshard_s0'\]"):
        schedule.run_sweep(families, [work / f.name for f in families], schedule.Options(seeds=(0,)), parallel=2)
    assert sorted(fake.read_text().splitlines()) == ["train fig/1s_3of31_s0", "train t1/dense_s0", "train t1/gshard_s0"]
    out = capsys.readouterr().out
    assert "fig/0s_2of16_s0: not run (t1/gshard_s0 failed)" in out
    assert not (work / "fig" / "0s_2of16_s0").exists()


def test_an_unknown_member_is_named_with_every_family_s_members(tmp_path):
    with pytest.raises(ValueError, match=r"no family has member \['x'\]; their members: \{'t1': \['dense', 'gshard'\]"):
        schedule.run_sweep(_families(), [tmp_path / "a", tmp_path / "b", tmp_path / "c"], schedule.Options(only=["x"]))
    # --only keeps the named members of every family that has them.
    runs = schedule.select(_families(), schedule.Options(seeds=(0,), only=["gshard"]))
    assert [[r.name for r in rs] for rs in runs] == [["gshard_s0"], [], ["gshard_s0"]]


def test_the_cli_takes_several_families_into_one_workdir_root(tmp_path, monkeypatch, capsys):
    from moe_jax.sweep.cli import main

    for name in ("a", "b"):
        (tmp_path / f"{name}.py").write_text(
            "from moe_jax.sweep.family import Family, Member\n"
            f"FAMILY = Family(name='{name}', members=(Member('gshard', 'gshard_tiny'),), seeds=(0,))\n"
        )
    monkeypatch.chdir(tmp_path)
    assert main(["a.py", "b.py", "--status"]) == 0
    out = capsys.readouterr().out
    assert "workdirs/a" in out and "workdirs/b" in out
    with pytest.raises(SystemExit):
        main(["a.py", "a.py", "--status"])
    assert "a family is given twice" in capsys.readouterr().err
    assert Path("workdirs").exists() is False


SLOW_TRAIN = """
import signal, sys, time
from pathlib import Path
wd, log = Path(sys.argv[1]), sys.argv[2]
def save(signum, frame):
    with open(log, "a") as f:
        f.write(f"checkpoint {wd.name}\\n")
    sys.exit(130)
signal.signal(signal.SIGINT, save)
with open(log, "a") as f:
    f.write(f"started {wd.name}\\n")
time.sleep(120)
"""

DRIVER = """
import signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a shell does to a background job
from moe_jax.sweep import runner
from moe_jax.sweep.cli import main
fam, root, log, slow = sys.argv[1:5]
runner.train_command = lambda run, wd, extra=(): [sys.executable, "-c", slow, str(wd), log]
runner.follow_up_command = lambda step, wd: [sys.executable, "-c", "print('follow-up')"]
sys.exit(main([fam, "--workdir", root, "--parallel", "2"]))
"""


@pytest.mark.parametrize("sig,follow_up", [("SIGTERM", False), ("SIGINT", False), ("SIGINT", True)])
def test_a_signal_stops_the_queue_and_every_member_saves(tmp_path, sig, follow_up):
    """SIGTERM (a session's end) or SIGINT (even when the shell started the sweep with SIGINT ignored)
    has every running member checkpoint (it gets SIGINT) and the sweep exit 130; also when a member's
    training is chained with a follow-up (`bash -c "train && follow-up"`: the signal goes to the whole
    process group, not only to the shell, which would leave the training running)."""
    import signal
    import subprocess
    import time

    from helpers import cli_env

    follow_ups = "(FollowUp(('analyze',), 'out.json'),)" if follow_up else "()"
    (tmp_path / "fam.py").write_text(
        "from moe_jax.sweep.family import Family, FollowUp, Member\n"
        "FAMILY = Family(name='fam', members=(Member('a', 'gshard_tiny'), Member('b', 'dense_tiny')), "
        f"follow_ups={follow_ups})\n"
    )
    log = tmp_path / "log"
    args = [tmp_path / "fam.py", tmp_path / "runs", log, SLOW_TRAIN]
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, args)], env=cli_env(), text=True)
    deadline = time.time() + 120
    while not log.exists() or log.read_text().count("started") < 2:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(getattr(signal, sig))
    assert proc.wait(timeout=60) == 130
    assert sorted(log.read_text().split("\n")[2:4]) == ["checkpoint a_s0", "checkpoint b_s0"]
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "runs")], capture_output=True).stdout == b""

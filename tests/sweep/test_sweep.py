"""The sweep runner: members in their own workdirs, finished members skipped after an interruption,
reports regenerated from stored results alone."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TRAIN_SEQ, TRAIN_VOCAB, cli_env

from moe_jax.sweep.family import PROXY_SCALES, Family, Member, Scale, load_family

REPO = Path(__file__).resolve().parents[2]


def write_family(path: Path, cache: Path) -> Path:
    shrink = [
        f"VOCAB_SIZE={TRAIN_VOCAB}",
        "D_MODEL=32",
        "NUM_HEADS=2",
        "HEAD_DIM=16",
        "FFN_DIM=64",
        f"SEQ_LEN={TRAIN_SEQ}",
        "BATCH_SIZE=8",
        "TRAIN_STEPS=4",
        "WARMUP_STEPS=1",
        f"TrainConfig.data_cache='{cache}'",
        "TrainConfig.eval_batches=1",
        "TrainConfig.log_every=1",
        "TrainConfig.peak_flops_per_device=1e10",
    ]
    path.write_text(f"""from moe_jax.sweep.family import Family, Member
FAMILY = Family(
    name="tiny_family",
    members=(Member("dense", "dense_tiny"), Member("moe", "switch_tiny", bindings=("EXPERT_DIM=16",))),
    bindings={tuple(shrink)!r},
    paper={{"dense": {{"pile_loss": 2.06}}, "moe": {{"pile_loss": 1.88}}}},
)
""")
    return path


def sweep(args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "moe_jax.cli", "sweep", *map(str, args)],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_family_expands_members_seeds_and_scales():
    fam = Family(
        name="f",
        members=(Member("a", "gshard_tiny"), Member("b", "deepseekmoe_tiny", ("TOP_K=3",))),
        seeds=(0, 1),
        scales={"paper": Scale(model_suffix=("_tiny", "_2b"), base=("runs/pretrain_2b.gin",))},
    )
    runs = fam.runs()
    assert [r.name for r in runs] == ["a_s0", "a_s1", "b_s0", "b_s1"]
    assert runs[3].bindings == ("TOP_K=3", "TrainConfig.seed=1")
    paper = fam.runs(seeds=[5], scale="paper")
    assert [(r.model, r.gin_files) for r in paper] == [
        ("gshard_2b", ("runs/pretrain_2b.gin",)),
        ("deepseekmoe_2b", ("runs/pretrain_2b.gin",)),
    ]
    with pytest.raises(ValueError, match="no scale 'huge'"):
        fam.runs(scale="huge")


def test_every_experiment_file_loads_and_names_existing_models():
    from moe_jax.configs.gin_utils import model_gin_path

    for path in sorted(p for p in (REPO / "experiments").glob("*.py") if p.name != "claims.py"):  # claims: no family
        fam = load_family(path)
        for scale in (None, *fam.scales):
            for run in fam.runs(scale=scale):
                assert model_gin_path(run.model).exists(), (path.name, scale, run.model)


@pytest.mark.slow
@pytest.mark.subprocess
def test_interrupted_sweep_resumes_without_retraining_finished_members(train_cache, tmp_path):
    fam = write_family(tmp_path / "tiny_family.py", train_cache)
    root = tmp_path / "runs"
    proc = sweep([fam, f"--workdir={root}"])
    deadline = time.time() + 300
    while not (root / "dense_s0" / "result.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # while the second member trains (or starts)
    proc.wait(timeout=600)  # a hang guard: on a loaded machine the member saves slowly
    first = (root / "dense_s0" / "result.json").stat().st_mtime_ns
    assert json.loads((root / "dense_s0" / "result.json").read_text())["stopped"] == "done"
    again = sweep([fam, f"--workdir={root}"])
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    assert "dense_s0: finished, skipped" in out
    # moe_s0 resumes, unless (on a loaded machine) it finished before the interrupt arrived.
    assert "[1/1] moe_s0: launched on CPU core" in out or "moe_s0: finished, skipped" in out, out[-3000:]
    assert (root / "dense_s0" / "result.json").stat().st_mtime_ns == first  # not retrained
    assert json.loads((root / "moe_s0" / "result.json").read_text())["stopped"] == "done"
    report = root / "report"
    for name in ("results.csv", "summary.md", "loss_curves.png", "bar_heldout_loss.png"):
        assert (report / name).exists(), name
    summary = (report / "summary.md").read_text()
    assert "| dense |" in summary and "2.0600" in summary  # the paper's number beside ours
    meta = json.loads((train_cache / "meta.json").read_text())
    assert f"Data: token cache `{meta['corpus_fingerprint'][:8]}/{meta['vocab_sha256'][:8]}`" in summary
    # The report is regenerated from stored results alone.
    for f in report.iterdir():
        f.unlink()
    regen = sweep([fam, f"--workdir={root}", "--report"])
    out, _ = regen.communicate(timeout=300)
    assert regen.returncode == 0, out[-3000:]
    assert (report / "summary.md").read_text() == summary
    assert "finished, skipped" not in out and "queued" not in out and "launched" not in out
    # Kept in the repository's way (--results): the same report from the runs' small files alone.
    results = tmp_path / "results"
    for _ in ("store, then report", "report from the stored runs alone"):
        proc = sweep([fam, f"--workdir={root}", "--report", f"--results={results}"])
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
        assert (results / "tiny_family" / "summary.md").read_text() == summary
        shutil.rmtree(root, ignore_errors=True)
    stored = results / "tiny_family" / "runs"
    assert sorted(p.name for p in stored.iterdir()) == ["dense_s0", "moe_s0"]
    assert not list(stored.rglob("checkpoints")) and (stored / "moe_s0" / "metrics.jsonl").exists()


@pytest.mark.subprocess
def test_follow_ups_run_after_training_and_join_the_report(tmp_path):
    """A follow-up (e.g. `analyze`) runs on trained members whose output is missing; its metrics join
    the report through the family's summariser."""
    from moe_jax.sweep.family import FollowUp
    from moe_jax.sweep.report import collect
    from moe_jax.sweep.runner import pending_commands

    step = FollowUp(
        ("analyze", "--heldout_batches=2"), "analysis/specialization.json", "moe_jax.evaluate.analyze:summary_metrics"
    )
    fam = Family(name="f", members=(Member("a", "deepseekmoe_tiny"),), follow_ups=(step,))
    run = fam.runs()[0]
    wd = tmp_path / run.name
    cmds = pending_commands(run, wd, fam)
    assert [c[3] for c in cmds] == ["train", "analyze"] and cmds[1][-1] == f"--workdir={wd}"
    wd.mkdir()
    (wd / "result.json").write_text(json.dumps({"stopped": "done", "heldout_loss": 5.5}))
    (wd / "member.json").write_text(json.dumps({"member": "a", "seed": 0, "model": "deepseekmoe_tiny"}))
    assert [c[3] for c in pending_commands(run, wd, fam)] == ["analyze"]  # trained: only the analysis left
    report = {
        "plain": {"loss": 5.5},
        "disable_top_experts": [
            {"label": "0", "loss": 5.5},
            {"label": "1/16", "loss": 5.9},
            {"label": "4/16", "skipped": "too few experts"},
        ],
        "fewer_activated": [{"activated_routed": 6, "loss": 5.6}, {"activated_routed": 7, "loss": 5.5}],
        "shared_disabled": {"loss": 6.2},
    }
    (wd / "analysis").mkdir()
    (wd / step.output).write_text(json.dumps(report))
    assert pending_commands(run, wd, fam) == []
    row = collect(tmp_path, fam)[0]
    assert row["heldout_loss"] == 5.5 and row["disable_top_1/16"] == 5.9 and row["shared_disabled"] == 6.2
    assert row["top_k=6"] == 5.6 and "disable_top_4/16" not in row


def test_only_runs_the_named_members_and_rejects_unknown_ones(tmp_path):
    from moe_jax.sweep.schedule import run_family

    fam = Family(name="f", members=(Member("a", "gshard_tiny"), Member("b", "deepseekmoe_tiny")))
    with pytest.raises(ValueError, match=r"no member \['c'\].*\['a', 'b'\]"):
        run_family(fam, tmp_path, only=["c"])
    (tmp_path / "b_s0").mkdir()
    (tmp_path / "b_s0" / "result.json").write_text(json.dumps({"stopped": "done"}))
    assert [r.name for r in run_family(fam, tmp_path, only=["b"])] == ["b_s0"]  # finished: nothing launched
    assert not (tmp_path / "a_s0").exists()


def test_a_run_linked_from_another_family_is_reported_under_this_family_member(tmp_path):
    from moe_jax.sweep.report import collect

    other = tmp_path / "table1" / "deepseekmoe_s0"
    other.mkdir(parents=True)
    (other / "member.json").write_text(
        json.dumps({"member": "deepseekmoe", "label": "DeepSeekMoE", "seed": 0, "model": "deepseekmoe_tiny"})
    )
    (other / "result.json").write_text(json.dumps({"stopped": "done", "heldout_loss": 5.8}))
    fam = Family(name="fig3", members=(Member("1s_7of63", "ablation_1s_7of63_tiny", label="1 + 7/63"),))
    root = tmp_path / "fig3"
    root.mkdir()
    (root / "1s_7of63_s0").symlink_to(other)
    (row,) = collect(root, fam)
    assert (row["member"], row["label"], row["seed"], row["heldout_loss"]) == ("1s_7of63", "1 + 7/63", 0, 5.8)


def test_runs_on_different_data_builds_are_flagged_in_the_report(tmp_path):
    from moe_jax.sweep.report import collect, data_note

    fam = Family(name="f", members=(Member("a", "gshard_tiny"), Member("b", "deepseekmoe_tiny")))
    for run, corpus in (("a_s0", "c0ffee00aa"), ("b_s0", "c0ffee00aa"), ("b_s1", "deadbeefbb")):
        (tmp_path / run).mkdir()
        (tmp_path / run / "member.json").write_text(json.dumps({"member": run[0], "seed": int(run[-1]), "model": "x"}))
        (tmp_path / run / "result.json").write_text(
            json.dumps(
                {
                    "stopped": "done",
                    "heldout_loss": 5.5,
                    "data": {"cache": "default_v8192_s512", "corpus_fingerprint": corpus, "vocab_sha256": "0123456789"},
                }
            )
        )
    rows = collect(tmp_path, fam)
    assert [r["data"] for r in rows] == ["c0ffee00/01234567", "c0ffee00/01234567", "deadbeef/01234567"]
    note = data_note(rows)
    assert note.startswith("**Warning") and "`deadbeef/01234567`: b_s1" in note and "a_s0, b_s0" in note
    (tmp_path / "b_s1" / "result.json").unlink()
    assert (
        data_note(collect(tmp_path, fam))
        == "Data: token cache `c0ffee00/01234567` (corpus/vocab fingerprints) for every run."
    )


def _finished_run(wd: Path, model: str, bindings: tuple[str, ...], base: str = "runs/proxy_cpu.gin") -> Path:
    """A finished run whose config.gin configures `model` with `bindings` (as the operative config would)."""
    from moe_jax.configs.gin_utils import model_gin_path

    wd.mkdir(parents=True)
    lines = [f"include '{model_gin_path(model)}'", f"include '{base}'", *bindings]
    (wd / "config.gin").write_text("\n".join(lines) + "\n")
    (wd / "result.json").write_text(json.dumps({"stopped": "done", "heldout_loss": 5.0}))
    (wd / "member.json").write_text(json.dumps({"member": "gshard", "seed": 0, "model": model}))
    return wd


def test_report_rows_carry_training_time_and_the_summary_its_cost(tmp_path):
    """collect() derives each run's training hours and mean tokens/s from its metrics.jsonl (16 x 256 = 4096
    tokens per step in runs/proxy_cpu.gin); the cost line sums the hours and counts the linked runs."""
    from moe_jax.sweep.report import collect, cost_note, markdown_table, summarise

    root = tmp_path / "fam"
    wd = _finished_run(root / "gshard_s0", "gshard_tiny", ("TrainConfig.seed=0",))
    records = [{"step": 10, "tokens_per_second": 4096.0}, {"step": 20, "tokens_per_second": 2048.0}]  # 10 s + 20 s
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    other = _finished_run(tmp_path / "other" / "gshard_s1", "gshard_tiny", ("TrainConfig.seed=1",))
    (other / "metrics.jsonl").write_text(json.dumps({"step": 90, "tokens_per_second": 4096.0}) + "\n")  # 90 s
    (root / "gshard_s1").symlink_to(other)
    fam = Family(name="fam", members=(Member("gshard", "gshard_tiny"),), seeds=(0, 1))
    rows = collect(root, fam)
    assert [r["train_hours"] * 3600 for r in rows] == pytest.approx([30.0, 90.0])
    assert [r["mean_tokens_per_second"] for r in rows] == pytest.approx([20 * 4096 / 30, 4096.0])
    assert cost_note(root, rows) == (
        "Cost: 2 runs, 0.0 run-hours of training in all (each run's training wall time from its metrics.jsonl, "
        "summed; the runs of a `--parallel` sweep train side by side, each on its own device slot, e.g. one CPU "
        "core); mean and median window throughput per member in the table (a run paused or sharing its core "
        "shows as hours above and a mean below what its median implies). 1 of the runs (0.0 h) are links to "
        "other families' runs (`--reuse`), trained there."
    )
    assert [r["median_tokens_per_second"] for r in rows] == pytest.approx([3072.0, 4096.0])
    table = markdown_table(summarise(rows, fam), fam)
    assert "| train_loss | train hours | mean tokens/s | median tokens/s |" in table
    assert "| 0.0167 ± 0.0118 | 3,413 ± 965 | 3,584 ± 724 |" in table


def test_reuse_links_only_runs_with_the_same_resolved_configuration(tmp_path, capsys):
    """--reuse links a finished run of another family when its resolved ModelConfig and TrainConfig equal
    the member's (a model written as an include of another matches it), and nothing else: not another
    seed, not another binding, not an unfinished run; a linked run's member.json is left as it was."""
    from moe_jax.sweep.runner import write_member
    from moe_jax.sweep.schedule import run_family

    other = tmp_path / "crossover"
    _finished_run(other / "gshard_s0", "gshard_tiny", ("TrainConfig.seed=0", "TrainConfig.log_every=7"))
    _finished_run(other / "gshard_s1", "gshard_tiny", ("TrainConfig.seed=1", "MoEConfig.renormalize_topk=True"))
    unfinished = _finished_run(other / "dsm_s0", "deepseekmoe_tiny", ("TrainConfig.seed=0",))
    (unfinished / "result.json").write_text(json.dumps({"stopped": "interrupted"}))
    fam = Family(
        name="fig3",
        members=(Member("0s_2of16", "ablation_0s_2of16_tiny"), Member("1s_7of63", "ablation_1s_7of63_tiny")),
        seeds=(0, 1),
        base=("runs/proxy_cpu.gin",),
    )
    root = tmp_path / "fig3"
    from moe_jax.sweep import reuse

    runs = fam.runs()
    reuse.link_reusable(runs, root, (), [other])
    linked = {p.name: p.resolve() for p in root.iterdir() if p.is_symlink()}
    assert linked == {"0s_2of16_s0": (other / "gshard_s0").resolve()}
    assert "fig3/0s_2of16_s0: reusing" in capsys.readouterr().out
    before = (other / "gshard_s0" / "member.json").read_text()
    write_member(root / "0s_2of16_s0", runs[0])
    assert (other / "gshard_s0" / "member.json").read_text() == before
    # An extra binding for every member changes the training: now only the renormalised run matches.
    root2 = tmp_path / "fig3_b"
    reuse.link_reusable(runs, root2, ("MoEConfig.renormalize_topk=True",), [other])
    assert {p.name: p.resolve() for p in root2.iterdir() if p.is_symlink()} == {
        "0s_2of16_s1": (other / "gshard_s1").resolve()
    }
    with pytest.raises(ValueError, match="not a directory"):
        run_family(fam, tmp_path / "x", reuse=[tmp_path / "missing"])


def test_a_member_with_fewer_seeds_runs_only_those_requested_and_its_own():
    fam = Family(
        name="f",
        members=(Member("a", "gshard_base"), Member("b", "dense_x16_base", seeds=(0, 1))),
        seeds=(0, 1, 2),
        scales=PROXY_SCALES,
    )
    assert [r.name for r in fam.runs()] == ["a_s0", "a_s1", "a_s2", "b_s0", "b_s1"]
    assert [r.name for r in fam.runs(seeds=(1, 2))] == ["a_s1", "a_s2", "b_s1"]
    assert {r.gin_files for r in fam.runs()} == {("runs/proxy_base.gin",)}
    tiny = fam.runs(seeds=(0,), scale="tiny")
    assert [(r.model, r.gin_files) for r in tiny] == [
        ("gshard_tiny", ("runs/proxy_cpu.gin",)),
        ("dense_x16_tiny", ("runs/proxy_cpu.gin",)),
    ]


def test_stored_runs_keep_links_and_are_never_replaced_by_another_run(tmp_path, monkeypatch, capsys):
    """`store_runs` copies a run's small files (no checkpoints), stores a linked run under the family it
    was trained in with a relative link here, and refuses, before writing anything, a run whose stored
    result.json differs."""
    import dataclasses

    from moe_jax.sweep.family import FollowUp
    from moe_jax.sweep.report import collect, cost_note
    from moe_jax.sweep.store import store_runs

    fam = Family(name="fam", members=(Member("gshard", "gshard_tiny"),), seeds=(0, 1))
    root = tmp_path / "work" / "fam"
    wd = _finished_run(root / "gshard_s0", "gshard_tiny", ("TrainConfig.seed=0",))
    (wd / "checkpoints").mkdir()
    (wd / "metrics.jsonl").write_text(json.dumps({"step": 10, "tokens_per_second": 4096.0}) + "\n")
    other = _finished_run(tmp_path / "work" / "table1" / "gshard_s1", "gshard_tiny", ("TrainConfig.seed=1",))
    (root / "gshard_s1").symlink_to(other)
    results = tmp_path / "experiments" / "results"
    store_runs(fam, root, results)
    here = results / "fam" / "runs"
    assert sorted(p.name for p in (here / "gshard_s0").iterdir()) == [
        "config.gin",
        "member.json",
        "metrics.jsonl",
        "result.json",
    ]
    assert (here / "gshard_s1").is_symlink() and (
        here / "gshard_s1"
    ).resolve() == results / "table1" / "runs" / "gshard_s1"
    assert collect(here, fam) == collect(root, fam)
    # An interrupted run (result.json says so) is neither stored nor reported: stored, it would block
    # storing the same run once it has finished.
    cut = _finished_run(root / "gshard_s2", "gshard_tiny", ("TrainConfig.seed=2",))
    (cut / "result.json").write_text(json.dumps({"stopped": "interrupted", "heldout_loss": 6.0}))
    store_runs(fam, root, results)
    assert not (here / "gshard_s2").exists()
    assert [row["run"] for row in collect(root, fam)] == ["gshard_s0", "gshard_s1"]
    (cut / "result.json").write_text(json.dumps({"stopped": "done", "heldout_loss": 5.5}))  # resumed, finished
    store_runs(fam, root, results)
    assert json.loads((here / "gshard_s2" / "result.json").read_text())["heldout_loss"] == 5.5
    shutil.rmtree(cut)
    shutil.rmtree(here / "gshard_s2")
    (wd / "result.json").write_text(json.dumps({"stopped": "done", "heldout_loss": 5.0, "workdir": str(wd)}))
    (wd / "analysis").mkdir()
    (wd / "analysis" / "specialization.json").write_text(json.dumps({"plots": [str(wd / "analysis" / "a.png")]}))
    fresh = tmp_path / "fresh"
    store_runs(
        dataclasses.replace(fam, follow_ups=(FollowUp(("analyze",), "analysis/specialization.json"),)), root, fresh
    )
    assert json.loads((fresh / "fam" / "runs" / "gshard_s0" / "result.json").read_text())["workdir"] == "."
    spec = json.loads((fresh / "fam" / "runs" / "gshard_s0" / "analysis" / "specialization.json").read_text())
    assert spec == {"plots": ["analysis/a.png"]}
    (wd / "result.json").write_text(json.dumps({"stopped": "done", "heldout_loss": 5.0}))
    assert cost_note(here, collect(here, fam)) == cost_note(root, collect(root, fam))
    store_runs(fam, root, results)  # again: nothing changes
    (other / "result.json").write_text(json.dumps({"stopped": "done", "heldout_loss": 4.0}))  # retrained
    (wd / "eval.json").write_text("{}")
    with pytest.raises(ValueError, match=r"result.json differ\): a stored run is never replaced; delete"):
        store_runs(fam, root, results)
    assert not (here / "gshard_s0" / "eval.json").exists()
    assert json.loads((results / "table1" / "runs" / "gshard_s1" / "result.json").read_text())["heldout_loss"] == 5.0
    # From a checkout without workdirs: --report names --results, which reports the stored runs.
    from moe_jax.sweep.cli import main

    (tmp_path / "fam.py").write_text(
        "from moe_jax.sweep.family import Family, Member\n"
        "FAMILY = Family(name='fam', members=(Member('gshard', 'gshard_tiny'),), seeds=(0, 1))\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["fam.py", "--report"]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert "no finished runs under workdirs/fam" in last and last.endswith("--results experiments/results")
    assert main(["fam.py", "--report", "--results", "experiments/results"]) == 0
    assert "| gshard | gshard_tiny | 2 |" in (results / "fam" / "summary.md").read_text()


def test_a_follow_up_flag_names_the_workdir_and_per_source_metrics_join_the_report(tmp_path):
    """ "{workdir}" in a follow-up's flags becomes the member's workdir; `source_metrics` flattens a
    `moe-jax eval` JSON into one held-out bits/byte per source."""
    from moe_jax.evaluate.heldout import source_metrics
    from moe_jax.sweep.runner import follow_up_command

    fam = load_family(REPO / "experiments" / "seed_variance.py")
    (step,) = fam.follow_ups
    wd = tmp_path / "gshard_s0"
    cmd = follow_up_command(step, wd)
    assert cmd[3:] == ["eval", "--tasks=", f"--out={wd}/heldout_sources.json", f"--workdir={wd}"]
    report = {
        "heldout": {
            "bits_per_byte": 1.9,
            "sources": {"gcide": {"bits_per_byte": 1.6, "loss": 2.0}, "kjv": {"bits_per_byte": 1.8, "loss": 2.2}},
        }
    }
    assert source_metrics(report) == {"heldout_bpb/all": 1.9, "heldout_bpb/gcide": 1.6, "heldout_bpb/kjv": 1.8}

"""Run a family's members, each in its own workdir and process, skipping finished ones.

Member `<member>_s<seed>` trains in `<root>/<member>_s<seed>` with `moe-jax train` (so an
interrupted member resumes from its checkpoint), then its results are read from `result.json`
(plus `eval.json` when the family asks for benchmark tasks). With `parallel > 1` members run
concurrently on disjoint device subsets: GPUs through CUDA_VISIBLE_DEVICES, CPU cores through
processor affinity.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from moe_jax.sweep.family import Family, FollowUp, Run
from moe_jax.sweep.reuse import link_reusable


def is_finished(workdir: Path) -> bool:
    """True if the member's training ran to its last step (result.json says so)."""
    path = workdir / "result.json"
    if not path.exists():
        return False
    return json.loads(path.read_text()).get("stopped") == "done"


def train_command(run: Run, workdir: Path, extra_bindings: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "moe_jax.cli", "train", f"--model={run.model}"]
    cmd += [f"--gin_file={f}" for f in run.gin_files]
    cmd += [f"--gin.{b}" for b in (*run.bindings, *extra_bindings)]
    return cmd + [f"--workdir={workdir}", "--no_progress"]


def follow_up_command(step: FollowUp, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "moe_jax.cli", *step.command, f"--workdir={workdir}"]


def pending_commands(
    run: Run, workdir: Path, family: Family, extra_bindings: Sequence[str] = (), eval_tasks: str | None = None
) -> list[list[str]]:
    """What is left to do for one member: training (unless finished), then each follow-up whose output
    is missing, then `moe-jax eval` if asked for and not yet written. Empty when the member is complete."""
    cmds = [] if is_finished(workdir) else [train_command(run, workdir, extra_bindings)]
    for step in family.follow_ups:
        if cmds or not (workdir / step.output).exists():
            cmds.append(follow_up_command(step, workdir))
    if eval_tasks and (cmds or not (workdir / "eval.json").exists()):
        cmds.append(
            [
                sys.executable,
                "-m",
                "moe_jax.cli",
                "eval",
                f"--workdir={workdir}",
                f"--tasks={eval_tasks}",
                f"--out={workdir / 'eval.json'}",
            ]
        )
    return cmds


def device_slots(parallel: int) -> list[dict[str, str] | list[int]]:
    """`parallel` disjoint device subsets: env vars for GPUs, or lists of CPU cores."""
    gpus = _gpu_count()
    if gpus:
        per = max(1, gpus // parallel)
        return [
            {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(i * per, (i + 1) * per))} for i in range(parallel)
        ]
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // parallel)
    return [cores[i * per : (i + 1) * per] or cores for i in range(parallel)]


def _gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def _launch(cmd: list[str], slot, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ)
    preexec = None
    if isinstance(slot, dict):
        env.update(slot)
    else:
        cores = list(slot)
        preexec = lambda: os.sched_setaffinity(0, cores)
    log = log_path.open("a")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec)


def run_family(
    family: Family,
    root: Path,
    *,
    seeds: Sequence[int] | None = None,
    scale: str | None = None,
    parallel: int = 1,
    extra_bindings: Sequence[str] = (),
    eval_tasks: str | None = None,
    only: Sequence[str] = (),
    reuse: Sequence[Path] = (),
) -> list[Run]:
    """Train (or skip) every run of the family (or of the members named in `only`); returns the runs.
    `reuse`: workdir roots of other families whose finished runs are linked where they are exactly a
    run of this one (`moe_jax.sweep.reuse`). Raises if a member fails."""
    root.mkdir(parents=True, exist_ok=True)
    runs = select_runs(family, family.runs(seeds, scale), only)
    if reuse:
        link_reusable(runs, root, extra_bindings, reuse)
    todo = _queue(runs, root, family, extra_bindings, eval_tasks)
    total, launched = len(todo), 0
    slots = device_slots(max(1, parallel))
    free = list(range(len(slots)))
    active: dict[int, tuple[Run, subprocess.Popen, float]] = {}
    failures = []
    try:
        while todo or active:
            while todo and free:
                (run, cmds), slot = todo.pop(0), free.pop(0)
                wd = root / run.name
                _write_member(wd, run)
                cmd = cmds[0] if len(cmds) == 1 else ["bash", "-c", " && ".join(" ".join(map(_quote, c)) for c in cmds)]
                active[slot] = (run, _launch(cmd, slots[slot], wd / "sweep.log"), time.time())
                launched += 1
                print(
                    f"[sweep] [{launched}/{total}] {run.name}: launched on {_describe_slot(slots[slot])}; "
                    f"log {wd / 'sweep.log'}",
                    flush=True,
                )
            time.sleep(1.0)
            for slot, (run, proc, t0) in list(active.items()):
                if proc.poll() is None:
                    continue
                del active[slot]
                free.append(slot)
                if proc.returncode == 0:
                    print(f"[sweep] {run.name}: done in {time.time() - t0:.0f}s", flush=True)
                else:
                    failures.append(run.name)
                    print(
                        f"[sweep] {run.name}: FAILED (exit {proc.returncode}); see {root / run.name / 'sweep.log'}",
                        flush=True,
                    )
    except KeyboardInterrupt:
        print("[sweep] interrupted: stopping members (each saves a checkpoint; rerun to resume)", flush=True)
        for _, proc, _ in active.values():
            proc.send_signal(2)
        for _, proc, _ in active.values():
            proc.wait()
        raise
    if failures:
        raise RuntimeError(f"sweep members failed: {failures}")
    return runs


def select_runs(family: Family, runs: list[Run], only: Sequence[str]) -> list[Run]:
    """The runs of the members named in `only` (all when empty); an unknown name is an error."""
    if not only:
        return runs
    unknown = sorted(set(only) - {m.name for m in family.members})
    if unknown:
        raise ValueError(
            f"family {family.name} has no member {unknown}; its members: {[m.name for m in family.members]}"
        )
    return [r for r in runs if r.member.name in set(only)]


def _queue(runs: list[Run], root: Path, family: Family, extra_bindings, eval_tasks) -> list[tuple[Run, list]]:
    """(run, its pending commands) for every run with work left, saying which are skipped or resumed."""
    todo = []
    for run in runs:
        wd = root / run.name
        cmds = pending_commands(run, wd, family, extra_bindings, eval_tasks)
        if not cmds:
            print(f"[sweep] {run.name}: finished, skipped", flush=True)
            continue
        todo.append((run, cmds))
        if is_finished(wd):
            state = "trained; running " + ", ".join(c[3] for c in cmds)
        else:
            state = "resuming" if (wd / "checkpoints").exists() else "starting"
        print(f"[sweep] {run.name}: queued, {state} ({run.model})", flush=True)
    return todo


def _write_member(wd: Path, run: Run) -> None:
    """`<workdir>/member.json`: which member, seed, model, gin files and bindings the run is. A run
    reused from another family (a link) keeps that family's file; the report names it by its link."""
    if wd.is_symlink():
        return
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "member.json").write_text(
        json.dumps(
            {
                "member": run.member.name,
                "label": run.member.label or run.member.name,
                "seed": run.seed,
                "model": run.model,
                "gin_files": run.gin_files,
                "bindings": run.bindings,
            },
            indent=2,
        )
    )


def _describe_slot(slot) -> str:
    if isinstance(slot, dict):
        return ", ".join(f"{k}={v}" for k, v in slot.items())
    return f"CPU cores {slot[0]}-{slot[-1]}" if len(slot) > 1 else f"CPU core {slot[0]}"


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(str(s))

"""A sweep's processes: what each run has left to do, the device slots, launching, `member.json`.

Member `<member>_s<seed>` trains in `<root>/<member>_s<seed>` with `moe-jax train` (so an
interrupted member resumes from its checkpoint), then its results are read from `result.json`
(plus `eval.json` when the family asks for benchmark tasks). With `parallel > 1` members run
concurrently on disjoint device subsets: GPUs through CUDA_VISIBLE_DEVICES, CPU cores through
processor affinity. The queue that decides what runs when is `moe_jax.sweep.schedule`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from moe_jax.sweep.family import Family, FollowUp, Run


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
    flags = [flag.replace("{workdir}", str(workdir)) for flag in step.command]
    return [sys.executable, "-m", "moe_jax.cli", *flags, f"--workdir={workdir}"]


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


def launch(cmd: list[str], slot, log_path: Path) -> subprocess.Popen:
    """Start `cmd` on the device slot in a process group of its own (`interrupt` signals the whole group:
    a member's commands chained by `bash -c` are a shell and its child), appending to `log_path`."""
    env = dict(os.environ)
    preexec = None
    if isinstance(slot, dict):
        env.update(slot)
    else:
        cores = list(slot)
        preexec = lambda: os.sched_setaffinity(0, cores)
    with log_path.open("a") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec, process_group=0)


def interrupt(proc: subprocess.Popen) -> None:
    """SIGINT to every process of a launched member's group (`moe-jax train` then saves a checkpoint and
    stops), once: a terminal's Ctrl-C reaches only the sweep, whose own group the members are not in."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:  # it had already ended
        pass


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


def write_member(wd: Path, run: Run) -> None:
    """`<workdir>/member.json`: which member, seed, model, gin files and bindings the run is, and `code`:
    the commits of the code that launched it (`code_version`; one more when a resume runs other code).
    A run reused from another family (a link) keeps that family's file; the report names it by its link."""
    if wd.is_symlink():
        return
    wd.mkdir(parents=True, exist_ok=True)
    path = wd / "member.json"
    code = json.loads(path.read_text()).get("code", []) if path.exists() else []
    version = code_version()
    if version and version not in code[-1:]:
        code.append(version)
    member = {
        "member": run.member.name,
        "label": run.member.label or run.member.name,
        "seed": run.seed,
        "model": run.model,
        "gin_files": run.gin_files,
        "bindings": run.bindings,
        "code": code,
    }
    path.write_text(json.dumps(member, indent=2))


def code_version() -> str | None:
    """The git commit of the moe_jax package in use (12 hex digits; "-dirty" when its tracked files have
    uncommitted changes), or None outside a git checkout."""
    package = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(package)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None
        status = [*git, "status", "--porcelain", "--untracked-files=no", "--", "."]
        dirty = subprocess.run(status, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def describe_slot(slot) -> str:
    if isinstance(slot, dict):
        return ", ".join(f"{k}={v}" for k, v in slot.items())
    return f"CPU cores {slot[0]}-{slot[-1]}" if len(slot) > 1 else f"CPU core {slot[0]}"

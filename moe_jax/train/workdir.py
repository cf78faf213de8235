"""What a run writes to its workdir besides checkpoints, written so that nothing a user had is lost
(issue 18): `config.gin` only once the run has started (the previous one kept), and `metrics.jsonl`
without the rows of steps a resumed run repeats (the full file kept as a backup first).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def write_config(workdir: Path, text: str) -> Path | None:
    """Write `workdir/config.gin` (atomically); a different previous one is kept as
    `config.gin.<UTC time>.prev`, which is returned."""
    path = workdir / "config.gin"
    kept = None
    if path.exists():
        if path.read_text() == text:
            return None
        kept = workdir / f"config.gin.{_stamp()}.prev"
        shutil.copy2(path, kept)
    tmp = workdir / f".config.gin.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)
    return kept


def _keep_row(row: dict, start: int, rerun_final: bool) -> bool:
    step = int(row.get("step", 0))
    if step < start:
        return True
    # Rows of step `start` were written before its checkpoint; only the final held-out evaluation of a
    # finished run is repeated when the run is started again.
    return step == start and not (rerun_final and set(row) <= {"step"} | {k for k in row if k.startswith("heldout/")})


def trim_metrics(workdir: Path, start: int, rerun_final: bool = False) -> Path | None:
    """Drop the rows of `metrics.jsonl` that a run resuming at step `start` writes again (steps after
    it; with `rerun_final`, also the held-out rows of step `start`). The untouched file is kept as
    `metrics.jsonl.<UTC time>.bak` (returned) whenever a row is dropped; unreadable lines are kept."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return None
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            kept.append(line)
            continue
        if _keep_row(row, start, rerun_final):
            kept.append(line)
    if len(kept) == len(lines):
        return None
    backup = workdir / f"metrics.jsonl.{_stamp()}.bak"
    shutil.copy2(path, backup)
    tmp = workdir / f".metrics.jsonl.tmp-{os.getpid()}"
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return backup


def committed_steps(workdir: Path) -> list[int]:
    """Steps with a committed checkpoint directory (read from the file system, nothing created)."""
    root = workdir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def check_restore_step(workdir: Path, restore_step: int | None, discard_later_steps: bool) -> None:
    """Refuse `--restore_step=N` up front while later checkpoints exist (the first save after N would
    collide with them), unless `--discard_later_steps` sets them aside."""
    from moe_jax.train.checkpoint import CheckpointError

    if restore_step is None:
        return
    steps = committed_steps(workdir)
    if restore_step not in steps:
        raise CheckpointError(
            f"--restore_step={restore_step}: there is no checkpoint "
            f"{workdir / 'checkpoints' / str(restore_step)} (available steps: {steps})"
        )
    later = [s for s in steps if s > restore_step]
    if later and not discard_later_steps:
        raise CheckpointError(
            f"--restore_step={restore_step}, but later checkpoints exist (steps {later}): training on from step "
            f"{restore_step} would collide with them. Add --discard_later_steps to move them to "
            f"{workdir / 'checkpoints' / 'discarded'}/ (kept, not deleted) and continue from step {restore_step}, "
            f"or leave out --restore_step to continue from step {steps[-1]}. Nothing was changed."
        )


def start_run(workdir: Path, start: int, *, finished: bool, gin_config: str | None, log=print) -> None:
    """What a run writes once it has started at step `start`: metrics.jsonl without the rows it repeats
    (backed up), and config.gin (the previous one kept). `finished`: the run has no steps left."""
    backup = trim_metrics(workdir, start, rerun_final=finished)
    if backup:
        log(
            f"metrics.jsonl: dropped the rows after step {start}, which this run writes again "
            f"(the previous file is {backup})",
            flush=True,
        )
    kept = write_config(workdir, gin_config) if gin_config is not None else None
    if kept:
        log(f"config.gin changed; the previous one is {kept}", flush=True)

"""Keep a family's finished runs in the repository: their small files, without checkpoints.

A workdir holds checkpoints, TensorBoard events and the run's resume state; a report needs only a few
small files of each run. `store_runs` copies those into `<results>/<family>/runs/<run>/`, so that the
report (and the claims table built from it) can be regenerated from a fresh clone:

    moe-jax sweep experiments/table1.py --results experiments/results   # train, store, report
    moe-jax sweep experiments/table1.py --report --results experiments/results  # report from stored runs

A run linked from another family's workdir (`--reuse`) is stored once, under that family's name (the
name of the workdir root it lives in), and linked here with a relative symlink, so the report still
counts it as trained elsewhere. JSON files are stored with machine paths made portable (`portable`).
A stored run is never overwritten by a different one: if a run was retrained, its stored `result.json`
differs and `store_runs` refuses before copying anything.

The store also survives the workdirs: on a machine whose workdirs are gone (a new cloud VM, a cleaned
scratch disk), `restore_runs` copies a stored finished run back into its empty workdir when it was trained
exactly as the sweep would train it (`reuse.resolved` of its config.gin), so the sweep goes on with the
runs it does not have instead of retraining the ones it has. A restored run has no checkpoint: it is
reported and linked, not analysed again (its stored follow-up outputs come with it). A stored link to
another family's run is not copied: a sweep of both families (or `--reuse` of the other's root) links it
again to the restored run, as it links any run two families share.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from moe_jax.sweep.family import Family, Run
from moe_jax.sweep.runner import is_finished

# What a report reads of a run (moe_jax.sweep.report.collect), besides the family's follow-up outputs.
RUN_FILES = ("member.json", "result.json", "config.gin", "metrics.jsonl", "eval.json", "counts.json")


def portable(value, run: Path):
    """`value` (parsed JSON) with every absolute path made machine-independent: relative to the run's
    workdir when inside it ("." for the workdir itself), else the last path component."""
    if isinstance(value, dict):
        return {k: portable(v, run) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, run) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        path = Path(value)
        return str(path.relative_to(run)) if path.is_relative_to(run) else path.name
    return value


def _stored_text(src: Path, run: Path) -> bytes:
    """What the repository keeps of a run's file: JSON with `portable` paths, anything else as it is."""
    if src.suffix != ".json":
        return src.read_bytes()
    return (json.dumps(portable(json.loads(src.read_text()), run), indent=2) + "\n").encode()


def _finished(root: Path) -> list[Path]:
    """The runs under `root` that trained to their last step (an interrupted run's result.json says
    "interrupted" and is not kept: it would later block storing the finished run)."""
    return sorted(p for p in root.iterdir() if (p / "member.json").exists() and is_finished(p))


def _plan(family: Family, root: Path, results: Path) -> list[tuple[Path, Path, Path | None]]:
    """(source run, where its files go, the link to make here or None) for every finished run."""
    here = results / family.name / "runs"
    plan = []
    for wd in _finished(root):
        if wd.is_symlink():
            target = wd.resolve()
            stored = results / target.parent.name / "runs" / target.name
            plan.append((target, stored, here / wd.name))
        else:
            plan.append((wd, here / wd.name, None))
    return plan


def _check(plan: list[tuple[Path, Path, Path | None]]) -> None:
    for src, stored, link in plan:
        old = stored / "result.json"
        if old.exists() and old.read_bytes() != _stored_text(src / "result.json", src):
            raise ValueError(
                f"{stored} holds another run than {src} (their result.json differ): a stored run is never "
                f"replaced; delete {stored} to store the new one"
            )
        if link is not None and (link.exists() or link.is_symlink()) and link.resolve() != stored.resolve():
            raise ValueError(f"{link} exists and is not a link to {stored}: delete it to store {src} there")


def store_runs(family: Family, root: Path, results: Path) -> list[Path]:
    """Copy the finished runs under `root` into `results/<family>/runs/`; returns the stored run paths.

    Copies RUN_FILES and the family's follow-up outputs where they exist; checks every run first, so a
    refused run leaves nothing half-written."""
    plan = _plan(family, root, results)
    _check(plan)
    names = (*RUN_FILES, *(step.output for step in family.follow_ups))
    stored_paths = []
    for src, stored, link in plan:
        for name in names:
            if (src / name).is_file():
                (stored / name).parent.mkdir(parents=True, exist_ok=True)
                (stored / name).write_bytes(_stored_text(src / name, src))
        if link is not None and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(stored, link.parent))
        stored_paths.append(link or stored)
    return stored_paths


def stored_run(family: Family, name: str, results: Path) -> Path | None:
    """`results/<family>/runs/<name>` when it holds a finished run (through a link to another family's
    stored run, too), else None."""
    stored = Path(results) / family.name / "runs" / name
    return stored if stored.is_dir() and is_finished(stored) else None


def restore_runs(
    family: Family, runs: Sequence[Run], root: Path, results: Path, extra_bindings: Sequence[str] = ()
) -> None:
    """Copy each stored finished run (`stored_run`, the family's own, not a link) whose workdir under
    `root` does not exist back into it, when its config.gin resolves to the configuration the sweep would
    train (`reuse.run_config`). A stored run trained otherwise (other bindings, or code whose gin no longer
    parses) is left alone and named, as the sweep trains it again."""
    from moe_jax.sweep.reuse import resolved, run_config

    for run in runs:
        wd, stored = root / run.name, stored_run(family, run.name, results)
        if wd.exists() or wd.is_symlink() or stored is None or stored.is_symlink():
            continue
        config = stored / "config.gin"
        if not config.exists() or resolved([str(config)], ()) != run_config(run, tuple(extra_bindings)):
            print(f"[sweep] {family.name}/{run.name}: the stored run at {stored} was trained otherwise; training it")
            continue
        shutil.copytree(stored, wd)
        print(f"[sweep] {family.name}/{run.name}: restored from {stored} (finished; no checkpoint)", flush=True)

"""One queue for one or more families on one pool of devices (`moe-jax sweep A.py [B.py ...]`).

Families share runs: table1's GShard is Fig 3's "0 shared + 2/16", and the specialization family
analyses table1's models. A sweep of several families trains each distinct run once:

- a run already finished under another family's root (or a `--reuse` root) with the same resolved
  configuration is linked before anything starts (`moe_jax.sweep.reuse.link_matching`);
- a run that is exactly one queued earlier (same `reuse.resolved` model and training configuration)
  waits for that one, is then linked to it, and runs only its own family's follow-ups.

Runs are queued seed by seed (every family's seed 0, then seed 1, ...; within a seed, families in the
order given, members in family order), so every paired comparison gains a seed as early as it can. A
run starts on the first free slot (`runner.device_slots`) once the run it waits for, if any, has
finished; a run with no training left (linked, or trained and missing a follow-up) goes first. With
`results`, the finished runs stored there that the workdirs lack are restored before anything is queued
(`store.restore_runs`: a new machine goes on where the store left off), a run's small files are stored
(`moe_jax.sweep.store`) as soon as it ends, and a family's report is written as soon as its last queued
run ends, so a session that is cut off loses only what the runs in flight did since their last
checkpoint (rerunning the command resumes them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

from moe_jax.sweep.family import Family, Run
from moe_jax.sweep.reuse import candidates, link_matching, run_config
from moe_jax.sweep.runner import (
    describe_slot,
    device_slots,
    interrupt,
    is_finished,
    launch,
    pending_commands,
    select_runs,
    write_member,
)

POLL_SECONDS = 1.0  # how often the queue looks at its running processes


@dataclasses.dataclass(eq=False)
class Job:
    """A run with work left. `source`: the queued job it is identical to (it links to that job's workdir
    once that one has finished instead of training); state: pending, running, done or failed."""

    family: Family
    run: Run
    root: Path
    cmds: list[list[str]]
    label: str
    source: Job | None = None
    state: str = "pending"

    @property
    def workdir(self) -> Path:
        return self.root / self.run.name


@dataclasses.dataclass(frozen=True)
class Options:
    """What every run of a sweep shares (the CLI's flags)."""

    seeds: Sequence[int] | None = None
    scale: str | None = None
    extra_bindings: Sequence[str] = ()
    eval_tasks: str | None = None
    only: Sequence[str] = ()
    reuse: Sequence[Path] = ()


def select(families: Sequence[Family], opts: Options) -> list[list[Run]]:
    """Each family's runs at the options' seeds and scale, restricted to the members `opts.only` names.
    With one family an unknown member is an error (`runner.select_runs`); with several, a name must be a
    member of at least one of them."""
    if len(families) == 1 or not opts.only:
        return [select_runs(f, f.runs(opts.seeds, opts.scale), opts.only) for f in families]
    check_only(families, opts.only)
    return [[r for r in f.runs(opts.seeds, opts.scale) if r.member.name in set(opts.only)] for f in families]


def check_only(families: Sequence[Family], only: Sequence[str]) -> None:
    """Raise ValueError naming every member in `only` that no family has, and the families' members."""
    unknown = sorted(set(only) - {m.name for f in families for m in f.members})
    if unknown:
        members = {f.name: [m.name for m in f.members] for f in families}
        raise ValueError(f"no family has member {unknown}; their members: {members}")


def plan(families: Sequence[Family], roots: Sequence[Path], opts: Options, results: Path | None = None) -> list[Job]:
    """The queue: every selected run with work left, seed-major, each identical repeat of an earlier run
    waiting on it. Restores the runs `results` holds and the workdirs lack (`store.restore_runs`), then
    links finished identical runs of the other roots and of `opts.reuse`."""
    selected = select(families, opts)
    if results is not None:
        from moe_jax.sweep.store import restore_runs

        for family, root, runs in zip(families, roots, selected):
            restore_runs(family, runs, root, Path(results), opts.extra_bindings)
    sources = [*opts.reuse, *(r for r in roots if r.is_dir())] if opts.reuse or len(roots) > 1 else []
    found = candidates(sources) if sources else []
    for root, runs in zip(roots, selected):
        if found:
            link_matching(runs, root, opts.extra_bindings, found)
    order = {f.name: i for i, f in enumerate(families)}
    entries = [(f, root, run) for f, root, runs in zip(families, roots, selected) for run in runs]
    entries.sort(key=lambda e: (e[2].seed, order[e[0].name]))  # stable: members keep family order
    jobs, trainers = [], []  # trainers: (resolved configuration, job) of each queued training
    for family, root, run in entries:
        wd = root / run.name
        cmds = pending_commands(run, wd, family, opts.extra_bindings, opts.eval_tasks)
        if not cmds:
            print(f"[sweep] {_label(family, run, families)}: finished, skipped", flush=True)
            continue
        job = Job(family, run, root, cmds, _label(family, run, families))
        if not is_finished(wd):
            key = run_config(run, tuple(opts.extra_bindings))
            job.source = None if wd.exists() else next((j for k, j in trainers if k == key), None)
            if job.source is None and key is not None:
                trainers.append((key, job))
        jobs.append(job)
        print(f"[sweep] {job.label}: queued, {_state(job)} ({run.model})", flush=True)
    return jobs


def _label(family: Family, run: Run, families: Sequence[Family]) -> str:
    return run.name if len(families) == 1 else f"{family.name}/{run.name}"


def _state(job: Job) -> str:
    if job.source is not None:
        return f"waits for {job.source.label} (the same run), then links it"
    if is_finished(job.workdir):
        return "trained; running " + ", ".join(c[3] for c in job.cmds)
    return "resuming" if (job.workdir / "checkpoints").exists() else "starting"


def run_sweep(families: Sequence[Family], roots: Sequence[Path], opts: Options, parallel: int = 1, results=None):
    """Run the queue of `plan` on `parallel` disjoint device slots; returns each family's selected runs.
    `results`: store each run as it ends and report each family as its last run ends (`store`). A failed
    run fails the runs waiting on it; the others go on. Raises RuntimeError naming the failed runs."""
    for root in roots:
        root.mkdir(parents=True, exist_ok=True)
    jobs = plan(families, roots, opts, results)
    with _stop_on_signals():
        _run_queue(jobs, parallel, results, opts)
    failed = [j.label for j in jobs if j.state == "failed"]
    if failed:
        raise RuntimeError(f"sweep members failed: {failed}")
    return select(families, opts)


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT and SIGTERM both stop the queue as Ctrl-C does (`_run_queue` has every running member save a
    checkpoint). Set explicitly: a shell starts a background job with SIGINT ignored, and a session's
    end sends SIGTERM."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _run_queue(jobs: list[Job], parallel: int, results, opts: Options) -> None:
    """Launch ready jobs on free slots until every job has ended; on KeyboardInterrupt stop the running
    members (SIGINT: each saves a checkpoint) and wait for them."""
    slots = device_slots(max(1, parallel))
    free, active, launched, total = list(range(len(slots))), {}, 0, len(jobs)
    try:
        while any(j.state in ("pending", "running") for j in jobs):
            for job in [j for j in jobs if j.state == "pending" and j.source and j.source.state == "failed"]:
                job.state = "failed"
                print(f"[sweep] {job.label}: not run ({job.source.label} failed)", flush=True)
            while free and (job := _next_ready(jobs)) is not None:
                if not _prepare(job, opts):
                    _finish(job, 0, jobs, results)
                    continue
                slot = free.pop(0)
                launched += 1
                active[slot] = (job, _start(job, slots[slot]), time.time())
                print(
                    f"[sweep] [{launched}/{total}] {job.label}: launched on {describe_slot(slots[slot])}; "
                    f"log {job.workdir / 'sweep.log'}",
                    flush=True,
                )
            time.sleep(POLL_SECONDS)
            for slot, (job, proc, t0) in list(active.items()):
                if proc.poll() is None:
                    continue
                del active[slot]
                free.append(slot)
                if proc.returncode == 0:
                    print(f"[sweep] {job.label}: done in {time.time() - t0:.0f}s", flush=True)
                _finish(job, proc.returncode, jobs, results)
    except KeyboardInterrupt:
        print("[sweep] interrupted: stopping members (each saves a checkpoint; rerun to resume)", flush=True)
        for _, proc, _ in active.values():
            interrupt(proc)
        for _, proc, _ in active.values():
            proc.wait()
        raise


def _next_ready(jobs: list[Job]) -> Job | None:
    """The first pending job whose source (if any) has finished; one with no training left (a link to a
    trained run, or a trained run missing a follow-up: minutes, not hours) goes before any that trains."""
    ready = [j for j in jobs if j.state == "pending" and (j.source is None or j.source.state == "done")]
    trained = [j for j in ready if j.source is not None or is_finished(j.workdir)]
    return (trained or ready or [None])[0]


def _prepare(job: Job, opts: Options) -> bool:
    """Link a waiting job to the run it waited for and recompute what is left; False when nothing is."""
    if job.source is not None and not job.workdir.exists():
        job.workdir.symlink_to(job.source.workdir.resolve(), target_is_directory=True)
        target = job.source.workdir.resolve()
        print(f"[sweep] {job.label}: reusing {target} (trained by {job.source.label})", flush=True)
        job.cmds = pending_commands(job.run, job.workdir, job.family, opts.extra_bindings, opts.eval_tasks)
    return bool(job.cmds)


def _start(job: Job, slot) -> subprocess.Popen:
    write_member(job.workdir, job.run)
    cmds = job.cmds
    cmd = cmds[0] if len(cmds) == 1 else ["bash", "-c", " && ".join(shlex.join(c) for c in cmds)]
    job.state = "running"
    return launch(cmd, slot, job.workdir / "sweep.log")


def _finish(job: Job, returncode: int, jobs: list[Job], results) -> None:
    """Mark the job; with `results`, store its family's finished runs and, when none of the family's jobs
    is left, write the family's report there."""
    if returncode:
        job.state = "failed"
        print(f"[sweep] {job.label}: FAILED (exit {returncode}); see {job.workdir / 'sweep.log'}", flush=True)
        return
    job.state = "done"
    if results is None:
        return
    from moe_jax.sweep.report import write_report
    from moe_jax.sweep.store import store_runs

    try:
        store_runs(job.family, job.root, Path(results))
    except ValueError as err:
        job.state = "failed"
        print(f"[sweep] {job.label}: trained but not stored: {err}", flush=True)
        return
    if all(j.state in ("done", "failed") for j in jobs if j.family is job.family):
        out = Path(results) / job.family.name
        try:
            write_report(job.family, out / "runs", out)
        except (FileNotFoundError, ValueError) as err:
            print(f"[sweep] {job.family.name}: no report ({err})", flush=True)
            return
        print(f"[sweep] {job.family.name}: every queued run ended; report {out}", flush=True)


def run_family(family: Family, root: Path, *, parallel: int = 1, **options) -> list[Run]:
    """One family's sweep (`run_sweep` of one family); `options`: the fields of `Options`."""
    return run_sweep([family], [root], Options(**options), parallel)[0]

"""Where a family's sweep stands, read from its workdirs alone (`moe-jax sweep ... --status`).

One line per run the sweep would train with the same options (`Family.runs` and the runner's `--only`
selection): `finished` (`runner.is_finished`), `running or interrupted: step s/N` (s: the last step in
its metrics.jsonl; N: `TrainConfig.steps` of its config.gin, or of its gin files when it has none yet)
or `not started`; `link -> target` for a run linked from another family (`--reuse`); the training hours
so far and mean tokens/s (`curves.training_time`); and an estimate of the run-hours left. The estimate of
an unfinished run comes from the runs' own throughput: (N - s) x tokens per step / the run's median
window tokens/s (`curves.median_tokens_per_second`: unlike the mean, not skewed by a window in which the
process was paused, e.g. by a benchmark stopping it); without a throughput yet, the mean training hours
of the finished runs of the same member (else of the same model) for the steps left; for a model none of
the finished runs is, its training FLOPs at their median training FLOP/s. With several families,
`sweep_total` adds one line in which a run two families share is counted once. With `--results`, a run
with no workdir that is stored there is read from its stored copy (the sweep restores it). Writes
nothing: no report, member.json, link or directory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_jax.sweep import curves
from moe_jax.sweep.family import Family, Run
from moe_jax.sweep.runner import is_finished, select_runs


@dataclasses.dataclass(frozen=True)
class RunStatus:
    """One run's progress as its workdir shows it.

    Attributes:
      name: the run's workdir name (`<member>_s<seed>`).
      member: its member's name.
      model: its gin model name.
      state: "finished", "running or interrupted" or "not started".
      step: last step in metrics.jsonl (0 when there is none).
      steps: its training steps N (None when its configuration does not parse).
      tokens_per_step: batch size x sequence length (None likewise).
      link: where the workdir links to (`--reuse`), else None.
      hours: training hours so far; tokens_per_second: mean throughput (None without logged throughput).
      median_tokens_per_second: the median window throughput (None likewise), for the estimate.
      left: estimated run-hours left (None: unknown); left_from: what the estimate is based on.
      flops_per_token: the model's training FLOPs per token (only where an estimate needs it).
    """

    name: str
    member: str
    model: str
    state: str
    step: int = 0
    steps: int | None = None
    tokens_per_step: int | None = None
    link: Path | None = None
    hours: float | None = None
    tokens_per_second: float | None = None
    median_tokens_per_second: float | None = None
    left: float | None = None
    left_from: str = ""
    flops_per_token: float | None = None


def workdir_train_config(workdir: Path):
    """The TrainConfig of a workdir's config.gin (`parse_workdir_config`, as `curves.tokens_per_step`
    resolves it); None when it does not parse (e.g. a run of older code)."""
    from moe_jax.configs.gin_utils import GinConfigError
    from moe_jax.train.restore import parse_workdir_config

    try:
        return parse_workdir_config(workdir)[1]
    except (GinConfigError, ValueError, TypeError):
        return None


def train_config(run: Run, workdir: Path, extra_bindings: Sequence[str] = ()):
    """The run's TrainConfig: from its config.gin, else (not written yet) from its gin files and bindings
    as the runner passes them; None when it does not parse."""
    from moe_jax.sweep.reuse import run_config

    if (workdir / "config.gin").exists():
        return workdir_train_config(workdir)
    configs = run_config(run, tuple(extra_bindings))
    return None if configs is None else configs[1]


def run_status(run: Run, workdir: Path, extra_bindings: Sequence[str] = ()) -> RunStatus:
    """The state, progress and training time of one run (no estimate of what is left)."""
    from moe_jax.train.metrics import read_metrics  # skips a line a live run is still writing

    link = Path(workdir.readlink()) if workdir.is_symlink() else None
    base = RunStatus(name=run.name, member=run.member.name, model=run.model, state="not started", link=link)
    records = read_metrics(workdir)
    if is_finished(workdir):
        state = "finished"
    elif records or (workdir / "config.gin").exists():
        state = "running or interrupted"
    else:
        return base
    cfg = train_config(run, workdir, extra_bindings)
    per = None if cfg is None else cfg.batch_size * cfg.seq_len
    time = curves.training_time(records, per) if per else {}
    return dataclasses.replace(
        base,
        state=state,
        step=int(records[-1]["step"]) if records else 0,
        steps=None if cfg is None else cfg.steps,
        tokens_per_step=per,
        hours=time.get("train_hours"),
        tokens_per_second=time.get("mean_tokens_per_second"),
        median_tokens_per_second=curves.median_tokens_per_second(records) if time else None,
    )


def _own_hours(steps: int | None, tokens_per_step: int | None, median: float | None, hours: float | None):
    """A finished run's training hours at its own median window throughput (a pause or a shared core in
    some windows does not count), else its measured hours."""
    if steps and tokens_per_step and median:
        return steps * tokens_per_step / median / 3600
    return hours


def finished_hours(root: Path, statuses: Sequence[RunStatus]) -> list[tuple[str, str, float]]:
    """(member, model, training hours at the run's median window throughput) of every finished run with a
    logged throughput: the listed runs, and the other run directories under `root` (e.g. seeds not asked
    for; member from the directory name `<member>_s<seed>`, model from its member.json)."""
    from moe_jax.train.metrics import read_metrics

    out = [
        (s.member, s.model, _own_hours(s.steps, s.tokens_per_step, s.median_tokens_per_second, s.hours))
        for s in statuses
        if s.state == "finished" and s.hours
    ]
    listed = {s.name for s in statuses}
    others = sorted(p for p in root.iterdir() if p.name not in listed) if root.is_dir() else []
    for wd in others:
        if not (is_finished(wd) and (wd / "member.json").exists() and (wd / "config.gin").exists()):
            continue
        cfg = workdir_train_config(wd)
        records = read_metrics(wd)
        hours = curves.training_time(records, cfg.batch_size * cfg.seq_len) if cfg else {}
        if hours:
            model = json.loads((wd / "member.json").read_text())["model"]
            own = _own_hours(cfg.steps, cfg.batch_size * cfg.seq_len, curves.median_tokens_per_second(records), None)
            out.append((wd.name.rpartition("_s")[0], model, own or hours["train_hours"]))
    return out


def estimate(
    status: RunStatus, finished: Sequence[tuple[str, str, float]], flop_rate: tuple[float, int] | None = None
) -> tuple[float | None, str]:
    """(run-hours left, what it is based on) for one run; (None, why) when unknown. `flop_rate`: (the
    median training FLOP/s of the finished runs, how many), the last resort for a model none of them is."""
    if status.state == "finished":
        return 0.0, ""
    if status.state == "running or interrupted" and status.steps and status.median_tokens_per_second:
        left = max(status.steps - status.step, 0) * status.tokens_per_step / status.median_tokens_per_second
        return left / 3600, "own throughput"
    by_member = [h for member, _, h in finished if member == status.member]
    by_model = [h for _, model, h in finished if model == status.model]
    for hours, what in ((by_member, f"member {status.member}"), (by_model, f"model {status.model}")):
        if hours:
            share = 1.0 if not status.steps else max(status.steps - status.step, 0) / status.steps
            return share * sum(hours) / len(hours), f"mean of {len(hours)} finished run(s) of {what}"
    if flop_rate and status.flops_per_token and status.steps and status.tokens_per_step:
        tokens = max(status.steps - status.step, 0) * status.tokens_per_step
        return tokens * status.flops_per_token / flop_rate[0] / 3600, (
            f"its FLOPs at the median FLOP/s of {flop_rate[1]} finished run(s)"
        )
    return None, f"no finished run of member {status.member} or model {status.model}"


def flops_per_token(run: Run, extra_bindings: Sequence[str] = ()) -> float | None:
    """Training FLOPs per token of the run's model (`model.params.training_flops` over the sequence);
    None when its configuration does not parse."""
    from moe_jax.model.params import count_params
    from moe_jax.sweep.reuse import run_config

    configs = run_config(run, tuple(extra_bindings))
    if configs is None:
        return None
    model, train = configs
    return count_params(model, train.seq_len).flops / train.seq_len


def median_flop_rate(statuses: Sequence[RunStatus]) -> tuple[float, int] | None:
    """(median training FLOP/s, count) over the finished runs with a throughput and FLOPs per token.
    Training FLOP/s is close across this codebase's CPU proxies (the same kernels, only widths differ),
    so it carries a finished model's speed to an unseen one better than tokens/s does."""
    rates = [
        s.median_tokens_per_second * s.flops_per_token
        for s in statuses
        if s.state == "finished" and s.median_tokens_per_second and s.flops_per_token
    ]
    return (float(np.median(rates)), len(rates)) if rates else None


def family_status(
    family: Family,
    root: Path,
    *,
    seeds: Sequence[int] | None = None,
    scale: str | None = None,
    only: Sequence[str] = (),
    extra_bindings: Sequence[str] = (),
    results: Path | None = None,
) -> list[RunStatus]:
    """Every run the sweep would train with these options, with its state and an estimate of what is left.
    `results`: a run with no workdir is read from its stored copy there, when it has one (the sweep
    restores it rather than training it: `store.restore_runs`)."""
    runs = select_runs(family, family.runs(seeds, scale), only)
    workdirs = [_workdir(family, run, root, results) for run in runs]
    statuses = [run_status(run, wd, extra_bindings) for run, wd in zip(runs, workdirs)]
    finished = finished_hours(root, statuses)
    out = [_estimated(s, finished) for s in statuses]
    if all(s.left is not None for s in out):
        return out
    per_model: dict[str, float | None] = {}
    for i, (run, wd, s) in enumerate(zip(runs, workdirs, out)):  # FLOPs of the finished and unestimated runs
        if s.state == "finished" or s.left is None:
            if run.model not in per_model:
                per_model[run.model] = flops_per_token(run, extra_bindings)
            cfg = train_config(run, wd, extra_bindings)
            out[i] = dataclasses.replace(
                s,
                flops_per_token=per_model[run.model],
                steps=s.steps or (cfg.steps if cfg else None),
                tokens_per_step=s.tokens_per_step or (cfg.batch_size * cfg.seq_len if cfg else None),
            )
    rate = median_flop_rate(out)
    return [s if s.left is not None else _estimated(s, finished, rate) for s in out]


def _workdir(family: Family, run: Run, root: Path, results: Path | None) -> Path:
    """The run's workdir under `root`; when there is none, its finished stored copy under `results`, if any."""
    wd = root / run.name
    if results is None or wd.exists() or wd.is_symlink():
        return wd
    from moe_jax.sweep.store import stored_run

    return stored_run(family, run.name, Path(results)) or wd


def _estimated(status: RunStatus, finished, flop_rate=None) -> RunStatus:
    left, source = estimate(status, finished, flop_rate)
    return dataclasses.replace(status, left=left, left_from=source)


def format_line(s: RunStatus) -> str:
    """One run: name, state (with step s/N), link, hours so far and mean tokens/s, hours left."""
    state = s.state
    if state == "running or interrupted":
        state += f": step {s.step}/{s.steps if s.steps else '?'}"
    parts = [f"{s.name:<24} {state}"]
    if s.link is not None:
        parts.append(f"link -> {s.link}")
    if s.hours is not None:
        parts.append(f"{s.hours:.2f} h trained, {s.tokens_per_second:,.0f} tokens/s")
    if s.state != "finished":
        parts.append(
            f"left ~{s.left:.2f} h ({s.left_from})" if s.left is not None else f"left: unknown ({s.left_from})"
        )
    return "; ".join(parts)


def format_status(family: Family, root: Path, statuses: Sequence[RunStatus], parallel: int = 1) -> str:
    """The run lines, a count per state and the estimated run-hours and wall-hours left."""
    counts = {k: sum(s.state == k for s in statuses) for k in ("finished", "running or interrupted", "not started")}
    head = f"{family.name} in {root}: {len(statuses)} runs (" + ", ".join(f"{v} {k}" for k, v in counts.items()) + ")"
    known = [s.left for s in statuses if s.left is not None]
    unknown = len(statuses) - len(known)
    total = sum(known)
    bound = "at least " if unknown else ""
    tail = (
        f"Remaining: {bound}~{total:.1f} run-hours; with --parallel {parallel}: {bound}~{total / parallel:.1f} "
        "wall-hours."
    )
    if unknown:
        tail += f" {unknown} run(s) have no estimate (no finished run of their member or model) and are not counted."
    note = (
        "Estimates from the runs' own throughput: a running or interrupted run, its steps left at its median "
        "window tokens/s so far; a run not started, the mean of the finished runs of its member, else of its model, "
        "each run's steps at its median window tokens/s (pauses excluded)."
    )
    return "\n".join([head, *map(format_line, statuses), tail, note])


def sweep_total(
    families: Sequence[Family],
    statuses: Sequence[Sequence[RunStatus]],
    *,
    seeds: Sequence[int] | None = None,
    scale: str | None = None,
    extra_bindings: Sequence[str] = (),
    parallel: int = 1,
) -> str:
    """One line for several families' sweep: the runs left, each distinct training counted once (a run
    not started that is exactly another family's run left is linked, not trained: `moe_jax.sweep.schedule`),
    with the run-hours and wall-hours it comes to."""
    from moe_jax.sweep.reuse import run_config

    seen, left, shared, hours, unknown = [], 0, 0, 0.0, 0
    for family, family_statuses in zip(families, statuses):
        runs = {r.name: r for r in family.runs(seeds, scale)}
        for s in family_statuses:
            if s.state == "finished":
                continue
            run = runs[s.name]
            key = run_config(run, tuple(extra_bindings))
            if s.state == "not started" and key is not None and key in seen:
                shared += 1
                continue
            seen.append(key)
            left += 1
            if s.left is None:
                unknown += 1
            else:
                hours += s.left
    bound = "at least " if unknown else ""
    line = (
        f"All {len(families)} families: {left + shared} runs left, of which {shared} are another family's run "
        f"(linked once it has trained, not counted): {bound}~{hours:.1f} run-hours; with --parallel {parallel}: "
        f"{bound}~{hours / parallel:.1f} wall-hours."
    )
    if unknown:
        line += f" {unknown} run(s) without an estimate are not counted."
    return line

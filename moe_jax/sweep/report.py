"""Tables and plots of a family from what its members stored (no training, no evaluation).

Reads each member workdir's `member.json`, `result.json`, optional `eval.json` and `metrics.jsonl`;
writes `<root>/report/`: `results.csv` (one row per run), `summary.md` (mean and spread over seeds
per member, with the paper's numbers beside ours, and what the runs cost: training hours and mean
tokens/s from each run's metrics.jsonl; for a family with `pairs`, the paired per-seed differences and
where each member's held-out curve overtakes its baseline; for routed members, their router diagnostics
at the end of training, `curves.diagnostics_table`), `loss_curves.png`
(training loss of every member overlaid, mean over seeds), `bar_<metric>.png`, and from the periodic
evaluations `heldout_curves.png` and `router_diagnostics.png` (`moe_jax.sweep.curves`).
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np

from moe_jax.sweep import curves
from moe_jax.sweep.family import Family
from moe_jax.sweep.runner import is_finished
from moe_jax.sweep.stats import describe


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}{k}/" if not isinstance(v, (int, float)) else f"{prefix}{k}", v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix.rstrip("/")] = float(value)


def param_counts(workdir: Path) -> dict[str, float]:
    """Total and activated parameters of a member (computed once from its config.gin, then cached)."""
    cache = workdir / "counts.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from moe_jax.model.params import count_params
    from moe_jax.train.restore import parse_workdir_config

    model_cfg, train_cfg = parse_workdir_config(workdir)
    c = count_params(model_cfg, train_cfg.seq_len)
    counts = {"params_total": float(c.total), "params_activated": float(c.activated)}
    cache.write_text(json.dumps(counts))
    return counts


def follow_up_metrics(family: Family | None, workdir: Path) -> dict[str, float]:
    """Metrics of the family's follow-up steps (e.g. `analyze`) that have written their output."""
    out: dict[str, float] = {}
    for step in family.follow_ups if family else ():
        path = workdir / step.output
        if step.metrics and path.exists():
            module, _, name = step.metrics.partition(":")
            fn = getattr(importlib.import_module(module), name)
            out.update({k: float(v) for k, v in fn(json.loads(path.read_text())).items()})
    return out


def collect(root: Path, family: Family | None = None) -> list[dict]:
    """One row per finished run under `root` (`runner.is_finished`: an interrupted run's result.json is
    passed over), with the family's follow-up metrics when given.

    A run directory named `<member>_s<seed>` of the family is reported as that member even when it is
    a link to an identical run of another family (e.g. table1's DeepSeekMoE reused as Fig 3's 1+7/63).
    A run with a config.gin also gets its parameter counts, and from its metrics.jsonl its training wall
    time and mean and median throughput (`train_hours`, `mean_tokens_per_second`,
    `median_tokens_per_second`: `curves.training_time`)."""
    from moe_jax.train.metrics import read_metrics

    rows = []
    members = {m.name: m for m in (family.members if family else ())}
    for wd in sorted(p for p in (root.iterdir() if root.is_dir() else ()) if (p / "member.json").exists()):
        if not is_finished(wd):
            continue
        member = json.loads((wd / "member.json").read_text())
        row = {
            "run": wd.name,
            "member": member["member"],
            "label": member.get("label", member["member"]),
            "seed": member["seed"],
            "model": member["model"],
        }
        name, _, seed = wd.name.rpartition("_s")
        if name in members and seed.isdigit():
            row.update(member=name, label=members[name].label or name, seed=int(seed))
        result = json.loads((wd / "result.json").read_text())
        row["data"] = data_id(result.get("data"))
        _flatten("", {k: v for k, v in result.items() if isinstance(v, (int, float))}, row)
        if (wd / "eval.json").exists():
            _flatten("eval/", json.loads((wd / "eval.json").read_text()), row)
        row.update(follow_up_metrics(family, wd))
        if (wd / "config.gin").exists():
            row.update(param_counts(wd))
            row.update(curves.training_time(read_metrics(wd), curves.tokens_per_step(wd)))
        rows.append(row)
    return rows


def data_id(data: dict | None) -> str:
    """A short name of the token cache a run trained on ("corpus/vocab" fingerprints; "unknown" for runs
    written before result.json recorded it)."""
    if not data or not data.get("corpus_fingerprint"):
        return "unknown"
    return f"{data['corpus_fingerprint'][:8]}/{(data.get('vocab_sha256') or '')[:8]}"


def data_note(rows: list[dict]) -> str:
    """The data line of summary.md: which cache the runs trained on, and a warning when they differ."""
    by_id: dict[str, list[str]] = {}
    for r in rows:
        by_id.setdefault(r.get("data", "unknown"), []).append(r["run"])
    if len(by_id) == 1:
        return f"Data: token cache `{next(iter(by_id))}` (corpus/vocab fingerprints) for every run."
    parts = "; ".join(f"`{k}`: {', '.join(v)}" for k, v in sorted(by_id.items()))
    return (
        "**Warning: these runs trained on different data builds**, so their losses are not comparable "
        f"({parts}). Rerun the odd ones out on one build (delete their workdirs and rerun the sweep)."
    )


def cost_note(root: Path, rows: list[dict]) -> str:
    """The cost line of summary.md: the runs, their training hours summed, and how many of them are links
    to other families' runs (`--reuse`: trained there, their hours included)."""
    hours = [r["train_hours"] for r in rows if "train_hours" in r]
    text = (
        f"Cost: {len(rows)} runs, {sum(hours):.1f} run-hours of training in all (each run's training wall time "
        "from its metrics.jsonl, summed; the runs of a `--parallel` sweep train side by side, each on its own "
        "device slot, e.g. one CPU core); mean and median window throughput per member in the table (a run "
        "paused or sharing its core shows as hours above and a mean below what its median implies)."
    )
    if len(hours) < len(rows):
        text += f" {len(rows) - len(hours)} of the runs logged no throughput and are not counted."
    linked = [r for r in rows if (root / r["run"]).is_symlink()]
    if linked:
        text += (
            f" {len(linked)} of the runs ({sum(r.get('train_hours', 0.0) for r in linked):.1f} h) are links to "
            "other families' runs (`--reuse`), trained there."
        )
    return text


def summarise(rows: list[dict], family: Family) -> list[dict]:
    """Per member (in family order): mean and sample std of every numeric column over seeds."""
    order = [m.name for m in family.members]
    out = []
    for name in order + sorted({r["member"] for r in rows} - set(order)):
        group = [r for r in rows if r["member"] == name]
        if not group:
            continue
        summary = {"member": name, "label": group[0]["label"], "model": group[0]["model"], "seeds": len(group)}
        for key in group[0]:
            values = [r[key] for r in group if isinstance(r.get(key), float)]
            if values and key not in ("seed", "step"):
                stats = describe(values)
                summary[key], summary[f"{key}_std"] = stats.mean, stats.std
        out.append(summary)
    return out


def _fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = f"{mean:.4f}" if abs(mean) < 100 else f"{mean:,.0f}"
    return text + ((f" ± {std:.4f}" if abs(mean) < 100 else f" ± {std:,.0f}") if std else "")


# Columns of every run's cost (`curves.training_time`), shown after the family's metrics: the median
# window rate is the run's speed on its own steps; the hours and the mean also hold any pause of the process.
COST = (
    ("train_hours", "train hours"),
    ("mean_tokens_per_second", "mean tokens/s"),
    ("median_tokens_per_second", "median tokens/s"),
)


def markdown_table(summary: list[dict], family: Family) -> str:
    paper_keys = sorted({k for v in family.paper.values() for k in v})
    cost = [(k, name) for k, name in COST if k not in family.metrics and any(k in s for s in summary)]
    head = ["member", "model", "seeds", "params", "activated", *family.metrics, *[name for _, name in cost]]
    head += [f"paper {k}" for k in paper_keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [
            s["label"],
            s["model"],
            str(s["seeds"]),
            f"{s.get('params_total', float('nan')) / 1e6:.2f}M",
            f"{s.get('params_activated', float('nan')) / 1e6:.2f}M",
        ]
        cells += [_fmt(s.get(m), s.get(f"{m}_std")) for m in (*family.metrics, *(k for k, _ in cost))]
        cells += [_fmt(family.paper.get(s["member"], {}).get(k)) for k in paper_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _curves(root: Path, rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """member -> (steps, mean training loss over seeds)."""
    by_member: dict[str, list[dict[int, float]]] = {}
    for r in rows:
        from moe_jax.train.metrics import read_metrics

        series = {rec["step"]: rec["ce"] for rec in read_metrics(root / r["run"]) if "ce" in rec}
        by_member.setdefault(r["member"], []).append(series)
    out = {}
    for member, runs in by_member.items():
        steps = sorted(set.intersection(*(set(s) for s in runs)))
        out[member] = (np.array(steps), np.array([np.mean([s[t] for s in runs]) for t in steps]))
    return out


def plot(root: Path, rows: list[dict], summary: list[dict], family: Family, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for member, (steps, loss) in _curves(root, rows).items():
        ax.plot(steps, loss, label=member)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(f"{family.name}: training loss (mean over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(out / "loss_curves.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    for metric in family.metrics:
        present = [s for s in summary if metric in s]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(present)), 4))
        means = [s[metric] for s in present]
        ax.bar(
            [s["member"] for s in present],
            means,
            yerr=[s.get(f"{metric}_std", 0.0) for s in present],
            capsize=4,
            color="tab:blue",
        )
        lo, hi = min(means), max(means)
        ax.set_ylim(lo - 0.25 * (hi - lo + 1e-3) - 0.02 * abs(lo), hi + 0.25 * (hi - lo + 1e-3))
        ax.set_ylabel(metric)
        ax.set_title(f"{family.name}: {metric}")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        files.append(out / f"bar_{metric.replace('/', '_')}.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files


def write_report(family: Family, root: Path, out: Path | None = None) -> Path:
    """Write results.csv, summary.md and the plots of the runs under `root` to `out` (default
    <root>/report); returns the summary path."""
    out = out or root / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(root, family)
    if not rows:
        raise FileNotFoundError(f"no finished runs under {root}: run `moe-jax sweep` first")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows, family)
    table = markdown_table(summary, family)
    note = data_note(rows)
    if note.startswith("**Warning"):
        print(f"moe-jax sweep: {note.replace('**', '')}", file=sys.stderr)
    text = f"# {family.name}\n\n{family.description}\n\n{table}\n\n{note}\n\n{cost_note(root, rows)}\n"
    heldout = curves.run_curves(root, rows)
    if family.pairs:
        diffs = "\n\n".join(
            curves.paired_table(rows, family, m) for m in family.metrics if m not in ("tokens_per_second", "mfu")
        )
        text += (
            f"\n## Paired differences (same seeds)\n\n{diffs}\n\n## Held-out curves: where the member "
            f"overtakes the baseline\n\n{curves.crossover_table(heldout, family)}\n"
        )
    diagnostics = curves.diagnostics_table(root, rows, family)
    if diagnostics:
        text += (
            f"\n## Router diagnostics at the end of training\n\nEach run's mean over its last "
            f"{curves.FINAL_WINDOW} logged steps and its MoE layers (`moe_jax.moe.stats`: entropy / ln E is 1 "
            f"for a uniform router, load CV 0 and max load 1 for a balanced one); mean ± std over seeds. The "
            f"columns for tokens with no routed expert (expert choice) and the selection-bias range "
            f"(auxiliary-loss-free balancing) appear only where some run has them above 0.\n\n"
            f"{diagnostics}\n"
        )
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(root, rows, summary, family, out)
    import matplotlib

    matplotlib.use("Agg")
    curves.plot_heldout(heldout, family, out)
    curves.plot_diagnostics(root, rows, family, out)
    return out / "summary.md"

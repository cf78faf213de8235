"""Training curves of a family: held-out bits/byte against tokens, paired per-seed differences between
members, where one member overtakes another, and the router diagnostics, as tables and plots.

Every series comes from the members' `metrics.jsonl`: the periodic held-out evaluations (one fixed
sample of the held-out split; the final whole-split value is the table's, not the curve's) and the
per-step router statistics (mean over MoE layers). Tokens = step x batch x sequence length.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moe_jax.sweep.family import Family
from moe_jax.sweep.stats import describe

HELDOUT = "heldout/bits_per_byte"
# (metrics.jsonl key, plot title): the router diagnostics of moe_jax.moe.stats and the loop.
DIAGNOSTICS = (
    ("moe/mean_router_entropy_norm", "router entropy / ln E"),
    ("moe/mean_topk_mass", "top-k gate mass"),
    ("moe/mean_load_cv", "expert-load spread (CV)"),
    ("moe/mean_dead_experts", "dead experts per batch"),
    ("moe/mean_topk_changed", "top-k choices changed since last eval"),
    ("moe/mean_routed_norm", "routed output norm (dashed: shared)"),
)


def tokens_per_step(workdir: Path) -> int:
    from moe_jax.train.restore import parse_workdir_config

    _, cfg = parse_workdir_config(workdir)
    return cfg.batch_size * cfg.seq_len


def training_time(records: list[dict], tokens_per_step: int) -> dict[str, float]:
    """A run's training wall time and mean throughput, from its metrics.jsonl `records`.

    Each logged row's `tokens_per_second` is the throughput of the window since the previous logged row:
    the window's steps x tokens per step over its wall time, which includes a periodic held-out evaluation
    inside it and, in the first window after a start or resume, compilation. A window's time is then
    (step - previous logged step) x `tokens_per_step` / `tokens_per_second`. A resumed run logs again the
    steps it redoes after its last checkpoint: only the last row of each step is kept, so the redone work
    (and the lost work it replaces) is not counted. Rows without a positive `tokens_per_second` (held-out
    rows) are skipped. The final whole-split evaluation and the start-up before the first step are outside
    every window. Returns {"train_hours", "mean_tokens_per_second" (tokens trained / that time),
    "median_tokens_per_second" (`median_tokens_per_second`: a pause of the process, which the hours and
    the mean include, leaves it alone)}, or {} when no row has a throughput.
    """
    rate = window_rates(records)
    seconds, previous = 0.0, 0
    for step in sorted(rate):
        seconds += (step - previous) * tokens_per_step / rate[step]
        previous = step
    if not seconds:
        return {}
    return {
        "train_hours": seconds / 3600,
        "mean_tokens_per_second": previous * tokens_per_step / seconds,
        "median_tokens_per_second": median_tokens_per_second(records),
    }


def window_rates(records: list[dict]) -> dict[int, float]:
    """Logged step -> tokens/s of the window that ends there (the last row of each step: a resumed run's
    redone steps replace the lost ones; rows without a positive `tokens_per_second` skipped)."""
    return {r["step"]: r["tokens_per_second"] for r in records if r.get("tokens_per_second", 0) > 0}


def median_tokens_per_second(records: list[dict]) -> float | None:
    """The median of a run's window throughputs (`window_rates`), None without any.

    Unlike the mean (`training_time`), it ignores the few windows that contain a compilation, a held-out
    evaluation or a pause of the process (a stopped process puts its whole pause into one window), so it
    is the run's rate on its own steps: what the steps it has left will take.
    """
    rates = list(window_rates(records).values())
    return float(np.median(rates)) if rates else None


def series(workdir: Path, key: str, last_step: int | None = None) -> dict[int, float]:
    """step -> value of `key` in a run's metrics.jsonl (periodic records only: before `last_step`)."""
    from moe_jax.train.metrics import read_metrics

    return by_step(read_metrics(workdir), key, last_step)


def by_step(records: list[dict], key: str, last_step: int | None = None) -> dict[int, float]:
    """step -> finite value of `key` in already-read metrics records (before `last_step`)."""
    return {
        r["step"]: r[key]
        for r in records
        if key in r and (last_step is None or r["step"] < last_step) and np.isfinite(r[key])
    }


def run_curves(root: Path, rows: list[dict], key: str = HELDOUT) -> dict[str, dict[int, dict[int, float]]]:
    """member -> seed -> {tokens: value} of every finished run.

    `rows` are results.csv rows as the report holds them, or as `moe_jax.sweep.claims.read_results` reads
    them back from the file (numbers as floats).
    """
    out: dict[str, dict[int, dict[int, float]]] = {}
    for r in rows:
        wd = root / r["run"]
        per = tokens_per_step(wd)
        last = int(r.get("step", 0)) if key == HELDOUT else None
        out.setdefault(r["member"], {})[int(r["seed"])] = {s * per: v for s, v in series(wd, key, last).items()}
    return out


def paired(curves: dict[str, dict[int, dict[int, float]]], a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [P] and per-seed differences a - b [seeds, P] at the evaluations both have (paired seeds)."""
    seeds = sorted(set(curves.get(a, {})) & set(curves.get(b, {})))
    if not seeds:
        return np.zeros(0), np.zeros((0, 0))
    points = sorted(set.intersection(*(set(curves[a][s]) & set(curves[b][s]) for s in seeds)))
    diffs = np.array([[curves[a][s][t] - curves[b][s][t] for t in points] for s in seeds])
    return np.array(points, dtype=float), diffs


def crossover(tokens: np.ndarray, diffs: np.ndarray) -> dict:
    """Where the mean paired difference a - b turns and stays negative (a overtakes b).

    Returns {"tokens": first such evaluation or None, "final": last mean difference, "final_std": its
    std over seeds, "trend_tokens": where a least-squares line of the mean difference against
    log10(tokens), fitted to the later half of the evaluations, crosses 0 after the last evaluation
    (None if it does not fall, or crossed already: a prediction only for a member still behind)}.
    """
    if tokens.size == 0:
        return {"tokens": None, "final": math.nan, "final_std": math.nan, "trend_tokens": None}
    mean = diffs.mean(axis=0)
    below = mean < 0
    first = next((i for i in range(len(mean)) if below[i:].all()), None)
    half = slice(len(mean) // 2, None)
    trend = None
    if len(mean[half]) >= 2:
        slope, icpt = np.polyfit(np.log10(tokens[half]), mean[half], 1)
        at = 10 ** (-icpt / slope) if slope < -1e-9 else None  # a flat line, up to rounding, predicts nothing
        trend = float(at) if at is not None and at > tokens[-1] else None
    final = describe(diffs[:, -1])
    return {
        "tokens": None if first is None else float(tokens[first]),
        "final": final.mean,
        "final_std": final.std,
        "trend_tokens": trend,
    }


def paired_table(rows: list[dict], family: Family, metric: str) -> str:
    """Markdown: per pair, the final `metric` difference over paired seeds (mean ± std, n)."""
    lines = [f"| member - baseline | seeds | {metric} difference (mean ± std) | per seed |", "|---|---|---|---|"]
    for a, b in family.pairs:
        va = {r["seed"]: r.get(metric) for r in rows if r["member"] == a}
        vb = {r["seed"]: r.get(metric) for r in rows if r["member"] == b}
        seeds = sorted(s for s in set(va) & set(vb) if isinstance(va[s], float) and isinstance(vb[s], float))
        if not seeds:
            continue
        d = [va[s] - vb[s] for s in seeds]
        s = describe(d)
        std = f" ± {s.std:.4f}" if s.n > 1 else ""
        lines.append(f"| {a} - {b} | {s.n} | {s.mean:+.4f}{std} | " + ", ".join(f"{x:+.4f}" for x in d) + " |")
    return "\n".join(lines)


def crossover_table(curves: dict, family: Family) -> str:
    """Markdown: per pair, where the member's held-out curve overtakes the baseline's."""
    lines = [
        "| member - baseline | overtakes at (tokens) | last periodic difference (bits/byte) | "
        "trend of the later half crosses 0 at (tokens) |",
        "|---|---|---|---|",
    ]
    for a, b in family.pairs:
        tokens, diffs = paired(curves, a, b)
        if tokens.size == 0:
            continue
        c = crossover(tokens, diffs)
        at = "not within the budget" if c["tokens"] is None else f"{c['tokens'] / 1e6:.2f}M"
        trend = _trend_text(c["trend_tokens"], tokens[-1])
        std = f" ± {c['final_std']:.4f}" if c["final_std"] else ""
        lines.append(f"| {a} - {b} | {at} | {c['final']:+.4f}{std} | {trend} |")
    return "\n".join(lines)


def _trend_text(at: float | None, budget: float) -> str:
    """The trend's crossing in millions of tokens; past 1000 times the budget only that (a line fitted
    to half a run says nothing precise about a thousandfold extrapolation)."""
    if at is None:
        return "-"
    if at > 1000 * budget:
        return "beyond 1000x the budget"
    return f"{at / 1e9:.3g}B" if at >= 1e9 else f"{at / 1e6:.3g}M"


# The end-of-training columns of `diagnostics_table`: DIAGNOSTICS' keys, and the two that only a table
# shows well (the busiest expert's load, and the shared experts' output norm beside the routed one).
FINAL_DIAGNOSTICS = (
    *((k, t.replace(" (dashed: shared)", "")) for k, t in DIAGNOSTICS),
    ("moe/mean_max_load", "max expert load / mean"),
    ("moe/mean_shared_norm", "shared output norm"),
)
# Shown only where some run's value is not 0: the routers that use them (expert choice leaves tokens
# without an expert; auxiliary-loss-free balancing spreads a selection bias) would otherwise add a
# column of zeros to every family's table.
SOMETIMES_DIAGNOSTICS = (
    ("moe/mean_unrouted_fraction", "tokens with no routed expert"),
    ("moe/mean_router_bias_range", "selection-bias range (max - min)"),
)
FINAL_WINDOW = 10  # logged training steps averaged per run for the end-of-training diagnostics


def final_diagnostics(root: Path, rows: list[dict], window: int = FINAL_WINDOW) -> dict[str, dict[str, list[float]]]:
    """member -> metrics.jsonl key -> one value per finished run that logs it: the mean of the run's last
    `window` logged values (each already a mean over the MoE layers), so that one noisy batch does not
    stand for the end of training."""
    from moe_jax.train.metrics import read_metrics

    out: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        records = read_metrics(root / r["run"])  # once per run, not once per key
        for key, _ in (*FINAL_DIAGNOSTICS, *SOMETIMES_DIAGNOSTICS):
            values = [v for _, v in sorted(by_step(records, key).items())][-window:]
            if values:
                out.setdefault(r["member"], {}).setdefault(key, []).append(float(np.mean(values)))
    return out


def diagnostics_table(root: Path, rows: list[dict], family: Family, window: int = FINAL_WINDOW) -> str:
    """Markdown: each routed member's router diagnostics at the end of training (`final_diagnostics`),
    mean ± std over its seeds, and the SOMETIMES_DIAGNOSTICS that some run has not at 0; "" when no run
    logs them (a family of dense models)."""
    final = final_diagnostics(root, rows, window)
    if not final:
        return ""
    used = [(k, t) for k, t in SOMETIMES_DIAGNOSTICS if any(any(final[m].get(k, [])) for m in final)]
    columns = (*FINAL_DIAGNOSTICS, *used)
    lines = [
        "| member | seeds | " + " | ".join(title for _, title in columns) + " |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for member in (m.name for m in family.members if m.name in final):
        cells = []
        for key, _ in columns:
            s = describe(final[member].get(key, []))
            cells.append("-" if s is None else f"{s.mean:.3f}" + (f" ± {s.std:.3f}" if s.n > 1 else ""))
        seeds = max(len(v) for v in final[member].values())
        lines.append(f"| {member} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_heldout(curves: dict, family: Family, out: Path) -> Path | None:
    """held-out bits/byte against tokens (log x) per member, and the paired differences per pair."""
    import matplotlib.pyplot as plt

    if not curves:
        return None
    fig, axes = plt.subplots(1, 2 if family.pairs else 1, figsize=(13 if family.pairs else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    for i, member in enumerate(m.name for m in family.members if m.name in curves):
        runs = curves[member]
        points = sorted(set.intersection(*(set(r) for r in runs.values())))
        if not points:
            continue
        values = np.array([[r[t] for t in points] for r in runs.values()])
        ax.plot(points, values.mean(0), color=f"C{i}", label=member)
        if len(values) > 1:
            ax.fill_between(points, values.min(0), values.max(0), color=f"C{i}", alpha=0.2)
    ax.set(
        xscale="log",
        xlabel="training tokens",
        ylabel="held-out bits/byte (periodic sample)",
        title=f"{family.name}: held-out bits/byte (mean; band = seed range)",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    if family.pairs:
        ax = axes[0, 1]
        for i, (a, b) in enumerate(family.pairs):
            tokens, diffs = paired(curves, a, b)
            if tokens.size == 0:
                continue
            n = diffs.shape[0]
            ax.plot(tokens, diffs.mean(0), color=f"C{i}", label=f"{a} - {b} ({n} seed{'s' * (n > 1)})")
            if diffs.shape[0] > 1:
                sd = diffs.std(0, ddof=1)
                ax.fill_between(tokens, diffs.mean(0) - sd, diffs.mean(0) + sd, color=f"C{i}", alpha=0.2)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set(
            xscale="log",
            xlabel="training tokens",
            ylabel="paired difference (bits/byte)",
            title="paired per-seed differences (mean ± std); below 0: member ahead",
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = out / "heldout_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_diagnostics(root: Path, rows: list[dict], family: Family, out: Path) -> Path | None:
    """The router diagnostics against tokens, one panel each, mean over seeds and MoE layers."""
    import matplotlib.pyplot as plt

    per_key = {key: run_curves(root, rows, key) for key, _ in DIAGNOSTICS}
    shared = run_curves(root, rows, "moe/mean_shared_norm")
    if not any(any(runs.values()) for c in per_key.values() for runs in c.values()):
        return None
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (key, title) in zip(axes.flat, DIAGNOSTICS):
        for i, member in enumerate(m.name for m in family.members):
            for curves, style in ((per_key[key], "-"), (shared if key.endswith("routed_norm") else {}, "--")):
                runs = [r for r in curves.get(member, {}).values() if r]
                points = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
                if points and (style == "-" or any(r[t] for r in runs for t in points)):
                    ax.plot(
                        points,
                        np.mean([[r[t] for t in points] for r in runs], 0),
                        style,
                        color=f"C{i}",
                        label=member if style == "-" else None,
                    )
        ax.set(xscale="log", xlabel="training tokens", title=title)
        ax.grid(alpha=0.3, which="both")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{family.name}: router diagnostics (mean over MoE layers and seeds)")
    fig.tight_layout()
    path = out / "router_diagnostics.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

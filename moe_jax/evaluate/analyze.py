"""`moe-jax analyze`: the expert-specialization analyses of paper §4.5 on a trained checkpoint.

* **Disable the top routed experts** (Fig 4): per token, mask the r routed experts with the highest
  routing probability and take the top-K' of the rest; r = round(ratio * N') for the paper's ratios
  0, 1/16, ..., 4/16 (the paper does not say how it rounds: UNVERIFIED).
* **Fewer activated routed experts** at inference (Fig 5): top-k = K'-4 .. K' (at least 1), no retraining.
* **Shared expert disabled, one more routed expert activated** (§4.5; compute unchanged). Skipped with a
  message for models without shared experts (GShard, Switch, Hash).
* **Expert load** per MoE layer and per corpus source, as a heatmap (fraction of a source's routed
  assignments each expert receives, relative to uniform).

Each setting reloads the same weights with different routing through gin bindings of `load_trained`
(`MoEConfig.disable_top_experts`, `MoEConfig.top_k`, `MoEConfig.disable_shared`) and measures held-out
loss with `heldout.heldout_eval`, the function `moe-jax eval` uses: with nothing disabled the analysis
reproduces the plain held-out loss exactly. Writes `<workdir>/analysis/specialization.json` and
`disable_top_experts.png`, `fewer_activated.png`, `expert_load_heatmap.png`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

# Paper §4.5 (docs/paper.md §5.5; values extracted from the PDF's figures).
PAPER_RATIOS = (0.0, 1 / 16, 2 / 16, 3 / 16, 4 / 16)
PAPER_FIG4_DEEPSEEKMOE = (1.808, 7.468, 8.196, 8.706, 9.071)
PAPER_FIG4_GSHARD_X15 = (1.808, 5.586, 7.518, 7.627, 7.721)
PAPER_FIG5 = {3: 1.956, 4: 1.868, 5: 1.831, 6: 1.814, 7: 1.808}
PAPER_FIG5_GSHARD = 1.867
PAPER_SHARED_DISABLED = (1.808, 2.414)


@dataclasses.dataclass
class AnalysisOptions:
    """Attributes:
    ratios: fractions of the routed experts to disable (Fig 4).
    fewest_activated: smallest top-k of Fig 5 (default K' - 4, at least 1).
    heldout_batches: held-out batches per source for every loss (0 = all).
    batch_size: held-out rows per batch.
    heatmap_batches: batches per source for the expert-load heatmap (0 = all).
    cache_dir: token cache (default: the one the model was trained on).
    out_dir: default <workdir>/analysis.
    shared: run the shared-expert analysis (when the model has shared experts).
    progress: progress bars (on a terminal only); verbose: a log line per point (stderr).
    """

    ratios: Sequence[float] = PAPER_RATIOS
    fewest_activated: int | None = None
    heldout_batches: int = 0
    batch_size: int = 16
    heatmap_batches: int = 0
    cache_dir: str = ""
    out_dir: str = ""
    shared: bool = True
    progress: bool = True
    verbose: bool = True


def experts_for_ratio(ratio: float, num_experts: int) -> int:
    """r = round(ratio * N'): the number of routed experts a disabled ratio means."""
    return int(round(ratio * num_experts))


def _ratio_label(ratio: float) -> str:
    f = Fraction(ratio).limit_denominator(64)
    return "0" if f == 0 else (f"{f.numerator * 16 // f.denominator}/16" if (16 % f.denominator == 0) else str(f))


def _routing_counter(trained, num_experts: int, mesh):
    """count(params, batch) -> (routed assignments [L_moe, E] over the batch's real tokens, real tokens):
    one jitted forward of the model, whose MoE layers report the experts they routed each token to."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, rest = trained.graphdef, trained.rest

    def count_fn(params, batch):
        weights = batch["decoder_loss_weights"]
        out = nnx.merge(graphdef, params, rest)(
            batch["decoder_input_tokens"], batch["decoder_positions"], batch["decoder_segment_ids"]
        )
        ids = out.expert_ids.reshape(out.expert_ids.shape[0], *weights.shape, -1)  # [L, B, S, k], -1 inactive
        real = (weights > 0)[None, :, :, None, None]
        onehot = jax.nn.one_hot(ids, num_experts, dtype=jnp.float32) * real  # an id of -1 is all zeros
        return onehot.sum(axis=(1, 2, 3)), jnp.sum(weights > 0)

    return jax.jit(count_fn, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def expert_load(
    trained, cache_dir: Path, seq_len: int, batch_size: int, mesh, max_batches: int = 0, progress: bool = True
) -> dict:
    """Routed assignments per source, MoE layer and expert over the held-out split (padding excluded).

    Returns {"sources": [...], "layers": [layer ids], "counts": [S][L_moe][E] ints, "tokens": [S]}.
    """
    import jax
    from tqdm import tqdm

    from moe_jax.evaluate.heldout import heldout_sources, source_loader
    from moe_jax.parallel import shard_batch

    cfg = trained.model_cfg
    e = cfg.moe.num_experts
    count = _routing_counter(trained, e, mesh)
    sources = heldout_sources(cache_dir)
    counts, tokens = [], []
    with jax.set_mesh(mesh):
        for name in sources:
            loader, total = source_loader(cache_dir, "heldout", batch_size, seq_len, name, max_batches)
            c, n = np.zeros((cfg.num_moe_layers, e)), 0
            bar = tqdm(
                loader, total=total, desc=f"expert load {name}", leave=False, disable=not progress, dynamic_ncols=True
            )
            for i, batch in enumerate(bar):
                if max_batches and i >= max_batches:
                    break
                got, ntok = count(trained.params, shard_batch(batch, mesh))
                c += np.asarray(got, np.float64)
                n += int(ntok)
            counts.append(c.astype(np.int64).tolist())
            tokens.append(n)
    layers = [l for l in range(cfg.num_layers) if cfg.is_moe_layer(l)]
    return {
        "sources": sources,
        "layers": layers,
        "counts": counts,
        "tokens": tokens,
        "top_k": cfg.moe.top_k,
        "num_experts": e,
    }


def _heldout_runner(workdir: Path, base, bindings: Sequence[str], cache: Path, opts: AnalysisOptions, mesh, bars: bool):
    """heldout(extra bindings) -> the held-out loss entry of one setting (the weights reloaded with them)."""
    from moe_jax.evaluate.heldout import heldout_eval
    from moe_jax.train.restore import load_trained

    def heldout(extra: Sequence[str]) -> dict:
        trained = base if not extra else load_trained(workdir, base.step, [*bindings, *extra], mesh)
        t0 = time.perf_counter()
        res = heldout_eval(
            trained.graphdef,
            trained.params,
            trained.rest,
            cache,
            base.train_cfg.seq_len,
            opts.batch_size,
            mesh,
            max_batches=opts.heldout_batches,
            progress=bars,
        )
        return {
            "loss": res.loss,
            "bits_per_byte": res.bits_per_byte,
            "tokens": res.tokens,
            "bindings": list(extra),
            "seconds": time.perf_counter() - t0,
        }

    return heldout


def _disable_top_points(heldout, ratios: Sequence[float], n_routed: int, k: int, log) -> list[dict]:
    """Fig 4: the held-out loss with the top r = round(ratio * N') routed experts disabled, per ratio."""
    points = []
    for ratio in ratios:
        r = experts_for_ratio(ratio, n_routed)
        point = {
            "ratio": ratio,
            "label": _ratio_label(ratio),
            "disabled_experts": r,
            "paper_deepseekmoe": _paper_at(PAPER_FIG4_DEEPSEEKMOE, ratio),
            "paper_gshard_x1.5": _paper_at(PAPER_FIG4_GSHARD_X15, ratio),
        }
        if r + k > n_routed:
            point["skipped"] = f"disabling {r} leaves fewer than top_k={k} of {n_routed} routed experts"
        else:
            point.update(heldout([f"MoEConfig.disable_top_experts = {r}"]))
            log(f"  disable top {r} ({point['label']}): loss {point['loss']:.4f}")
        points.append(point)
    return points


def _fewer_activated_points(heldout, plain: dict, lo: int, k: int, log) -> list[dict]:
    """Fig 5: the held-out loss with top-k' routed experts activated, k' = lo .. K' (K' is `plain`)."""
    points = []
    for kk in range(max(1, lo), k + 1):
        point = {"activated_routed": kk, "paper": PAPER_FIG5.get(kk) if k == 7 else None}
        if kk == k:
            point.update(plain, same_as_plain=True)
        else:
            point.update(heldout([f"MoEConfig.top_k = {kk}"]))
        log(f"  top-{kk}: loss {point['loss']:.4f}")
        points.append(point)
    return points


def _shared_disabled(heldout, plain: dict, moe, wanted: bool, log) -> dict:
    """§4.5: the shared experts disabled and one more routed expert activated (or why it is skipped)."""
    k, n_routed = moe.top_k, moe.num_experts
    if not moe.num_shared_experts:
        log("  shared-expert analysis skipped: the model has no shared experts")
        return {"skipped": "no shared experts (GShard/Switch-type model)"}
    if not wanted:
        return {"skipped": "--no_shared"}
    if k + 1 > n_routed:
        return {"skipped": f"top_k + 1 = {k + 1} > {n_routed} routed experts"}
    sd = heldout(["MoEConfig.disable_shared = True", f"MoEConfig.top_k = {k + 1}"])
    sd.update(
        top_k=k + 1, plain_loss=plain["loss"], paper_plain=PAPER_SHARED_DISABLED[0], paper=PAPER_SHARED_DISABLED[1]
    )
    log(f"  shared disabled, top-{k + 1}: loss {sd['loss']:.4f}")
    return sd


def analyze(
    workdir: str | Path, opts: AnalysisOptions, mesh, step: int | None = None, bindings: Sequence[str] = ()
) -> dict:
    """Run the analyses; returns the JSON-able report (also written, with the plots, to opts.out_dir)."""
    from moe_jax.data.paths import default_cache
    from moe_jax.train.restore import load_trained

    workdir = Path(workdir)
    base = load_trained(workdir, step, bindings, mesh)
    moe = base.model_cfg.moe
    if moe is None or not moe.num_experts or moe.router != "softmax":
        raise ValueError(f"{workdir}: the §4.5 analyses need a model with softmax-routed experts (got moe={moe})")
    seq_len = base.train_cfg.seq_len
    cache = Path(opts.cache_dir) if opts.cache_dir else default_cache(base.train_cfg, base.model_cfg.vocab_size)
    n_routed, k = moe.num_experts, moe.top_k
    out_dir = Path(opts.out_dir) if opts.out_dir else workdir / "analysis"
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if opts.verbose else (lambda msg: None)
    bars = opts.progress and sys.stderr.isatty()
    heldout = _heldout_runner(workdir, base, bindings, cache, opts, mesh, bars)

    report: dict = {
        "workdir": str(workdir),
        "step": base.step,
        "seq_len": seq_len,
        "cache": str(cache),
        "num_routed_experts": n_routed,
        "top_k": k,
        "num_shared_experts": moe.num_shared_experts,
        "heldout_batches_per_source": opts.heldout_batches,
    }
    log(f"analyze {workdir} step {base.step}: {moe.num_shared_experts} shared + top-{k} of {n_routed} routed")
    plain = heldout([])
    report["plain"] = plain
    log(f"  plain held-out loss {plain['loss']:.4f}")
    report["disable_top_experts"] = _disable_top_points(heldout, opts.ratios, n_routed, k, log)
    lo = opts.fewest_activated if opts.fewest_activated is not None else max(1, k - 4)
    report["fewer_activated"] = _fewer_activated_points(heldout, plain, lo, k, log)
    report["shared_disabled"] = _shared_disabled(heldout, plain, moe, opts.shared, log)
    report["expert_load"] = expert_load(base, cache, seq_len, opts.batch_size, mesh, opts.heatmap_batches, bars)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "specialization.json").write_text(json.dumps(report, indent=1) + "\n")
    report["plots"] = write_plots(report, out_dir)
    (out_dir / "specialization.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def summary_metrics(report: dict) -> dict[str, float]:
    """Flat numbers of a `specialization.json` for sweep reports: `analysis_plain`, `disable_top_<r>`
    (r = "1/16", ...), `top_k=<k>` and `shared_disabled` held-out losses (absent where skipped)."""
    out = {"analysis_plain": report["plain"]["loss"]}
    for p in report.get("disable_top_experts", []):
        if "loss" in p:
            out[f"disable_top_{p['label']}"] = p["loss"]
    for p in report.get("fewer_activated", []):
        out[f"top_k={p['activated_routed']}"] = p["loss"]
    if "loss" in report.get("shared_disabled", {}):
        out["shared_disabled"] = report["shared_disabled"]["loss"]
    return out


def _paper_at(values: Sequence[float], ratio: float) -> float | None:
    for r, v in zip(PAPER_RATIOS, values):
        if abs(r - ratio) < 1e-9:
            return v
    return None


def relative_load(load: dict) -> np.ndarray:
    """[S, L, E]: each expert's share of a source's routed assignments in a layer, times E (1 = uniform)."""
    counts = np.asarray(load["counts"], np.float64)
    totals = counts.sum(axis=-1, keepdims=True)
    return counts / np.maximum(totals, 1) * counts.shape[-1]


def write_plots(report: dict, out_dir: Path) -> list[str]:
    """disable_top_experts.png, fewer_activated.png, expert_load_heatmap.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, plot in (
        ("disable_top_experts.png", _plot_disable_top),
        ("fewer_activated.png", _plot_fewer_activated),
        ("expert_load_heatmap.png", _plot_expert_load),
    ):
        fig = plot(plt, report)
        fig.tight_layout()
        paths.append(str(out_dir / name))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def _plot_disable_top(plt, report: dict):
    """Fig 4: absolute losses (left) and the increase over nothing disabled (right)."""
    name, base = Path(report["workdir"]).name, report["plain"]["loss"]
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(11, 4))
    pts = [p for p in report["disable_top_experts"] if "loss" in p]
    xs, ys = [p["ratio"] for p in pts], [p["loss"] for p in pts]
    for axis, shift, paper_shift in ((ax, 0.0, 0.0), (dx, base, PAPER_FIG4_DEEPSEEKMOE[0])):
        axis.plot(xs, [y - shift for y in ys], "o-", label=f"{name} (ours)")
        for paper, style, label in (
            (PAPER_FIG4_DEEPSEEKMOE, "s--", "paper DeepSeekMoE 2B"),
            (PAPER_FIG4_GSHARD_X15, "^:", "paper GShard x1.5"),
        ):
            axis.plot(PAPER_RATIOS, [v - paper_shift for v in paper], style, color="gray", label=label)
        axis.set_xticks(PAPER_RATIOS, [_ratio_label(r) for r in PAPER_RATIOS])
        axis.set_xlabel("ratio of disabled top routed experts")
    ax.set_ylabel("held-out loss (nats/token)")
    dx.set_ylabel("increase over 0 disabled")
    dx.set_yscale("symlog", linthresh=0.1)
    ax.set_title("Disabling the top routed experts (paper Fig 4)")
    ax.legend()
    return fig


def _plot_fewer_activated(plt, report: dict):
    """Fig 5 (+ shared disabled as a marker), absolute and relative to all K' activated."""
    name, base = Path(report["workdir"]).name, report["plain"]["loss"]
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(11, 4))
    pts = report["fewer_activated"]
    ks = sorted(PAPER_FIG5)
    sd = report.get("shared_disabled", {})
    for axis, shift, paper_shift in ((ax, 0.0, 0.0), (dx, base, PAPER_FIG5[7])):
        axis.plot([p["activated_routed"] for p in pts], [p["loss"] - shift for p in pts], "o-", label=f"{name} (ours)")
        axis.plot(
            ks,
            [PAPER_FIG5[k] - paper_shift for k in ks],
            "s--",
            color="gray",
            label="paper DeepSeekMoE 2B (top-7 of 63)",
        )
        axis.axhline(PAPER_FIG5_GSHARD - paper_shift, color="gray", ls=":", label="paper GShard (top-2 of 16)")
        if "loss" in sd:
            axis.plot(
                [sd["top_k"]], [sd["loss"] - shift], "rx", ms=9, label=f"ours: shared disabled, top-{sd['top_k']}"
            )
            axis.plot([8], [PAPER_SHARED_DISABLED[1] - paper_shift], "kx", ms=9, label="paper: shared disabled, top-8")
        axis.set_xlabel("activated routed experts at inference")
    ax.set_ylabel("held-out loss (nats/token)")
    dx.set_ylabel(f"increase over all {report['top_k']} activated")
    ax.set_title("Fewer activated routed experts (paper Fig 5)")
    ax.legend(fontsize=8)
    return fig


def _plot_expert_load(plt, report: dict):
    """Each routed expert's load relative to uniform, per source (rows), one panel per MoE layer."""
    load = report["expert_load"]
    rel = relative_load(load)
    n_layers = rel.shape[1]
    fig, axes = plt.subplots(
        n_layers,
        1,
        figsize=(max(6, 0.14 * rel.shape[2] + 3), 0.35 * len(load["sources"]) * n_layers + 1.5),
        squeeze=False,
    )
    vmax = max(2.0, float(np.percentile(rel, 99)))
    for li in range(n_layers):
        ax = axes[li, 0]
        im = ax.imshow(rel[:, li, :], aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(len(load["sources"])), load["sources"], fontsize=7)
        ax.set_title(f"MoE layer {load['layers'][li]}: routed load / uniform", fontsize=9)
        ax.set_xlabel("routed expert")
        fig.colorbar(im, ax=ax, fraction=0.03)
    return fig


def format_analysis(report: dict) -> str:
    """The §4.5 numbers next to the paper's (paper: DeepSeekMoE 2B / GShard x1.5 at 100B tokens)."""
    lines = [
        f"{report['workdir']} step {report['step']}: {report['num_shared_experts']} shared + top-{report['top_k']} "
        f"of {report['num_routed_experts']} routed; plain held-out loss {report['plain']['loss']:.4f}",
        "",
        "Disabling the top routed experts (paper Fig 4)",
        f"  {'ratio':>6}{'experts':>9}{'ours':>9}{'Δ ours':>9}{'paper DS':>10}{'Δ DS':>8}{'paper GS1.5':>12}",
    ]
    base = report["plain"]["loss"]
    for p in report["disable_top_experts"]:
        ds, gs = p["paper_deepseekmoe"], p["paper_gshard_x1.5"]
        ours = f"{p['loss']:>9.3f}{p['loss'] - base:>+9.3f}" if "loss" in p else f"{'skipped':>18}"
        lines.append(
            f"  {p['label']:>6}{p['disabled_experts']:>9}{ours}{_f(ds, 10)}"
            f"{_f(None if ds is None else ds - 1.808, 8, '+.3f')}{_f(gs, 12)}"
        )
    lines += [
        "",
        "Fewer activated routed experts at inference (paper Fig 5; paper GShard top-2: 1.867)",
        f"  {'top-k':>6}{'ours':>9}{'Δ ours':>9}{'paper':>8}",
    ]
    for p in report["fewer_activated"]:
        lines.append(f"  {p['activated_routed']:>6}{p['loss']:>9.3f}{p['loss'] - base:>+9.3f}{_f(p['paper'], 8)}")
    sd = report["shared_disabled"]
    lines.append("")
    if "loss" in sd:
        lines.append(
            f"Shared expert disabled, top-{sd['top_k']} routed: ours {base:.3f} -> {sd['loss']:.3f} "
            f"({sd['loss'] - base:+.3f}); paper 1.808 -> 2.414 (+0.606)"
        )
    else:
        lines.append(f"Shared expert disabled: skipped ({sd['skipped']})")
    load = report.get("expert_load")
    if load:
        rel = relative_load(load)
        lines.append("")
        lines.append(
            "Expert load (max / uniform over experts, per MoE layer): "
            + ", ".join(
                f"layer {l}: {rel[:, i, :].max():.2f} (max), "
                f"{np.mean(rel[:, i, :].max(axis=-1)):.2f} (mean over sources)"
                for i, l in enumerate(load["layers"])
            )
        )
    if report.get("plots"):
        lines.append("plots: " + ", ".join(report["plots"]))
    return "\n".join(lines)


def _f(x, width: int, fmt: str = ".3f") -> str:
    return ("-" if x is None else format(x, fmt)).rjust(width)

"""`moe-jax params`: parameter counts and training FLOPs of gin-configured models (no weights allocated).

  moe-jax params --model=deepseekmoe_2b [--gin_file=runs/pretrain_2b.gin] [--gin.KEY=VALUE ...]
  moe-jax params --gin_file=gin/models/deepseekmoe_16b.gin [--seq_len=4096] [--json]
  moe-jax params --table      every paper model next to the paper's printed numbers, and the proxies
  moe-jax params --list       the available model names

The sequence length T of "FLOPs per sequence" is --seq_len, else the SEQ_LEN macro of a run file
given with --gin_file, else the paper's run of a paper model (2K at 2B, 4K at 16B/145B), else 2048.
Exit status: 0; 1 if --table finds a value outside its tolerance; 2 for a bad config or argument.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

from moe_jax.configs import gin_utils
from moe_jax.configs.paper_numbers import (
    FLOPS_TOLERANCE,
    PAPER_MODELS,
    PARAM_TOLERANCE,
    Check,
    PaperModel,
    Printed,
    paper_model,
)
from moe_jax.model.params import ParamCounts, count_params

DEFAULT_SEQ_LEN = 2048


@dataclasses.dataclass(frozen=True)
class ModelReport:
    """Counts of one configured model and, for a paper model, the comparison with the paper."""

    name: str
    counts: ParamCounts
    paper: PaperModel | None


def _b(n: float) -> str:
    return f"{n / 1e9:.3f}B"


def _t(n: float) -> str:
    return f"{n / 1e12:.2f}T"


def _m(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def count_model(
    gin_files: Sequence[str],
    bindings: Sequence[str] = (),
    seq_len: int | None = None,
    default_seq_len: int = DEFAULT_SEQ_LEN,
) -> tuple[ParamCounts, int, str]:
    """Parse gin, build the ModelConfig and count it. Returns (counts, T, where T came from).

    The gin config is cleared afterwards: counting is a query and must not leave bindings behind
    for the next `MoEConfig(...)` built in this process."""
    import gin

    try:
        cfg = gin_utils.model_config_from_gin(gin_files, bindings)
        if seq_len is not None:
            source = "--seq_len"
        elif gin_utils.query_macro("SEQ_LEN") is not None:
            seq_len, source = int(gin_utils.query_macro("SEQ_LEN")), "SEQ_LEN of the run file"
        else:
            seq_len, source = default_seq_len, "default"
        return count_params(cfg, seq_len), seq_len, source
    finally:
        gin.clear_config()


def run_seq_len(run: str) -> int:
    """SEQ_LEN of gin/runs/<run>.gin (parsed on its own; the gin config is cleared afterwards)."""
    gin_utils.parse_gin([gin_utils.run_gin_path(run)], finalize=False)
    seq_len = int(gin_utils.query_macro("SEQ_LEN", DEFAULT_SEQ_LEN))
    gin_utils.parse_gin([], finalize=False)
    return seq_len


def paper_report(model: PaperModel) -> ModelReport:
    """Count a paper model with its paper run file (for T)."""
    files = [str(gin_utils.model_gin_path(model.name)), str(gin_utils.run_gin_path(model.run))]
    counts, _, _ = count_model(files)
    return ModelReport(model.name, counts, model)


def _cell(printed: Printed | None, ours: float, tol: float) -> tuple[str, Check | None]:
    """("printed  diff status", Check) for a table cell; "-" where nothing is printed."""
    if printed is None:
        return "-", None
    check = printed.check(ours, tol)
    return f"{printed.text} {check.rel * 100:+6.2f}% {check.status:<6}", check


def _rows_table(headers: list[str], rows: list[list[str]], align_left: int = 1) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < align_left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def paper_table(reports: list[ModelReport]) -> tuple[str, bool]:
    """The side-by-side table of computed vs printed numbers; returns (text, every check ok)."""
    all_ok = True
    main_rows, expert_rows = [], []
    for rep in reports:
        c, p = rep.counts, rep.paper
        checked = [
            (_b(c.total), *_cell(p.total, c.total, PARAM_TOLERANCE)),
            (_b(c.activated), *_cell(p.activated, c.activated, PARAM_TOLERANCE)),
            (_b(c.attention), *_cell(p.attention, c.attention, PARAM_TOLERANCE)),
            (_t(c.flops), *_cell(p.flops, c.flops, FLOPS_TOLERANCE)),
            (_b(c.expert), *_cell(p.expert, c.expert, PARAM_TOLERANCE)),
            (_b(c.activated_expert), *_cell(p.activated_expert, c.activated_expert, PARAM_TOLERANCE)),
        ]
        all_ok &= all(check is None or check.ok for _, _, check in checked)
        cells = [[ours, text] for ours, text, _ in checked]
        main_rows.append([rep.name, p.label, *cells[0], *cells[1], *cells[2], f"{c.seq_len}", *cells[3]])
        expert_rows.append([rep.name, *cells[4], *cells[5], p.expert.source if p.expert else "not printed"])
    paper = "paper, diff, status"
    main = _rows_table(
        ["model", "paper label", "total", paper, "activated", paper, "attention", paper, "T", "FLOPs/seq", paper],
        main_rows,
        align_left=2,
    )
    expert = _rows_table(["model", "expert params", paper, "activated expert", paper, "source"], expert_rows)
    return (
        main + "\n\nExpert parameters (shared + routed expert FFNs, no router; paper Tab 2/8/9 print them "
        "to 2-3 significant digits, a finer check of the expert widths):\n" + expert,
        all_ok,
    )


def proxy_table() -> str:
    """Counts of every proxy model (no paper numbers) at the proxy run's sequence length."""
    rows = []
    run = str(gin_utils.run_gin_path("proxy_cpu"))
    for name in gin_utils.list_models():
        path = gin_utils.model_gin_path(name)
        if path.parent.name != "proxy":
            continue
        counts, t, _ = count_model([str(path), run])
        emb = counts.by_category["embedding"] + counts.by_category["lm_head"]
        rows.append(
            [
                name,
                _m(counts.total),
                _m(counts.activated),
                _m(counts.total - emb),
                _m(counts.activated - emb),
                _m(counts.attention),
                f"{100 * emb / counts.total:.0f}%",
                f"{t}",
                f"{counts.flops / 1e9:.1f}G",
            ]
        )
    return _rows_table(
        ["proxy", "total", "activated", "total-emb", "act-emb", "attention", "emb+head share", "T", "FLOPs/seq"], rows
    )


NOTES = f"""\
How to read this:
- total counts every parameter once (the embedding and the LM head are untied, so both count);
  activated = total - routed experts + top_k/num_experts x routed experts (docs/paper.md §3.4).
- FLOPs/seq = training FLOPs (forward + backward) for one sequence of T tokens:
  6 x (activated - embedding) x T + 12 x layers x T^2 x (heads x head_dim)  (docs/paper.md §3.4).
- diff = (ours - printed) / printed. status: ok = |diff| <= {PARAM_TOLERANCE:.1%} for parameters,
  {FLOPS_TOLERANCE:.0%} for FLOPs; ok~ = outside that but inside the interval the printed digits admit
  (printed +- half a unit of its last digit: "2.0B" means [1.95B, 2.05B), i.e. +-2.5%, so 1.5% cannot
  be judged against it); FAIL = neither; exempt = docs/paper.md marks the printed value inconsistent.
- Exception: DeepSeekMoE 142B activated, printed 12.2B. docs/paper.md §3.3: inconsistent with the printed
  374.6T FLOPs, which imply ~13.6B under the accounting that reproduces every other FLOPs number
  (our 13.6B reproduces 374.6T to 0.1%); probably a typo in the paper.
- 2B: total 1.967B vs "2.0B" (-1.6%) and activated 0.316-0.317B vs "0.3B" (+5.5%) are what the printed
  2B trunk gives (attention 59M + embedding and head 21M + 16 x 9 x 8d^2 = 1.887B of experts); both lie
  inside the printed digits' intervals, and the 3-digit expert parameters the paper prints for the
  same models (Tab 2: 1.89B, 2.83B; Tab 9: 0.47B) are matched to 0.4%.
- UNVERIFIED sizes (docs/paper.md §3.1, §3.3): the 2B FFN width 3412 (~8d/3, SwiGLU) and the 145B expert
  width 1408 / dense first layer 10944; the 16B sizes are from its released config.json.
- Ablation rows compare against Tab 1's 2.0B / 0.3B because P §4.4 holds total and activated
  parameters fixed; no FLOPs are printed for them (nor for GShard x1.2 or Dense x4).
"""


def table_text(with_proxies: bool = True) -> tuple[str, bool]:
    reports = [paper_report(m) for m in PAPER_MODELS]
    text, ok = paper_table(reports)
    out = ["Paper models (gin/models/<model>.gin with gin/runs/<run>.gin for T):", text, "", NOTES]
    if with_proxies:
        out += [
            "Proxy models (gin/models/proxy/*.gin with runs/proxy_cpu.gin; not in the paper; the 8192-token",
            "vocabulary makes the embedding + LM head a large share at these widths):",
            proxy_table(),
            "",
        ]
    out.append(f"All printed values within tolerance (or the printed digits' interval): {'yes' if ok else 'NO'}")
    return "\n".join(out), ok


def single_text(name: str, counts: ParamCounts, seq_len: int, source: str, bindings: Sequence[str]) -> str:
    c = counts
    lines = [f"model: {name}", ""]
    rows = [
        ["total", f"{c.total:,}", _b(c.total)],
        ["activated", f"{c.activated:,}", _b(c.activated)],
        ["attention", f"{c.attention:,}", _b(c.attention)],
        ["expert (shared+routed)", f"{c.expert:,}", _b(c.expert)],
        ["activated expert", f"{c.activated_expert:,}", _b(c.activated_expert)],
    ]
    rows += [[f"  {k}", f"{v:,}", _b(v)] for k, v in c.by_category.items()]
    lines.append(_rows_table(["parameters", "count", ""], rows))
    lines += [
        "",
        f"training FLOPs per sequence (T={seq_len}, from {source}): {_t(c.flops)}"
        "  [6 x (activated - embedding) x T + 12 x layers x T^2 x heads x head_dim]",
    ]
    paper = paper_model(name)
    if paper is not None:
        lines += [
            "",
            f"paper ({paper.label}):"
            + ("  [gin bindings given: the comparison is with the paper's unmodified model]" if bindings else ""),
        ]
        for what, printed, ours, tol in (
            ("total", paper.total, c.total, PARAM_TOLERANCE),
            ("activated", paper.activated, c.activated, PARAM_TOLERANCE),
            ("FLOPs/seq", paper.flops, c.flops, FLOPS_TOLERANCE),
            ("expert", paper.expert, c.expert, PARAM_TOLERANCE),
            ("activated expert", paper.activated_expert, c.activated_expert, PARAM_TOLERANCE),
            ("attention", paper.attention, c.attention, PARAM_TOLERANCE),
        ):
            if printed is not None:
                ch = printed.check(ours, tol)
                lines.append(
                    f"  {what:<17} printed {printed.text:<7} ({printed.source}): "
                    f"{ch.rel * 100:+.2f}% {ch.status}"
                    + (f"  [{printed.inconsistent}]" if printed.inconsistent else "")
                )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-jax params",
        description=__doc__.split("\n\n")[0],
        epilog="Gin: --model=NAME, --gin_file=PATH (repeatable), --gin.KEY=VALUE.",
    )
    p.add_argument("--table", action="store_true", help="all paper models vs the paper's printed numbers")
    p.add_argument("--no_proxies", action="store_true", help="with --table: leave out the proxy models")
    p.add_argument("--list", action="store_true", help="list the model names")
    p.add_argument("--seq_len", type=int, default=None, help="T for FLOPs per sequence")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    gin_args = gin_utils.command_gin_args("moe-jax params", argv)
    if gin_args is None:
        return 2
    args = _parser().parse_args(list(gin_args.rest))
    if args.list:
        print("\n".join(gin_utils.list_models()))
        return 0
    if args.table:
        text, ok = table_text(with_proxies=not args.no_proxies)
        print(text)
        return 0 if ok else 1
    if not gin_args.gin_files:
        print(
            "moe-jax params: give --model=NAME or --gin_file=PATH (or --table / --list)\n"
            + gin_utils._models_message(),
            file=sys.stderr,
        )  # noqa: SLF001
        return 2
    model_files = [f for f in gin_args.gin_files if "models" in Path(f).parts]
    name = Path(model_files[-1]).stem if model_files else Path(gin_args.gin_files[0]).stem
    paper = paper_model(name)
    default_t = DEFAULT_SEQ_LEN if paper is None else run_seq_len(paper.run)
    try:
        counts, t, source = count_model(gin_args.gin_files, gin_args.bindings, args.seq_len, default_t)
    except gin_utils.GinConfigError as err:
        print(f"moe-jax params: {err}", file=sys.stderr)
        return 2
    if source == "default" and paper is not None:
        source = f"the paper's run, runs/{paper.run}.gin"
    if args.json:
        print(
            json.dumps(
                {
                    "model": name,
                    "seq_len": t,
                    "total": counts.total,
                    "activated": counts.activated,
                    "attention": counts.attention,
                    "expert": counts.expert,
                    "activated_expert": counts.activated_expert,
                    "flops_per_sequence": counts.flops,
                    "by_category": counts.by_category,
                },
                indent=2,
            )
        )
    else:
        print(single_text(name, counts, t, source, gin_args.bindings))
    return 0

"""The paper's claims against our stored results: one markdown table with a verdict per claim.

A claims file (`experiments/claims.py`) defines `CLAIMS = (Claim(...), ...)`. A claim is one or more
`Comparison`s inside one family: a member against a baseline with the seeds paired, or one member
against 0 (baseline None: a one-sample test, e.g. of a loss increase). The numbers are read from
`<results>/<family>/results.csv`, one row per run, as `moe-jax sweep --report` writes it.

Statistics of a comparison:
    member, baseline: mean ± sample std (ddof 1, `moe_jax.sweep.stats.describe`) over every seed each has;
    d_s = member_s - baseline_s over the n seeds both have: mean ± sample std of d.
Noise rule: d is beyond noise when a two-sided paired t-test at 5% rejects 0,
    |mean d| > t_{0.975, n-1} * std d / sqrt(n)        (t quantile: scipy.stats.t)
(std d = 0 with mean d != 0 is beyond noise). With n < 2 there is no test ("1 seed: no test").
A difference within noise also says how many paired seeds would put it beyond noise if its mean and std
held (`seeds_to_detect`): a scale of what settling it costs, not a power calculation (the std of a few
seeds is itself uncertain, and a test at exactly that n would pass about half the time).
Verdicts: expect "lower" (or "higher"): "reproduced" (beyond noise in the paper's direction), "within
noise", "reversed" (beyond noise the other way); expect "equal": "reproduced (within noise)" or
"differs" (higher / lower). A claim is "reproduced" when every comparison is; otherwise its verdict
names the comparisons by outcome (reversed, differs, within noise, 1 seed, not run yet, reproduced).
A claim that does not reproduce is reported as measured.

Derived metrics: `Metric(column, minus=other)` is column - other of the same run (e.g. the loss
increase when experts are disabled), taken before pairing; a comparison may read its baseline through
another metric than its member (Fig 5: DeepSeekMoE's `top_k=4` loss against GShard's plain loss).

    moe-jax claims experiments/claims.py [--results experiments/results] [--write experiments/README.md]

prints the table; `--write` replaces the block between `<!-- claims:begin -->` and `<!-- claims:end -->`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import textwrap
from pathlib import Path

from moe_jax.sweep.family import load_python_file
from moe_jax.sweep.stats import Stats, describe

EXPECTS = ("lower", "higher", "equal")
BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"
# Outcome kinds in the order a claim's verdict names them, with the word used there.
KINDS = {
    "reversed": "reversed",
    "differs": "differs",
    "within noise": "within noise",
    "no test": "1 seed: no test",
    "missing": "not run yet",
    "reproduced": "reproduced",
}


@dataclasses.dataclass(frozen=True)
class Metric:
    """A number per run: the results.csv column `column`, or `column - minus` of the same run."""

    column: str
    minus: str = ""

    @property
    def name(self) -> str:
        return f"{self.column} - {self.minus}" if self.minus else self.column

    def value(self, row: dict) -> float | None:
        a, b = row.get(self.column), row.get(self.minus) if self.minus else 0.0
        return None if a is None or b is None else a - b


def as_metric(metric: Metric | str) -> Metric:
    return metric if isinstance(metric, Metric) else Metric(metric)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A member against a baseline of one family, seeds paired (against 0 when baseline is None).

    Attributes:
      family: the family's name (its results: <results>/<family>/results.csv).
      member: the member whose metric the paper says is lower / higher / equal.
      baseline: the member it is compared with; None = a one-sample test of the member's metric.
      metric: the member's metric (a column name or a `Metric`).
      expect: the paper's sign of member - baseline: "lower", "higher" or "equal".
      text: the comparison's short name in the table, e.g. "Hash < Dense".
      paper: the paper's numbers, (member, baseline), or (value,) for a one-sample comparison.
      baseline_metric: the baseline's metric where it is not the member's (default: the same).
    """

    family: str
    member: str
    baseline: str | None
    metric: Metric | str
    expect: str
    text: str
    paper: tuple[float, ...] = ()
    baseline_metric: Metric | str | None = None

    def __post_init__(self):
        if self.expect not in EXPECTS:
            raise ValueError(f"comparison {self.text!r}: expect={self.expect!r}; use one of {EXPECTS}")
        if len(self.paper) not in (0, 1 if self.baseline is None else 2):
            raise ValueError(
                f"comparison {self.text!r}: paper={self.paper}; give (member, baseline), or (value,) without a baseline"
            )
        object.__setattr__(self, "metric", as_metric(self.metric))
        object.__setattr__(self, "baseline_metric", as_metric(self.baseline_metric or self.metric))


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim of the paper and the comparisons that test it.

    Attributes:
      number: its number in the table.
      text: the claim in a few words.
      source: where the paper makes it and in what units (e.g. "arXiv:2401.06066 Table 1, Pile loss").
      measure: what our numbers are (e.g. "held-out bits/byte").
      comparisons: all must reproduce for the claim to.
    """

    number: int
    text: str
    source: str
    measure: str
    comparisons: tuple[Comparison, ...]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A comparison as measured: member, baseline and paired-difference statistics (None where absent)."""

    comparison: Comparison
    member: Stats | None
    baseline: Stats | None
    diff: Stats | None
    kind: str
    verdict: str


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text or None


def read_results(path: Path) -> list[dict]:
    """The rows of a results.csv, numbers as floats, empty cells as None; [] when the file is absent."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def per_seed(rows: list[dict], member: str, metric: Metric) -> dict[int, float]:
    """seed -> the member's metric, over its runs that have it."""
    out: dict[int, float] = {}
    for row in rows:
        value = metric.value(row) if row.get("member") == member else None
        if value is None:
            continue
        seed = int(row["seed"])
        if seed in out:
            raise ValueError(f"member {member} has two runs with seed {seed}: keep one run per seed in results.csv")
        out[seed] = value
    return out


def beyond_noise(diff: Stats) -> bool:
    """The noise rule: a two-sided paired t-test at 5% rejects mean 0 (needs n >= 2)."""
    from scipy.stats import t

    return abs(diff.mean) > t.ppf(0.975, diff.n - 1) * diff.std / math.sqrt(diff.n)


def seeds_to_detect(diff: Stats, most: int = 999) -> int | None:
    """The smallest n >= 2 with |mean| > t_{0.975, n-1} * std / sqrt(n): the paired seeds at which `diff`
    would be beyond noise if its mean and std held; None when mean is 0 or n would exceed `most`.
    (mean 1, std 1: 7 seeds, since 2.447 / sqrt(7) = 0.925 < 1 <= 2.571 / sqrt(6) = 1.050.)"""
    for n in range(2, most + 1):
        if beyond_noise(Stats(n, diff.mean, diff.std)):
            return n
    return None


def judge(expect: str, diff: Stats) -> tuple[str, str]:
    """(kind, verdict text) of a paired difference member - baseline against the paper's `expect`."""
    if diff.n < 2:
        return "no test", f"{diff.n} seed: no test"
    beyond = beyond_noise(diff)
    if expect == "equal":
        side = "higher" if diff.mean > 0 else "lower"
        return ("differs", f"differs ({side})") if beyond else ("reproduced", "reproduced (within noise)")
    if not beyond:
        n = seeds_to_detect(diff)
        return "within noise", f"within noise ({f'{n} seeds' if n else 'over 999 seeds'} at this mean and std)"
    return ("reproduced", "reproduced") if (diff.mean < 0) == (expect == "lower") else ("reversed", "reversed")


def _absent(rows: list[dict], member: str, metric: Metric, values: dict) -> str:
    """Why a member has no values ("" when it has some)."""
    if values:
        return ""
    ran = any(r.get("member") == member for r in rows)
    return f"no {metric.name} for {member}" if ran else f"{member} not run yet"


def compare(c: Comparison, rows: list[dict]) -> Outcome:
    """Statistics and verdict of one comparison over its family's results rows."""
    sides = [(c.member, c.metric)] + ([(c.baseline, c.baseline_metric)] if c.baseline else [])
    values = [per_seed(rows, name, metric) for name, metric in sides]
    member, baseline = [describe(list(v.values())) for v in values] + [None] * (2 - len(values))
    absent = [why for (name, metric), v in zip(sides, values) if (why := _absent(rows, name, metric, v))]
    if absent:
        none_ran = len(absent) == len(sides) and all(why.endswith("not run yet") for why in absent)
        return Outcome(c, member, baseline, None, "missing", "not run yet" if none_ran else "; ".join(absent))
    seeds = sorted(set.intersection(*(set(v) for v in values)))
    if not seeds:
        return Outcome(c, member, baseline, None, "missing", "no seed in common")
    diff = describe([values[0][s] - (values[1][s] if c.baseline else 0.0) for s in seeds])
    return Outcome(c, member, baseline, diff, *judge(c.expect, diff))


def claim_verdict(outcomes: list[Outcome]) -> str:
    """One outcome for all comparisons -> its word ("reproduced" when all are); else the comparisons
    named by outcome, reversed first."""
    kinds = {o.kind for o in outcomes}
    if len(outcomes) == 1:
        return outcomes[0].verdict
    if len(kinds) == 1:
        return KINDS[kinds.pop()]
    return "; ".join(
        f"{word}: " + ", ".join(o.comparison.text for o in outcomes if o.kind == kind)
        for kind, word in KINDS.items()
        if kind in kinds
    )


def _stats(s: Stats | None, signed: bool = False) -> str:
    if s is None:
        return "-"
    mean = f"{s.mean:+.4f}" if signed else f"{s.mean:.4f}"
    return f"{mean} ± {s.std:.4f} ({s.n})" if s.n > 1 else f"{mean} ({s.n})"


def _paper(values: tuple[float, ...]) -> str:
    if len(values) == 2:
        return f"{values[0]:.3f} vs {values[1]:.3f} ({values[0] - values[1]:+.3f})"
    return f"{values[0]:+.3f}" if values else "-"


def comparison_row(o: Outcome) -> str:
    """One table row: the comparison, the paper's numbers, ours, the paired difference and the verdict."""
    c = o.comparison
    signed = bool(c.metric.minus)
    ours = _stats(o.member, signed) + (f" vs {_stats(o.baseline, signed)}" if c.baseline else "")
    if o.member is None and o.baseline is None:
        ours = "-"
    cells = [c.text, _paper(c.paper), ours, _stats(o.diff, signed=True), o.verdict]
    return "| | " + " | ".join(cells) + " |"


NOTE = (
    "**The paper's claims (arXiv:2401.06066) against our runs.** Ours: mean ± sample std over seeds "
    "(number of seeds), member vs baseline; difference: member - baseline per seed over the seeds both "
    "have, mean ± std (n). A difference is beyond noise when a two-sided paired t-test at 5% rejects 0 "
    "(`|mean| > t(0.975, n-1) · std / √n`); with one seed there is no test. Verdicts: *reproduced* (beyond "
    "noise in the paper's direction; for a claimed ≈, within noise), *within noise*, *reversed* (beyond "
    "noise the other way), *differs* (a claimed ≈ beyond noise); a difference within noise names the paired "
    "seeds at which it would be beyond noise if its mean and std held (a scale, not a power calculation). "
    "A claim that does not reproduce is reported as measured. Generated from "
    "`experiments/results/<family>/results.csv` by "
    "`moe-jax claims experiments/claims.py --write experiments/README.md` (a test checks that they agree)."
)
GENERATED = "<!-- generated by `moe-jax claims`: edit experiments/claims.py, not this block -->"
HEADER = "| claim | comparison | paper (arXiv:2401.06066) | ours | difference | verdict |\n|---|---|---|---|---|---|"


def load_results(claims: tuple[Claim, ...], results: Path) -> dict[str, list[dict]]:
    """family -> its results.csv rows under `results` ([] for a family not there)."""
    families = dict.fromkeys(c.family for claim in claims for c in claim.comparisons)
    return {f: read_results(results / f / "results.csv") for f in families}


def data_warnings(rows_by_family: dict[str, list[dict]]) -> list[str]:
    """One line per family whose runs trained on different data builds (their losses do not compare)."""
    out = []
    for family, rows in rows_by_family.items():
        builds = sorted({r["data"] for r in rows if r.get("data")})
        if len(builds) > 1:
            out.append(f"**Warning: {family} mixes data builds ({', '.join(builds)}); its verdicts do not hold.**")
    return out


def table(claims: tuple[Claim, ...], rows_by_family: dict[str, list[dict]]) -> str:
    """The claims table: per claim a row with its verdict, then a row per comparison."""
    lines = [HEADER]
    for claim in claims:
        outcomes = [compare(c, rows_by_family.get(c.family, [])) for c in claim.comparisons]
        verdict = claim_verdict(outcomes)
        lines.append(f"| **{claim.number}.** {claim.text} | | {claim.source} | {claim.measure} | | **{verdict}** |")
        lines += [comparison_row(o) for o in outcomes]
    return "\n".join(lines)


def block(claims: tuple[Claim, ...], results: Path) -> str:
    """The README block between the markers: the note on the rule, the table and any data warnings."""
    rows_by_family = load_results(claims, results)
    note = textwrap.fill(NOTE, width=104, break_long_words=False, break_on_hyphens=False)
    warnings = [line for w in data_warnings(rows_by_family) for line in ("", w)]
    return "\n".join((BEGIN, GENERATED, "", note, "", table(claims, rows_by_family), *warnings, "", END))


def replace_block(text: str, new_block: str) -> str:
    """`text` with the block between the markers (markers included) replaced by `new_block`."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {BEGIN} ... {END} block: add the two marker lines where the claims table goes")
    return text[:start] + new_block + text[end + len(END) :]


def load_claims(path: str | Path) -> tuple[Claim, ...]:
    """Import a claims file and return its `CLAIMS`."""
    path = Path(path)
    module = load_python_file(path, "claims", "the paper's claims: experiments/claims.py")
    claims = tuple(getattr(module, "CLAIMS", ()))
    if not claims or not all(isinstance(c, Claim) for c in claims):
        raise ValueError(f"{path} defines no `CLAIMS = (Claim(...), ...)`")
    return claims


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moe-jax claims", description="the paper's claims against stored results")
    p.add_argument("claims", help="claims file defining CLAIMS, e.g. experiments/claims.py")
    p.add_argument("--results", default="experiments/results", help="folder of <family>/results.csv")
    p.add_argument("--write", default=None, metavar="README", help="replace the claims block of this file")
    args = p.parse_args(argv)
    try:
        new_block = block(load_claims(args.claims), Path(args.results))
        print(new_block)
        if args.write:
            path = Path(args.write)
            path.write_text(replace_block(path.read_text(), new_block))
            print(f"wrote the claims block of {path}")
    except (FileNotFoundError, ValueError) as err:
        print(f"moe-jax claims: {err}")
        return 1
    return 0

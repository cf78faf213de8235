"""The claims table: paired statistics and verdicts against hand-computed values on small results.csv
files, and the block in experiments/README.md equal to what the committed results give."""

import csv
import math
from pathlib import Path

import pytest

from moe_jax.sweep import claims as cl
from moe_jax.sweep.claims import Claim, Comparison, Metric
from moe_jax.sweep.family import load_family

REPO = Path(__file__).resolve().parents[2]
T2 = 4.302652729911275  # t_{0.975, 2}: 3 paired seeds
NOISY_SEEDS = 4  # "noisy" below at 4 seeds: t_{0.975, 3} * 0.1 / sqrt(4) = 3.182 * 0.05 = 0.159 < 0.2
BASE = {0: 1.0, 1: 2.0, 2: 3.0}
# member -> per-seed shift from BASE (the paired differences member - base).
SHIFTS = {
    "better": (-0.2, -0.3, -0.4),  # mean -0.3, std 0.1: |-0.3| > T2 * 0.1 / sqrt(3) = 0.2484
    "noisy": (-0.1, -0.2, -0.3),  # mean -0.2, std 0.1: |-0.2| < 0.2484
    "worse": (0.2, 0.3, 0.4),
    "same": (0.01, -0.01, 0.0),  # mean 0, std 0.01
    "off": (0.05, 0.05, 0.05),  # mean 0.05, std 0
}


def write_results(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def row(member: str, seed: int, **metrics) -> dict:
    return {"run": f"{member}_s{seed}", "member": member, "label": member, "seed": seed, "model": "m", **metrics}


@pytest.fixture
def results(tmp_path) -> Path:
    rows = [row("base", s, bpb=v) for s, v in BASE.items()]
    rows += [row(m, s, bpb=BASE[s] + d) for m, shift in SHIFTS.items() for s, d in zip(BASE, shift)]
    rows += [row("single", 0, bpb=0.5), row("late", 3, bpb=9.0)]
    rows += [row("a", s, bpb=v) for s, v in zip(range(3), (1.0, 1.5, 2.0))]
    rows += [row("b", s, bpb=v) for s, v in zip(range(4), (1.2, 1.8, 2.4, 9.0))]
    xs, ys = (3.0, 4.0, 5.0), (1.0, 1.5, 2.0)
    rows += [row("d", s, x=x, y=y) for s, x, y in zip(range(3), xs, ys)] + [row("d", 3, x=7.0, y="")]
    write_results(tmp_path / "fam" / "results.csv", rows)
    return tmp_path


def outcome(results: Path, member: str, baseline: str | None = "base", expect="lower", metric="bpb", **kw):
    c = Comparison("fam", member, baseline, metric, expect, f"{member} vs {baseline}", **kw)
    return cl.compare(c, cl.read_results(results / "fam" / "results.csv"))


def test_paired_statistics_hand_computed(results):
    o = outcome(results, "a", "b")
    assert (o.member.n, o.member.mean, o.member.std) == (3, pytest.approx(1.5), pytest.approx(0.5))
    # the baseline's mean and std use all 4 of its seeds; the difference only the 3 both have
    assert (o.baseline.n, o.baseline.mean) == (4, pytest.approx(3.6))
    assert o.baseline.std == pytest.approx(math.sqrt((2.4**2 + 1.8**2 + 1.2**2 + 5.4**2) / 3))
    assert (o.diff.n, o.diff.mean, o.diff.std) == (3, pytest.approx(-0.3), pytest.approx(0.1))
    assert (o.kind, o.verdict) == ("reproduced", "reproduced")


@pytest.mark.parametrize(
    "member, expect, kind, verdict",
    [
        ("better", "lower", "reproduced", "reproduced"),
        ("better", "higher", "reversed", "reversed"),
        ("noisy", "lower", "within noise", f"within noise ({NOISY_SEEDS} seeds at this mean and std)"),
        ("worse", "lower", "reversed", "reversed"),
        ("worse", "higher", "reproduced", "reproduced"),
        ("same", "equal", "reproduced", "reproduced (within noise)"),
        ("better", "equal", "differs", "differs (lower)"),
        ("off", "equal", "differs", "differs (higher)"),  # std 0, mean != 0: beyond noise
        ("single", "lower", "no test", "1 seed: no test"),
    ],
)
def test_verdicts(results, member, expect, kind, verdict):
    o = outcome(results, member, expect=expect)
    assert (o.kind, o.verdict) == (kind, verdict)


def test_seeds_to_detect_hand_computed():
    # mean 1, std 1: t_{0.975,5} / sqrt(6) = 2.571 / 2.449 = 1.050 > 1, t_{0.975,6} / sqrt(7) = 2.447 / 2.646 = 0.925
    assert cl.seeds_to_detect(cl.Stats(2, 1.0, 1.0)) == 7
    assert cl.seeds_to_detect(cl.Stats(3, -1.0, 1.0)) == 7  # the sign does not matter
    # table1's DeepSeekMoE - GShard after two seeds, -0.0087 ± 0.0328: t_{0.975,57} * 0.0328 / sqrt(58) =
    # 2.0025 * 0.004307 = 0.008624 < 0.0087, t_{0.975,56} * 0.0328 / sqrt(57) = 2.0032 * 0.004344 = 0.008703
    n = cl.seeds_to_detect(cl.Stats(2, -0.0087, 0.0328))
    assert n == 58 and not cl.beyond_noise(cl.Stats(n - 1, -0.0087, 0.0328))
    assert cl.seeds_to_detect(cl.Stats(2, 0.0, 1.0)) is None
    assert cl.seeds_to_detect(cl.Stats(2, 0.001, 1.0), most=50) is None


def test_noise_rule_threshold():
    # |mean| against t_{0.975, n-1} * std / sqrt(n), just either side of it
    edge = T2 * 0.1 / math.sqrt(3)
    assert cl.beyond_noise(cl.Stats(3, edge * 1.001, 0.1))
    assert not cl.beyond_noise(cl.Stats(3, -edge * 0.999, 0.1))
    assert cl.beyond_noise(cl.Stats(2, -12.71 * 0.1 / math.sqrt(2), 0.1))  # t_{0.975, 1} = 12.706
    assert not cl.beyond_noise(cl.Stats(2, -12.70 * 0.1 / math.sqrt(2), 0.1))


def test_missing_members_and_families(results):
    assert outcome(results, "ghost").verdict == "ghost not run yet"
    assert outcome(results, "ghost", "phantom").verdict == "not run yet"
    assert outcome(results, "better", "nobody").verdict == "nobody not run yet"
    assert outcome(results, "d", metric="bpb").verdict == "no bpb for d"
    assert outcome(results, "late").verdict == "no seed in common"
    c = Comparison("never_run", "a", "b", "bpb", "lower", "a < b")
    assert cl.compare(c, cl.read_results(results / "never_run" / "results.csv")).verdict == "not run yet"


def test_derived_metric_one_sample_and_across_metrics(results):
    # x - y per run: (2.0, 2.5, 3.0); seed 3 has no y and drops out
    o = outcome(results, "d", None, expect="higher", metric=Metric("x", minus="y"))
    assert (o.diff.n, o.diff.mean, o.diff.std) == (3, pytest.approx(2.5), pytest.approx(0.5))
    assert o.verdict == "reproduced"  # 2.5 > T2 * 0.5 / sqrt(3) = 1.242
    # the member's x against the baseline's y, paired by seed: (2.0, 2.5, 3.0) again
    o = outcome(results, "d", "d", expect="equal", metric="x", baseline_metric="y")
    assert o.diff.mean == pytest.approx(2.5) and o.verdict == "differs (higher)"
    assert Metric("x", minus="y").name == "x - y" and Metric("x").value({"x": 1.0}) == 1.0


def test_claim_verdict_combines_comparisons(results):
    def verdict(*members):
        return cl.claim_verdict([outcome(results, m, expect="lower") for m in members])

    assert verdict("better", "better") == "reproduced"
    assert verdict("worse", "noisy", "better") == (
        "reversed: worse vs base; within noise: noisy vs base; reproduced: better vs base"
    )
    assert verdict("noisy", "better", "ghost") == (
        "within noise: noisy vs base; not run yet: ghost vs base; reproduced: better vs base"
    )
    assert verdict("noisy", "noisy") == "within noise"
    assert verdict("worse") == "reversed"


def test_the_tiny_table1_as_fixture():
    # two seeds of the superseded tiny proxy: DeepSeekMoE - GShard in held-out nats/token
    d = [5.695347353233243 - 5.818704287272114, 5.602011327150101 - 5.7384188334519095]
    c = Comparison("table1", "deepseekmoe", "gshard", "heldout_loss", "lower", "DeepSeekMoE < GShard")
    o = cl.compare(c, cl.read_results(REPO / "experiments/results/tiny/table1/results.csv"))
    assert o.diff.mean == pytest.approx(sum(d) / 2) and o.diff.std == pytest.approx(abs(d[0] - d[1]) / math.sqrt(2))
    assert o.verdict == "reproduced"  # 0.1299 > 12.706 * 0.00923 / sqrt(2) = 0.0829
    c = Comparison("table1", "hash", "dense", "heldout_loss", "lower", "Hash < Dense")
    o = cl.compare(c, cl.read_results(REPO / "experiments/results/tiny/table1/results.csv"))
    assert o.kind == "within noise"  # +0.0201 ± 0.0131 (2)
    assert o.verdict == "within noise (5 seeds at this mean and std)"  # 2.776 * 0.0131 / sqrt(5) = 0.0163 < 0.0201


def test_table_rows_and_bad_input(results, tmp_path):
    claim = Claim(
        1,
        "a claim",
        "Table 9",
        "bits",
        (
            Comparison("fam", "better", "base", "bpb", "lower", "better < base", paper=(1.5, 2.0)),
            Comparison("fam", "ghost", "base", "bpb", "lower", "ghost < base"),
        ),
    )
    text = cl.table((claim,), cl.load_results((claim,), results))
    assert "**not run yet: ghost < base; reproduced: better < base**" in text
    assert "| | better < base | 1.500 vs 2.000 (-0.500) | 1.7000 ± 0.9000 (3) vs 2.0000 ± 1.0000 (3) | " in text
    assert "-0.3000 ± 0.1000 (3) | reproduced |" in text
    mixed = {"fam": [row("a", 0, data="aaaa/1111"), row("a", 1, data="bbbb/1111")]}
    assert cl.data_warnings(mixed) == [
        "**Warning: fam mixes data builds (aaaa/1111, bbbb/1111); its verdicts do not hold.**"
    ]
    with pytest.raises(ValueError, match="expect="):
        Comparison("fam", "a", "b", "bpb", "less", "a < b")
    with pytest.raises(ValueError, match="give \\(member, baseline\\)"):
        Comparison("fam", "a", "b", "bpb", "lower", "a < b", paper=(1.0,))
    write_results(tmp_path / "dup" / "results.csv", [row("a", 0, bpb=1.0), row("a", 0, bpb=2.0)])
    with pytest.raises(ValueError, match="two runs with seed 0"):
        cl.compare(Comparison("dup", "a", None, "bpb", "lower", "a"), cl.read_results(tmp_path / "dup/results.csv"))
    with pytest.raises(ValueError, match="add the two marker lines"):
        cl.replace_block("# title\n", "block")


def test_write_replaces_only_the_block(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n{cl.BEGIN}\nold\n{cl.END}\n\n## rest\n")
    assert cl.main([str(REPO / "experiments/claims.py"), "--results", str(results), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n<!-- claims:begin -->") and text.endswith(
        "<!-- claims:end -->\n\n## rest\n"
    )
    assert "old" not in text and "| **7.** " in text
    assert cl.main([str(tmp_path / "none.py")]) == 1
    assert cl.main([str(REPO / "experiments/claims.py"), "--write", str(tmp_path / "none.py")]) == 1


def test_claims_name_members_of_their_families():
    for claim in cl.load_claims(REPO / "experiments/claims.py"):
        for c in claim.comparisons:
            names = {m.name for m in load_family(REPO / "experiments" / f"{c.family}.py").members}
            assert {c.member, c.baseline or c.member} <= names, (claim.number, c.text)


def test_readme_block_matches_the_committed_results():
    """experiments/README.md's claims block is exactly what experiments/results/ gives: rerun
    `moe-jax claims experiments/claims.py --write experiments/README.md` after copying new results."""
    text = (REPO / "experiments/README.md").read_text()
    start, end = text.index(cl.BEGIN), text.index(cl.END) + len(cl.END)
    claims = cl.load_claims(REPO / "experiments/claims.py")
    assert [c.number for c in claims] == list(range(1, 8))
    assert text[start:end] == cl.block(claims, REPO / "experiments/results")

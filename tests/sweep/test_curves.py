"""Paired differences and crossover detection of the sweep report (hand-computed goldens)."""

import math

import numpy as np
import pytest

from moe_jax.sweep import curves as C
from moe_jax.sweep.claims import read_results
from moe_jax.sweep.family import Family, Member


def test_paired_uses_common_seeds_and_points():
    cur = {
        "moe": {0: {10: 3.0, 20: 2.0, 40: 1.0}, 1: {10: 3.2, 20: 2.1, 40: 1.1}, 2: {10: 9.0}},
        "dense": {0: {10: 2.5, 20: 2.2, 40: 1.5}, 1: {10: 2.6, 20: 2.3, 40: 1.4}},
    }
    tokens, diffs = C.paired(cur, "moe", "dense")
    assert tokens.tolist() == [10, 20, 40]
    np.testing.assert_allclose(diffs, [[0.5, -0.2, -0.5], [0.6, -0.2, -0.3]])


def test_crossover_first_point_that_stays_below():
    tokens = np.array([1e5, 1e6, 2e6, 4e6, 8e6])
    diffs = np.array([[0.3, -0.1, 0.05, -0.1, -0.2], [0.3, -0.1, 0.05, -0.12, -0.22]])
    c = C.crossover(tokens, diffs)
    assert c["tokens"] == 4e6  # 1e6 dips below, but 2e6 is above again
    assert c["final"] == pytest.approx(-0.21) and c["final_std"] == pytest.approx(np.std([-0.2, -0.22], ddof=1))


def test_crossover_trend_when_not_reached():
    tokens = np.array([1e6, 1e7, 1e8, 1e9])
    diffs = np.array([[0.4, 0.3, 0.2, 0.1]])  # falls 0.1 per decade: reaches 0 at 1e10
    c = C.crossover(tokens, diffs)
    assert c["tokens"] is None and c["final_std"] == 0.0
    assert math.isclose(c["trend_tokens"], 1e10, rel_tol=1e-6)
    assert C.crossover(tokens, -diffs[:, ::-1] * 0 + 0.1)["trend_tokens"] is None  # flat: no prediction
    assert C.crossover(tokens, diffs - 0.25)["trend_tokens"] is None  # crossed at ~3.2e7, before the last point
    assert C._trend_text(1e10, 1e9) == "10B" and C._trend_text(3.51e7, 1e7) == "35.1M"
    assert C._trend_text(2e12, 1e9) == "beyond 1000x the budget"
    assert C._trend_text(None, 1e9) == "-"


def test_paired_table_golden():
    fam = Family("f", members=(Member("a", "x"), Member("b", "y")), pairs=(("a", "b"),))
    rows = [
        {"member": "a", "seed": 0, "m": 1.0},
        {"member": "a", "seed": 1, "m": 2.0},
        {"member": "b", "seed": 0, "m": 1.5},
        {"member": "b", "seed": 1, "m": 1.0},
        {"member": "b", "seed": 2, "m": 0.0},
    ]
    table = C.paired_table(rows, fam, "m")
    assert f"| a - b | 2 | +0.2500 ± {np.std([-0.5, 1.0], ddof=1):.4f} | -0.5000, +1.0000 |" in table


def test_family_rejects_unknown_pair_members():
    with pytest.raises(ValueError, match="not members"):
        Family("f", members=(Member("a", "x"),), pairs=(("a", "zz"),))


def test_training_time_sums_the_windows_and_keeps_the_last_row_of_a_redone_step():
    """100 tokens per step; windows of 10 steps: 1 s (1000 tok/s), 2 s (500), then step 30 logged at 250 tok/s
    before an interruption and again at 100 tok/s after resuming from step 20 (only the redone row
    counts: 10 s), then 0.5 s (2000): 13.5 s for 40 steps. Held-out rows (no throughput) are skipped."""
    records = [
        {"step": 10, "tokens_per_second": 1000.0},
        {"step": 20, "tokens_per_second": 500.0},
        {"step": 20, "heldout/loss": 3.0},
        {"step": 30, "tokens_per_second": 250.0},
        {"step": 30, "tokens_per_second": 100.0},  # resumed from the checkpoint at step 20
        {"step": 40, "tokens_per_second": 2000.0},
        {"step": 40, "tokens_per_second": 0.0},  # no throughput: skipped
    ]
    out = C.training_time(records, tokens_per_step=100)
    assert out["train_hours"] == pytest.approx(13.5 / 3600)
    assert out["mean_tokens_per_second"] == pytest.approx(40 * 100 / 13.5)
    assert out["median_tokens_per_second"] == pytest.approx(750.0)  # of 1000, 500, 100, 2000
    assert C.training_time([{"step": 10, "heldout/loss": 3.0}], 100) == {}


def _metrics(workdir, records):
    import json

    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_diagnostics_table_averages_the_last_window_then_the_seeds(tmp_path):
    fam = Family("f", members=(Member("moe", "x"), Member("dense", "y")))
    # seed 0: load CV 0.9 early, then 0.2 and 0.4 over the last two logged steps; seed 1: 0.5 and 0.7.
    _metrics(tmp_path / "moe_s0", [{"step": s, "moe/mean_load_cv": v} for s, v in ((1, 0.9), (2, 0.2), (3, 0.4))])
    _metrics(tmp_path / "moe_s1", [{"step": 1, "moe/mean_load_cv": 0.5}, {"step": 2, "moe/mean_load_cv": 0.7}])
    _metrics(tmp_path / "dense_s0", [{"step": 1, "loss": 3.0}])
    rows = [{"run": f"{m}_s{s}", "member": m, "seed": s} for m, s in (("moe", 0), ("moe", 1), ("dense", 0))]
    final = C.final_diagnostics(tmp_path, rows, window=2)
    assert final == {"moe": {"moe/mean_load_cv": [pytest.approx(0.3), pytest.approx(0.6)]}}  # dense logs none
    table = C.diagnostics_table(tmp_path, rows, fam, window=2)
    cv = C.FINAL_DIAGNOSTICS.index(("moe/mean_load_cv", "expert-load spread (CV)"))
    cells = table.splitlines()[2].strip("| ").split(" | ")
    assert cells[:2] == ["moe", "2"] and cells[2 + cv] == f"0.450 ± {np.std([0.3, 0.6], ddof=1):.3f}"
    assert cells[2] == "-" and len(table.splitlines()) == 3  # a key no run logs; no row for dense
    assert C.diagnostics_table(tmp_path, rows[2:], fam) == ""  # a family of dense models: no table


def test_diagnostics_table_shows_a_sometimes_column_only_where_a_run_has_it_above_zero(tmp_path):
    fam = Family("f", members=(Member("softmax", "x"), Member("expert_choice", "x")))
    unrouted = "moe/mean_unrouted_fraction"
    _metrics(tmp_path / "softmax_s0", [{"step": 1, "moe/mean_load_cv": 0.3, unrouted: 0.0}])
    rows = [{"run": "softmax_s0", "member": "softmax", "seed": 0}]
    assert "tokens with no routed expert" not in C.diagnostics_table(tmp_path, rows, fam)  # 0 everywhere
    _metrics(tmp_path / "expert_choice_s0", [{"step": 1, "moe/mean_load_cv": 0.0, unrouted: 0.25}])
    rows.append({"run": "expert_choice_s0", "member": "expert_choice", "seed": 0})
    header, _, softmax, expert_choice = C.diagnostics_table(tmp_path, rows, fam).splitlines()
    assert header.strip("| ").split(" | ")[-1] == "tokens with no routed expert"  # bias range: no run logs it
    assert softmax.endswith("| 0.000 |") and expert_choice.endswith("| 0.250 |")


def test_run_curves_reads_results_csv_rows_as_written_or_as_read_back(tmp_path, monkeypatch):
    """The final held-out row (step 30, the run's last step) is left out of the curve; tokens = step x 100.
    Rows read back from a results.csv (step stored as "30.0") go through the project's reader."""
    monkeypatch.setattr(C, "tokens_per_step", lambda workdir: 100)
    _metrics(tmp_path / "moe_s1", [{"step": s, C.HELDOUT: v} for s, v in ((10, 3.0), (20, 2.5), (30, 2.0))])
    want = {"moe": {1: {1000: 3.0, 2000: 2.5}}}
    assert C.run_curves(tmp_path, [{"run": "moe_s1", "member": "moe", "seed": 1, "step": 30}]) == want
    (tmp_path / "results.csv").write_text("run,member,seed,step\nmoe_s1,moe,1,30.0\n")
    assert C.run_curves(tmp_path, read_results(tmp_path / "results.csv")) == want

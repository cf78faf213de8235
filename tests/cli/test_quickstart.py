"""`moe-jax quickstart` (the README's main job) on the test corpus: every model is configured before any
trains, each trains and is evaluated, and the printed table and quickstart.json agree with the runs'
result.json."""

import json
import math

import pytest
from helpers import TRAIN_SEQ, TRAIN_VOCAB

from moe_jax.quickstart import main


def _flags(cache) -> list[str]:
    """The base recipe on the test cache: its vocabulary and sequence length, 2 steps."""
    bindings = (f"VOCAB_SIZE={TRAIN_VOCAB}", f"SEQ_LEN={TRAIN_SEQ}", f"TrainConfig.data_cache='{cache}'")
    return ["--steps", "2", *(f for b in bindings for f in ("--gin", b))]


def test_a_bad_model_name_is_refused_before_anything_trains(tmp_path, train_cache, capsys):
    rc = main(["--workdir", str(tmp_path / "qs"), "--models", "dense_base", "no_such_model", *_flags(train_cache)])
    assert rc == 1
    assert "'no_such_model' is not a model" in capsys.readouterr().out
    assert not (tmp_path / "qs").exists()  # dense_base, listed first, did not train


@pytest.mark.slow
def test_quickstart_trains_each_model_and_reports_bits_per_byte(tmp_path, train_cache, capsys):
    workdir = tmp_path / "qs"
    assert main(["--workdir", str(workdir), "--models", "deepseekmoe_base", "dense_base", *_flags(train_cache)]) == 0
    out = capsys.readouterr().out
    report = json.loads((workdir / "quickstart.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["deepseekmoe_base", "dense_base"]
    for row in report["rows"]:
        result = json.loads((workdir / row["model"] / "result.json").read_text())
        assert row["steps"] == 2 and row["heldout_bits_per_byte"] == result["heldout_bits_per_byte"]
        assert row["heldout_loss"] == result["heldout_loss"] and math.isfinite(row["heldout_bits_per_byte"])
        gin_text = (workdir / row["model"] / "config.gin").read_text()
        assert "\nTRAIN_STEPS = 2\n" in gin_text and "\nWARMUP_STEPS = 1\n" in gin_text  # 8% of 2, at least 1
        line = next(l for l in out.splitlines() if l.startswith(row["model"]))
        assert f"{row['heldout_bits_per_byte']:.4f}" in line and f"{row['heldout_loss']:.4f}" in line
    unigram = next(l for l in out.splitlines() if l.startswith("unigram baseline"))
    assert f"{report['unigram']['heldout_bits_per_byte']:.4f}" in unigram
    assert "best held-out bits/byte:" in out and "  dense_base           (no MoE layers)" in out

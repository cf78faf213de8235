"""benchmarks/gpu_check.py on CPU: argument handling, budgets, the constraints check, and the dry run's
tiny path through every section except the pytest child (which `--dry_run` itself runs)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

TINY = ["--dry_run", "--tokens", "128", "--d", "32", "--repeats", "1", "--steps", "1", "--batch", "1", "--seq", "16"]


def test_arguments_full_run_and_dry_run_defaults():
    full = gpu_check.parse_args([])
    assert (full.tokens, full.d, full.budget_s) == (32768, 1280, 450)
    assert (full.batch, full.seq, full.train_gmm) == (16, 2048, "auto")
    assert full.budget_s < 8 * 60 and full.sections == list(gpu_check.SECTION_SHARE)
    dry = gpu_check.parse_args(["--dry_run"])
    assert (dry.tokens, dry.d, dry.batch, dry.seq, dry.train_gmm) == (512, 64, 2, 64, gpu_check.EMULATED)
    assert gpu_check.parse_args(["--dry_run", "--tokens", "256"]).tokens == 256
    assert abs(sum(gpu_check.SECTION_SHARE.values()) - 1.0) < 1e-9
    for bad in (["--tokens", "0"], ["--seq", "1"], ["--sections", "nope"], ["--budget_s", "0"], ["--layers", "moe"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_budget_sections_share_the_total():
    b = gpu_check.Budget(100.0)
    b.start("layers")
    assert 41.0 < b.left() <= 42.0 and b.fits(10.0) and not b.fits(45.0)
    b.start("layers", ["layers", "train"])  # earlier sections' unused time is shared out
    assert 58.0 < b.left() <= 58.34 and not b.fits(59.0)


def test_constraints_diff_names_mismatches(tmp_path):
    import numpy

    f = tmp_path / "constraints.txt"
    f.write_text(f"# tested\nnumpy=={numpy.__version__}\njax==0.0.1  # old\nno-such-package==1.0\n")
    diffs = gpu_check.constraints_diff(f)
    assert len(diffs) == 1 and diffs[0].startswith("jax ") and "(pinned 0.0.1)" in diffs[0]
    assert gpu_check.constraints_diff(tmp_path / "missing.txt") is None


@pytest.mark.slow
def test_dry_run_tiny_path_prints_every_table(capsys):
    # A generous budget: this checks the tables, not the budget (other tests do), on a loaded machine.
    gpu_check.main(
        TINY + ["--sections", "versions", "peak", "layers", "train", "--layers", "switch", "--budget_s", "100000"]
    )
    out = capsys.readouterr().out
    assert "platform cpu" in out and "jax 0.10.2" in out and "bfloat16 matmul peak" in out
    for backend in ("chunked", gpu_check.EMULATED):
        table = out.split(f"#### gmm backend `{backend}`")[1]
        assert "| switch | 32 | 128 |" in table.split("####")[0]
    assert "| deepseekmoe_2b |" in out and "| dense_2b |" in out and "failed" not in out
    assert "gpu_check:" in out.splitlines()[-1]


def test_section_out_of_budget_skips_with_a_message(monkeypatch, capsys):
    monkeypatch.setitem(gpu_check.SECTION_SHARE, "layers", 0.0)
    gpu_check.main(TINY + ["--sections", "layers", "--layers", "switch", "hash", "--backends", "chunked"])
    out = capsys.readouterr().out
    assert "skipped switch with `chunked`" in out and "skipped hash with `chunked`" in out and "(no rows)" in out


def test_overall_deadline_stops_and_still_reports(capsys):
    import benchmarks.moe_layer  # noqa: F401  (imported before the 1 s budget starts)

    gpu_check.main(
        TINY + ["--sections", "layers", "--layers", "deepseekmoe", "--backends", "chunked", "--budget_s", "1"]
    )
    out = capsys.readouterr().out
    assert "stopped at the overall budget" in out and "not finished: layers" in out
    assert "#### gmm backend `chunked`" in out and "gpu_check:" in out

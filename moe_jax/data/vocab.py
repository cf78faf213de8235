"""SentencePiece BPE vocabulary trained on a corpus's training split.

Settings (chosen so that tokenisation is lossless and bits-per-byte is exact):
  model_type=bpe, byte_fallback=True (no <unk> ever), normalization_rule_name=identity,
  remove_extra_whitespaces=False, add_dummy_prefix=False (decode(encode(x)) == x for any UTF-8 text
  without U+2581), split_digits=True, allow_whitespace_only_pieces=True (indentation),
  ids: pad=0 (seqio's padding id), eos=1, unk=2, no bos (seqio's decoder uses 0 as BOS input).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterator

from moe_jax.data.errors import DataError, VocabMismatchError

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
VOCAB_VERSION = 1
MAX_PIECE_CHARS = 2000


def file_sha256(path: Path, bufsize: int = 1 << 22) -> str:
    """SHA-256 of a file, read in chunks (vocabularies, corpus splits, checkpoint files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _sentences(corpus_dir: Path, manifest: dict) -> Iterator[str]:
    from moe_jax.data.corpus import iter_docs

    for name in manifest["sources"]:
        for doc in iter_docs(corpus_dir, name, "train"):
            for line in doc.split("\n"):
                if not line.strip():
                    continue
                while len(line) > MAX_PIECE_CHARS:  # cut very long lines at a space
                    cut = line.rfind(" ", 0, MAX_PIECE_CHARS)
                    cut = cut if cut > 0 else MAX_PIECE_CHARS
                    yield line[:cut]
                    line = line[cut:]
                if line.strip():
                    yield line


def trainer_settings(vocab_size: int, input_sentence_size: int, threads: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=4 * MAX_PIECE_CHARS + 16,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=1000000,
        num_threads=threads,
        minloglevel=2,
    )


def stamp_path(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".json")


def train_vocab(
    corpus_dir: Path,
    model_path: Path,
    vocab_size: int = 8192,
    *,
    input_sentence_size: int = 3_000_000,
    threads: int = 2,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Train (or reuse) `model_path`; returns the stamp (settings, corpus fingerprint, sha256)."""
    import sentencepiece as spm

    from moe_jax.data.corpus import load_manifest

    corpus_dir, model_path = Path(corpus_dir), Path(model_path)
    manifest = load_manifest(corpus_dir)
    settings = trainer_settings(vocab_size, input_sentence_size, threads)
    want = {
        "version": VOCAB_VERSION,
        "corpus_fingerprint": manifest["fingerprint"],
        "settings": {k: v for k, v in settings.items() if k not in ("num_threads", "minloglevel")},
    }
    sp_ = stamp_path(model_path)
    if not force and model_path.exists() and sp_.exists():
        stamp = json.loads(sp_.read_text())
        if {k: stamp.get(k) for k in want} == want and stamp.get("sha256") == file_sha256(model_path):
            if progress:
                print(f"vocab: up to date at {model_path}", file=sys.stderr)
            return stamp
    model_path.parent.mkdir(parents=True, exist_ok=True)
    t = time.time()
    if progress:
        print(f"vocab: training SentencePiece BPE {vocab_size} on {corpus_dir} ...", file=sys.stderr)
    tmp_prefix = str(model_path.with_suffix("")) + ".tmp"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(corpus_dir, manifest), model_prefix=tmp_prefix, **settings
        )
    except RuntimeError as e:
        too_big = re.search(r"Please set it to a value <= (\d+)", str(e))
        too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        hint = (
            f": this corpus allows at most {too_big.group(1)}, pass a smaller --vocab_size"
            if too_big
            else f": this corpus needs at least {too_small.group(1)}, pass a larger --vocab_size"
            if too_small
            else ""
        )
        raise DataError(f"SentencePiece training failed: {e}{hint}") from None
    os.replace(tmp_prefix + ".model", model_path)
    os.replace(tmp_prefix + ".vocab", model_path.with_suffix(".vocab"))
    stamp = dict(
        want,
        vocab_size=vocab_size,
        sha256=file_sha256(model_path),
        train_seconds=round(time.time() - t, 1),
        corpus_dir=str(corpus_dir),
    )
    sp_.write_text(json.dumps(stamp, indent=1) + "\n")
    if progress:
        print(f"vocab: {model_path} ({vocab_size} pieces) in {time.time() - t:.1f} s", file=sys.stderr)
    return stamp


def load(model_path: Path):
    import sentencepiece as spm

    model_path = Path(model_path)
    if not model_path.exists():
        raise VocabMismatchError(f"no vocabulary at {model_path}: run `moe-jax data build`")
    return spm.SentencePieceProcessor(model_file=str(model_path))


def token_byte_lengths(sp) -> list[int]:
    """UTF-8 bytes each id decodes to (control/unknown 0, byte pieces 1, `▁` counts as one space)."""
    out = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            out.append(0)
        elif sp.is_byte(i):
            out.append(1)
        else:
            out.append(len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")))
    return out

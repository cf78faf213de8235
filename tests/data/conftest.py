"""Fixtures for the data-pipeline tests: tiny text corpora built in temporary directories (no network,
no real corpus). A whole corpus + vocabulary + token cache builds in about a second."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
    "in old towns near rivers and hills during winter summer autumn spring 2024 1999 42 café naïve "
    "déjà vu — “quoted” text, with commas; colons: and periods. Why? Because!"
).split()

SEQ_LEN = 64
VOCAB_SIZE = 320


def make_text(rng: random.Random, n_words: int) -> str:
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(5, 14):
            lines.append(" ".join(line))
            line = []
    if line:
        lines.append(" ".join(line))
    return "\n".join(lines)


def write_fixture_files(folder: Path, seed: int = 0, n_files: int = 2, docs_per_file: int = 24) -> Path:
    """Text files whose documents are separated by blank lines; lengths from 2 to ~800 words, so some
    documents are many sequences long and some are tiny."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        docs = [make_text(rng, rng.choice([2, 8, 30, 120, 300, 800])) for _ in range(docs_per_file)]
        (folder / f"part{f}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def fixture_texts(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("texts")
    return {"alpha": write_fixture_files(base / "alpha", seed=1), "beta": write_fixture_files(base / "beta", seed=2)}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, fixture_texts) -> dict:
    """A built two-source corpus, its vocabulary and a seq-64 token cache."""
    from moe_jax.data.cache import build_cache
    from moe_jax.data.corpus import build_text_corpus
    from moe_jax.data.vocab import train_vocab

    root = tmp_path_factory.mktemp("data")
    corpus = root / "corpus_tiny"
    specs = [f"alpha={fixture_texts['alpha']}/*.txt", f"beta={fixture_texts['beta']}/*.txt"]
    manifest = build_text_corpus(corpus, specs, heldout_frac=0.1, heldout_min_bytes=0, progress=False)
    vocab = root / "vocab" / "tiny_spm.model"
    train_vocab(corpus, vocab, VOCAB_SIZE, progress=False)
    cache = root / "cache" / f"tiny_v{VOCAB_SIZE}_s{SEQ_LEN}"
    meta = build_cache(corpus, vocab, cache, SEQ_LEN, progress=False)
    return {
        "root": root,
        "corpus": corpus,
        "vocab": vocab,
        "cache": cache,
        "manifest": manifest,
        "meta": meta,
        "specs": specs,
    }

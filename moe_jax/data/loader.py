"""The training/evaluation data loader: reads the packed token cache, no TensorFlow or seqio.

    from moe_jax.data.loader import TokenLoader
    loader = TokenLoader(cache_dir, split="train", batch_size=GLOBAL_B, seq_len=S, seed=0,
                         process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(loader)       # dict of int32 [GLOBAL_B // process_count, S] arrays (seqio decoder names)
    state = loader.get_state() # small JSON-serialisable dict
    loader.set_state(state)    # the following batches are exactly those that would have followed

Order: the unit of sampling is one packed row (or one `seq_len` window of a row when `seq_len` is a
divisor of the cache's length). Epoch `e` visits the units in the permutation drawn from
`numpy.random.default_rng([seed, e])` (or, with `rates`, a deterministic draw per source, see
`_epoch_units`). Global batch `b` of an epoch is units `[b*B, (b+1)*B)`; process `p` of `P` gets the
`p`-th contiguous `B/P` of them, so processes read disjoint rows that together make the global batch.
Training (`repeat=True`) runs forever and drops the last incomplete batch of an epoch; evaluation
(`repeat=False`) stops after one pass and pads its last batch with all-zero rows (loss weight 0), so every
held-out token is seen exactly once.

Only numpy, json and tensorstore are imported (a test checks that neither tensorflow nor seqio is loaded).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import numpy as np

from moe_jax.data.errors import DataError, SeqLenError, VocabMismatchError
from moe_jax.data.packing import FEATURES, model_features

__all__ = ["TokenLoader", "FEATURES"]


def _load_meta(cache_dir: Path) -> dict:
    # local copy of cache.load_meta: cache.py imports the writer side, keep this module minimal
    from moe_jax.data.cache import load_meta

    return load_meta(cache_dir)


class TokenLoader:
    """Deterministic, checkpointable, host-sharded batches from a token cache (see module docstring).

    Args:
      cache_dir: a directory written by `moe-jax data build` (`paths.cache_dir()` gives the default).
      split: "train" or "heldout".
      batch_size: the GLOBAL batch size; each process yields `batch_size // process_count` rows.
      seq_len: row length; `None` = the cache's. A divisor of the cache's length cuts every row into
        windows (segments cut at a window edge restart at position 0). Longer is an error.
      seed: order seed. process_index/process_count: this host's slice.
      repeat: loop over epochs forever (default True for train, False otherwise).
      shuffle: permute units each epoch (default True for train, False otherwise).
      source: only this corpus source (e.g. "shakespeare"), e.g. for per-source held-out loss.
      rates: optional {source: weight} mixture for an epoch (default: every unit once per epoch).
      vocab: optional path of the vocabulary the model uses; it must be the cache's (checked by sha256).
      prefetch: number of batches read ahead asynchronously (tensorstore futures; 8 hides the read latency).
    """

    def __init__(
        self,
        cache_dir,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int | None = None,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        *,
        repeat: bool | None = None,
        shuffle: bool | None = None,
        source: str | None = None,
        rates: Mapping[str, float] | None = None,
        vocab: str | Path | None = None,
        prefetch: int = 8,
    ):
        self.cache_dir = Path(cache_dir)
        self._meta = _load_meta(self.cache_dir)
        if split not in self._meta["splits"]:
            raise DataError(f"token cache {self.cache_dir} has splits {sorted(self._meta['splits'])}, not {split!r}")
        self.split = split
        self._check_vocab(vocab)
        self._set_seq_len(seq_len)
        if batch_size <= 0 or process_count <= 0 or not 0 <= process_index < process_count:
            raise DataError(
                f"bad batch/process settings: batch_size={batch_size}, "
                f"process_index={process_index}, process_count={process_count}"
            )
        if batch_size % process_count:
            raise DataError(f"global batch_size {batch_size} is not divisible by process_count {process_count}")
        self.batch_size, self.local_batch_size = batch_size, batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.seed = int(seed)
        self.repeat = (split == "train") if repeat is None else bool(repeat)
        self.shuffle = (split == "train") if shuffle is None else bool(shuffle)
        self._select_sources(split, source, rates)
        self._units_all = np.concatenate(
            [np.arange(a * self._k, b * self._k, dtype=np.int64) for a, b in self._ranges.values()]
            or [np.zeros(0, np.int64)]
        )
        self.num_units = int(self._units_all.size)
        if self.num_units == 0:
            where = f"source {source!r} of " if source else ""
            raise DataError(
                f"{where}split {split!r} of {self.cache_dir} is empty: nothing to load "
                f"(rebuild with a larger held-out fraction, or pick another source)"
            )
        if self.repeat and self.num_units < self.batch_size:
            raise DataError(
                f"split {split!r} has {self.num_units} rows of {self.seq_len}, fewer than one global "
                f"batch of {batch_size}: use a smaller batch or more data"
            )
        import tensorstore  # noqa: F401  (fail early with a clear ImportError)

        from moe_jax.data.store import open_array

        self._tokens = open_array(self.cache_dir / split / "tokens")
        self._segs = open_array(self.cache_dir / split / "segment_ids")
        self._byte_table = None
        self._prefetch = max(0, int(prefetch))
        self._pending: OrderedDict[tuple[int, int], tuple] = OrderedDict()
        self._epoch_cache: tuple[int, np.ndarray] | None = None
        self.epoch, self.step = 0, 0

    def _set_seq_len(self, seq_len: int | None) -> None:
        """Check `seq_len` against the cache's (a divisor of it; None = the cache's) and set it."""
        cache_len = int(self._meta["seq_len"])
        seq_len = cache_len if seq_len is None else int(seq_len)
        if seq_len > cache_len:
            raise SeqLenError(
                f"seq_len {seq_len} is longer than the token cache's sequence length {cache_len} "
                f"({self.cache_dir}): rebuild the cache with `moe-jax data build --seq_len {seq_len}` "
                f"or train with seq_len <= {cache_len}"
            )
        if seq_len <= 0 or cache_len % seq_len:
            raise SeqLenError(
                f"seq_len {seq_len} does not divide the token cache's sequence length {cache_len}: use a "
                f"divisor of {cache_len}, or rebuild with `moe-jax data build --seq_len {seq_len}`"
            )
        self.seq_len, self.cache_seq_len = seq_len, cache_len
        self._k = cache_len // seq_len

    def _select_sources(self, split: str, source: str | None, rates: Mapping[str, float] | None) -> None:
        """Check and set the sources to read (one, or all) and their sampling rates (None: every row once per epoch)."""
        split_meta = self._meta["splits"][split]
        srcs = split_meta["sources"]
        if source is not None and source not in srcs:
            raise DataError(f"source {source!r} is not in the cache; it has {sorted(srcs)}")
        self.source = source
        self._ranges = {n: (s["row_start"], s["row_end"]) for n, s in srcs.items() if source is None or n == source}
        self.rates = None
        if rates:
            bad = sorted(set(rates) - set(self._ranges))
            if bad:
                raise DataError(f"rates name unknown source(s) {bad}; the cache has {sorted(self._ranges)}")
            if any(r < 0 for r in rates.values()) or sum(rates.values()) <= 0:
                raise DataError(f"rates must be >= 0 with a positive sum, got {dict(rates)}")
            self.rates = {n: float(rates.get(n, 0.0)) for n in self._ranges}

    # ------------------------------------------------------------------------------------ properties

    @property
    def meta(self) -> dict:
        """The cache's meta.json (vocab path/size/sha256, seq_len, token and byte counts per split/source)."""
        return self._meta

    @property
    def steps_per_epoch(self) -> int:
        n = self._units_per_epoch()
        return n // self.batch_size if self.repeat else -(-n // self.batch_size)

    @property
    def total_tokens(self) -> int:
        """Non-padding tokens in this loader's split (and source): one pass when repeat=False."""
        srcs = self._meta["splits"][self.split]["sources"]
        return int(sum(srcs[n]["tokens"] for n in self._ranges))

    @property
    def total_bytes(self) -> int:
        """UTF-8 bytes of the documents behind `total_tokens` (for bits-per-byte)."""
        srcs = self._meta["splits"][self.split]["sources"]
        return int(sum(srcs[n]["utf8_bytes"] for n in self._ranges))

    def batch_bytes(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """UTF-8 bytes represented by each row's target tokens, shape [rows] (padding counts 0)."""
        if self._byte_table is None:
            from moe_jax.data.store import read_array

            self._byte_table = read_array(self.cache_dir / "token_bytes").astype(np.int64)
        return self._byte_table[batch["decoder_target_tokens"]].sum(axis=1)

    # ------------------------------------------------------------------------------------ state

    def _config(self) -> dict:
        return {
            "cache": self._meta["corpus_fingerprint"] + ":" + self._meta["vocab_sha256"][:16],
            "split": self.split,
            "source": self.source,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "shuffle": self.shuffle,
            "rates": self.rates,
        }

    def get_state(self) -> dict:
        """Position of the next batch (JSON-serialisable; the same on every process)."""
        return dict(self._config(), epoch=self.epoch, step=self.step)

    def set_state(self, state: Mapping) -> None:
        """Resume so that the next batch is the one that followed when `state` was taken."""
        mine = self._config()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise DataError(f"loader state does not match this loader (saved, current): {diff}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._pending.clear()

    # ------------------------------------------------------------------------------------ order

    def _units_per_epoch(self) -> int:
        return self.num_units

    def _epoch_units(self, epoch: int) -> np.ndarray:
        """Global unit order of one epoch (deterministic in seed and epoch)."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        if self.rates is None:
            units = rng.permutation(self._units_all) if self.shuffle else self._units_all
        else:
            total = sum(self.rates.values())
            picks = []
            for i, (name, (a, b)) in enumerate(self._ranges.items()):
                n = int(round(self.rates[name] / total * self.num_units))
                pool = np.arange(a * self._k, b * self._k, dtype=np.int64)
                if n == 0 or pool.size == 0:
                    continue
                srng = np.random.default_rng([self.seed, epoch, i])
                reps = -(-n // pool.size)
                picks.append(np.concatenate([srng.permutation(pool) for _ in range(reps)])[:n])
            units = np.concatenate(picks) if picks else np.zeros(0, np.int64)
            # pad/trim to exactly num_units so that an epoch always has the same length
            if units.size < self.num_units:
                units = np.concatenate([units, units[: self.num_units - units.size]])
            units = units[: self.num_units]
            if self.shuffle:
                units = rng.permutation(units)
        self._epoch_cache = (epoch, units)
        return units

    def _local_units(self, epoch: int, step: int) -> np.ndarray:
        units = self._epoch_units(epoch)
        g0 = step * self.batch_size + self.process_index * self.local_batch_size
        local = units[g0 : g0 + self.local_batch_size]
        if local.size < self.local_batch_size:  # last eval batch: pad with empty rows (-1)
            local = np.concatenate([local, np.full(self.local_batch_size - local.size, -1, np.int64)])
        return local

    # ------------------------------------------------------------------------------------ reading

    def _issue(self, epoch: int, step: int):
        local = self._local_units(epoch, step)
        valid = local >= 0
        rows = local[valid] // self._k
        uniq, inverse = np.unique(rows, return_inverse=True)
        if uniq.size:
            ft, fs = self._tokens[uniq].read(), self._segs[uniq].read()
        else:
            ft = fs = None
        return local, valid, inverse, ft, fs

    def _assemble(self, local, valid, inverse, ft, fs) -> dict[str, np.ndarray]:
        b, s = self.local_batch_size, self.seq_len
        tok = np.zeros((b, s), np.int32)
        seg = np.zeros((b, s), np.int32)
        if ft is not None:
            rt, rs = ft.result(), fs.result()
            sub = local[valid] % self._k
            cols = sub[:, None] * s + np.arange(s)[None, :]
            tok[valid] = np.take_along_axis(rt[inverse], cols, axis=1)
            seg[valid] = np.take_along_axis(rs[inverse].astype(np.int32), cols, axis=1)
        return model_features(tok, seg)

    def _next_positions(self, n: int) -> list[tuple[int, int]]:
        out, e, st = [], self.epoch, self.step
        spe = self.steps_per_epoch
        for _ in range(n):
            if st >= spe:
                if not self.repeat:
                    break
                e, st = e + 1, 0
            out.append((e, st))
            st += 1
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.step >= self.steps_per_epoch:
            if not self.repeat:
                raise StopIteration
            self.epoch, self.step = self.epoch + 1, 0
        key = (self.epoch, self.step)
        # keep up to `prefetch` reads in flight (tensorstore does the I/O in its own threads)
        for pos in self._next_positions(1 + self._prefetch):
            if pos not in self._pending:
                self._pending[pos] = self._issue(*pos)
        while self._pending and next(iter(self._pending)) != key:
            self._pending.popitem(last=False)
        batch = self._assemble(*self._pending.pop(key))
        self.step += 1
        return batch

    def __len__(self) -> int:
        """Batches in one epoch (for repeat=False: in the whole pass)."""
        return self.steps_per_epoch

    # ------------------------------------------------------------------------------------ checks

    def _check_vocab(self, vocab) -> None:
        recorded = self._meta["vocab"]
        candidates = []
        if vocab is not None:
            candidates.append(("given", Path(vocab)))
        elif recorded.get("path") and Path(recorded["path"]).is_file():
            candidates.append(("recorded", Path(recorded["path"])))
        for _how, path in candidates:
            if not path.exists():
                raise VocabMismatchError(f"vocabulary {path} does not exist: run `moe-jax data build`")
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            if sha != self._meta["vocab_sha256"]:
                raise VocabMismatchError(
                    f"vocabulary {path} (sha256 {sha[:12]}) does not match the token cache {self.cache_dir}, "
                    f"which was built with sha256 {self._meta['vocab_sha256'][:12]} ({recorded['path']}): "
                    f"rebuild the cache with `moe-jax data build` (it re-tokenises when the vocabulary "
                    f"changed), or point the model at the cache's vocabulary"
                )


def describe(cache_dir) -> str:
    """One-paragraph summary of a cache (used by `moe-jax data info`)."""
    m = _load_meta(Path(cache_dir))
    lines = [f"{cache_dir}: seq_len {m['seq_len']}, vocab {m['vocab']['size']} ({m['vocab']['path']})"]
    for split, s in m["splits"].items():
        lines.append(
            f"  {split:8s} {s['rows']:8d} rows {s['tokens'] / 1e6:8.2f} M tokens "
            f"{s['utf8_bytes'] / 1e6:8.2f} MB  ({s['utf8_bytes'] / max(1, s['tokens']):.2f} bytes/token)"
        )
    return "\n".join(lines) + "\n" + json.dumps({k: m[k] for k in ("corpus_fingerprint", "vocab_sha256")})

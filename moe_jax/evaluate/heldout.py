"""Held-out loss and bits per byte per corpus source: this project's analogue of the paper's Pile loss.

The same eval step as training (`moe_jax.train.step.make_eval_step`) runs over the token cache's
held-out split, one finite pass per source (`TokenLoader(..., source=s, repeat=False)`), batches sharded
over the mesh. `moe-jax eval` and every point of `moe-jax analyze` call `heldout_eval`, so the analysis
with nothing disabled reproduces the plain held-out loss exactly. `heldout_pass` is the one accumulation
(summed NLL, tokens and bytes over one loader) behind both `heldout_eval` and the training loop's periodic
and final held-out loss.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax.data.loader import TokenLoader


class _NllTotals:
    """Mean loss and bits per byte from `nll` (nats), `tokens` and `bytes` totals."""

    nll: float
    tokens: float
    bytes: float

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else float("nan")


@dataclasses.dataclass
class SourceHeldout(_NllTotals):
    """One source's held-out pass: summed NLL (nats), target tokens and UTF-8 bytes counted."""

    source: str
    nll: float
    tokens: float
    bytes: float


@dataclasses.dataclass
class HeldoutResult(_NllTotals):
    """Held-out loss over all sources (token-weighted: total NLL / total tokens) and per source."""

    sources: dict[str, SourceHeldout]
    seq_len: int
    batches_per_source: int  # 0 = every batch

    @property
    def nll(self) -> float:
        return sum(s.nll for s in self.sources.values())

    @property
    def tokens(self) -> float:
        return sum(s.tokens for s in self.sources.values())

    @property
    def bytes(self) -> float:
        return sum(s.bytes for s in self.sources.values())

    def to_json(self) -> dict:
        return {
            "loss": self.loss,
            "bits_per_byte": self.bits_per_byte,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "seq_len": self.seq_len,
            "batches_per_source": self.batches_per_source,
            "sources": {
                k: {"loss": s.loss, "bits_per_byte": s.bits_per_byte, "tokens": s.tokens, "bytes": s.bytes}
                for k, s in self.sources.items()
            },
        }


def heldout_sources(cache_dir: str | Path, split: str = "heldout") -> list[str]:
    """The corpus sources of the cache's split, in cache order."""
    from moe_jax.data.cache import load_meta

    return list(load_meta(Path(cache_dir))["splits"][split].get("sources", {}))


def _all_processes_sum(x: float) -> float:
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return float(np.sum(multihost_utils.process_allgather(np.asarray([x]))))


def heldout_pass(
    eval_step,
    params,
    loader: TokenLoader,
    mesh,
    max_batches: int = 0,
    *,
    name: str = "all",
    on_batch: Callable[[int], object] | None = None,
) -> SourceHeldout:
    """One finite pass of `eval_step` over `loader` (up to `max_batches` batches; 0 = all).

    Args:
      eval_step: `(params, batch) -> (nll_sum [batch shards], target_tokens [batch shards])`, e.g. a jitted
        `moe_jax.train.step.make_eval_step`; its outputs are global arrays, so every process sees the totals.
      loader: a `TokenLoader` with `repeat=False`; each process reads its own rows, and the UTF-8 byte counts
        (host-local) are summed over processes.
    Returns the summed NLL (nats), target tokens and bytes as a `SourceHeldout` named `name`.
    """
    from moe_jax.parallel import shard_batch

    nll = tokens = nbytes = 0.0
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        s, n = eval_step(params, shard_batch(batch, mesh))
        nll += float(np.sum(np.asarray(s, np.float64)))
        tokens += float(np.sum(np.asarray(n, np.float64)))
        nbytes += float(np.sum(loader.batch_bytes(batch)))
        if on_batch is not None:
            on_batch(1)
    return SourceHeldout(name, nll, tokens, _all_processes_sum(nbytes))


def heldout_eval(
    graphdef,
    params,
    rest,
    cache_dir: str | Path,
    seq_len: int,
    batch_size: int,
    mesh,
    *,
    max_batches: int = 0,
    sources: Sequence[str] | None = None,
    split: str = "heldout",
    progress: bool = True,
    eval_step=None,
) -> HeldoutResult:
    """Held-out NLL per source of the model (graphdef, params, rest).

    Args:
      cache_dir: the token cache; seq_len: row length (the training seq_len, a divisor of the cache's).
      batch_size: global rows per batch (a multiple of the mesh's batch shards).
      mesh: the device mesh (params already placed on it, e.g. by `load_trained`).
      max_batches: per source (0 = the whole split).
      sources: default every source of the split.
      eval_step: a jitted `make_eval_step(graphdef, rest)` to reuse across calls (built if None).
    """
    from tqdm import tqdm

    from moe_jax.train.step import make_eval_step

    if eval_step is None:
        eval_step = jax.jit(make_eval_step(graphdef, rest), out_shardings=NamedSharding(mesh, P()))
    names = list(sources) if sources is not None else heldout_sources(cache_dir, split)
    out: dict[str, SourceHeldout] = {}
    for name in names:
        loader = TokenLoader(
            cache_dir,
            split,
            batch_size,
            seq_len,
            seed=0,
            repeat=False,
            source=name,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        total = len(loader) if not max_batches else min(max_batches, len(loader))
        bar = tqdm(
            total=total,
            desc=f"held-out {name}",
            unit="batch",
            leave=False,
            dynamic_ncols=True,
            disable=not progress or jax.process_index() != 0,
        )
        with jax.set_mesh(mesh):
            out[name] = heldout_pass(eval_step, params, loader, mesh, max_batches, name=name, on_batch=bar.update)
        bar.close()
    return HeldoutResult(sources=out, seq_len=seq_len, batches_per_source=max_batches)

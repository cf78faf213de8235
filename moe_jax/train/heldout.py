"""The held-out accumulation shared by training and evaluation: one finite pass of the eval step over a
loader, summing NLL (nats), target tokens and UTF-8 bytes.

The training loop's periodic and final held-out loss call `heldout_pass` directly; `moe-jax eval` and
`moe-jax analyze` call it once per corpus source through `moe_jax.evaluate.heldout.heldout_eval`, so both
report the same numbers for the same data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import numpy as np

from moe_jax.data.loader import TokenLoader
from moe_jax.parallel import shard_batch


class NllTotals:
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
class SourceHeldout(NllTotals):
    """One source's held-out pass: summed NLL (nats), target tokens and UTF-8 bytes counted."""

    source: str
    nll: float
    tokens: float
    bytes: float


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

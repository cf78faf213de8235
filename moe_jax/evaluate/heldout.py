"""Held-out loss and bits per byte per corpus source: this project's analogue of the paper's Pile loss.

The same eval step as training (`moe_jax.train.step.make_eval_step`) runs over the token cache's
held-out split, one finite pass per source (`TokenLoader(..., source=s, repeat=False)`), batches sharded
over the mesh. `moe-jax eval` and every point of `moe-jax analyze` call `heldout_eval`, so the analysis
with nothing disabled reproduces the plain held-out loss exactly. `moe_jax.train.heldout.heldout_pass` is
the one accumulation (summed NLL, tokens and bytes over one loader) behind both `heldout_eval` and the
training loop's periodic and final held-out loss.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax.data.loader import TokenLoader
from moe_jax.train.heldout import NllTotals, SourceHeldout, heldout_pass


@dataclasses.dataclass
class HeldoutResult(NllTotals):
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


def source_loader(
    cache_dir: str | Path, split: str, batch_size: int, seq_len: int, source: str, max_batches: int = 0
) -> tuple[TokenLoader, int]:
    """A loader of one finite pass (seed 0) over this process's share of `source`'s rows of the cache's
    `split`, and the batches a pass reads: every one, or at most `max_batches` when that is > 0."""
    loader = TokenLoader(
        cache_dir,
        split,
        batch_size,
        seq_len,
        seed=0,
        repeat=False,
        source=source,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return loader, len(loader) if not max_batches else min(max_batches, len(loader))


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
        loader, total = source_loader(cache_dir, split, batch_size, seq_len, name, max_batches)
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


def source_metrics(report: dict) -> dict[str, float]:
    """Flat numbers of a `moe-jax eval` JSON for sweep reports: `heldout_bpb/<source>`, the held-out bits
    per byte of each corpus source, and `heldout_bpb/all` over the whole split."""
    heldout = report["heldout"]
    out = {"heldout_bpb/all": heldout["bits_per_byte"]}
    out.update({f"heldout_bpb/{name}": src["bits_per_byte"] for name, src in heldout["sources"].items()})
    return out

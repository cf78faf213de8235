"""Reference losses a trained model must beat: the corpus's unigram entropy."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from moe_jax.data.loader import TokenLoader


@dataclasses.dataclass(frozen=True)
class UnigramBaseline:
    """Loss of predicting every held-out token by its training-split frequency (add-one smoothed).

    Attributes:
      train_entropy: entropy of the training unigram distribution, nats/token.
      heldout_loss: cross-entropy of the held-out tokens under it, nats/token (the number to beat).
      heldout_bits_per_byte: the same in bits per UTF-8 byte.
      train_tokens, heldout_tokens: tokens counted.
    """

    train_entropy: float
    heldout_loss: float
    heldout_bits_per_byte: float
    train_tokens: int
    heldout_tokens: int


def _token_counts(loader: TokenLoader, vocab_size: int) -> tuple[np.ndarray, int]:
    counts = np.zeros(vocab_size, np.int64)
    nbytes = 0
    for batch in loader:
        w = batch["decoder_loss_weights"] > 0
        counts += np.bincount(batch["decoder_target_tokens"][w], minlength=vocab_size)
        nbytes += int(loader.batch_bytes(batch).sum())
    return counts, nbytes


def unigram_baseline(cache_dir: str | Path, heldout_split: str = "heldout", batch_size: int = 256) -> UnigramBaseline:
    """Count the training split's unigram distribution and score the held-out split with it."""
    train = TokenLoader(cache_dir, "train", batch_size, repeat=False, shuffle=False)
    vocab_size = int(train.meta["vocab"]["size"])
    train_counts, _ = _token_counts(train, vocab_size)
    heldout_counts, heldout_bytes = _token_counts(
        TokenLoader(cache_dir, heldout_split, batch_size, repeat=False, shuffle=False), vocab_size
    )
    p = (train_counts + 1.0) / (train_counts.sum() + vocab_size)
    logp = np.log(p)
    nll = -float((heldout_counts * logp).sum())
    return UnigramBaseline(
        train_entropy=-float((p * logp).sum()),
        heldout_loss=nll / heldout_counts.sum(),
        heldout_bits_per_byte=nll / math.log(2) / max(heldout_bytes, 1),
        train_tokens=int(train_counts.sum()),
        heldout_tokens=int(heldout_counts.sum()),
    )

"""`heldout_pass`, the one held-out accumulation shared by `moe-jax train` and `moe-jax eval`: goldens from a
stand-in eval step whose per-token NLL is known exactly."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TRAIN_SEQ

from moe_jax.data.loader import TokenLoader
from moe_jax.parallel import MeshConfig, build_mesh
from moe_jax.train.heldout import heldout_pass


def nll_equals_position(params, batch):
    """A stand-in eval step: target token t at position p costs p nats (per-row sums, as make_eval_step)."""
    w = batch["decoder_loss_weights"].astype(jnp.float32)
    pos = jnp.arange(w.shape[1], dtype=jnp.float32)[None, :]
    return jnp.sum(pos * w, axis=1), jnp.sum(w, axis=1)


def loader(cache):
    return TokenLoader(cache, "heldout", 8, TRAIN_SEQ, seed=0, repeat=False)


def expected(cache, max_batches=0):
    nll = tokens = nbytes = 0.0
    ld = loader(cache)
    for i, batch in enumerate(ld):
        if max_batches and i >= max_batches:
            break
        w = np.asarray(batch["decoder_loss_weights"], np.float64)
        nll += float((w * np.arange(w.shape[1])).sum())
        tokens += float(w.sum())
        nbytes += float(np.sum(ld.batch_bytes(batch)))
    return nll, tokens, nbytes


@pytest.mark.parametrize("max_batches", [0, 1])
def test_heldout_pass_sums_nll_tokens_and_bytes(train_cache, max_batches):
    mesh = build_mesh(MeshConfig(data=-1))
    assert len(loader(train_cache)) >= 2, "the fixture's held-out split needs two batches for this test"
    got = heldout_pass(nll_equals_position, None, loader(train_cache), mesh, max_batches, name="words")
    nll, tokens, nbytes = expected(train_cache, max_batches)
    assert got.source == "words" and tokens > 0 and nbytes > 0
    assert (got.nll, got.tokens, got.bytes) == pytest.approx((nll, tokens, nbytes), rel=1e-9)
    assert got.loss == pytest.approx(nll / tokens) and got.bits_per_byte == pytest.approx(nll / np.log(2) / nbytes)
    full = heldout_pass(nll_equals_position, None, loader(train_cache), mesh)
    assert (full.tokens > got.tokens) == bool(max_batches)

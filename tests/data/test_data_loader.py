"""TokenLoader on a tiny token cache: shapes, determinism, exact restore, host slices, held-out pass,
bits-per-byte counts, shorter windows, and the clear errors (cache/vocab/seq_len)."""

import json
import shutil

import numpy as np
import pytest

from moe_jax.data.errors import CorpusMissingError, DataError, SeqLenError, VocabMismatchError
from moe_jax.data.loader import FEATURES, TokenLoader
from moe_jax.data.store import read_array

SEQ_LEN = 64  # the `tiny_data` fixture's cache length (tests/data/conftest.py)


def _eq(a, b):
    return all(np.array_equal(a[k], b[k]) for k in FEATURES)


def test_batches_have_the_configured_shape(tiny_data):
    loader = TokenLoader(tiny_data["cache"], split="train", batch_size=4, seq_len=SEQ_LEN, seed=0)
    batch = next(loader)
    assert set(batch) == set(FEATURES)
    for v in batch.values():
        assert v.shape == (4, SEQ_LEN) and v.dtype == np.int32
    assert loader.meta["seq_len"] == SEQ_LEN and loader.meta["vocab"]["size"] == 320
    assert (batch["decoder_loss_weights"] == (batch["decoder_target_tokens"] != 0)).all()


def test_order_is_deterministic_and_reshuffled_per_epoch(tiny_data):
    a = TokenLoader(tiny_data["cache"], batch_size=4, seed=3)
    b = TokenLoader(tiny_data["cache"], batch_size=4, seed=3)
    c = TokenLoader(tiny_data["cache"], batch_size=4, seed=4)
    xa, xb, xc = next(a), next(b), next(c)
    assert _eq(xa, xb) and not _eq(xa, xc)
    assert not np.array_equal(a._epoch_units(0), a._epoch_units(1))
    # one epoch visits every unit exactly once (the remainder that does not fill a batch is dropped)
    units = a._epoch_units(0)
    assert np.array_equal(np.sort(units), np.arange(a.num_units))


@pytest.mark.parametrize("seq_len", [SEQ_LEN, SEQ_LEN // 2])
def test_restore_gives_exactly_the_following_batches(tiny_data, seq_len):
    loader = TokenLoader(tiny_data["cache"], batch_size=4, seq_len=seq_len, seed=0)
    spe = loader.steps_per_epoch
    for _ in range(spe - 2):  # stop just before an epoch boundary, so that the restore crosses it
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))
    expected = [next(loader) for _ in range(5)]
    assert loader.epoch == 1
    fresh = TokenLoader(tiny_data["cache"], batch_size=4, seq_len=seq_len, seed=0)
    fresh.set_state(state)
    assert (fresh.epoch, fresh.step) == (0, spe - 2)
    for e in expected:
        assert _eq(next(fresh), e)
    # restoring the same loader backwards works too (prefetched reads are discarded)
    loader.set_state(state)
    assert _eq(next(loader), expected[0])


def test_state_from_another_configuration_is_rejected(tiny_data):
    state = TokenLoader(tiny_data["cache"], batch_size=4, seed=0).get_state()
    with pytest.raises(DataError, match="seed"):
        TokenLoader(tiny_data["cache"], batch_size=4, seed=1).set_state(state)


def test_two_hosts_get_disjoint_slices_that_cover_the_global_batch(tiny_data):
    g = TokenLoader(tiny_data["cache"], batch_size=8, seed=0)
    hosts = [TokenLoader(tiny_data["cache"], batch_size=8, seed=0, process_index=i, process_count=2) for i in range(2)]
    for _ in range(3):
        full = next(g)
        parts = [next(h) for h in hosts]
        for k in FEATURES:
            assert parts[0][k].shape == (4, SEQ_LEN)
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
        units = [h._local_units(h.epoch, h.step - 1) for h in hosts]
        assert not set(units[0]) & set(units[1])
    # the state is global: a host restores from a state saved by another one
    hosts[1].set_state(hosts[0].get_state())
    with pytest.raises(DataError, match="divisible"):
        TokenLoader(tiny_data["cache"], batch_size=7, process_index=0, process_count=2)


def test_heldout_pass_sees_every_token_once_with_bytes(tiny_data):
    meta = tiny_data["meta"]
    tokens = read_array(tiny_data["cache"] / "heldout" / "tokens")
    for source in [None, "alpha", "beta"]:
        ev = TokenLoader(tiny_data["cache"], split="heldout", batch_size=3, repeat=False, source=source)
        assert not ev.repeat and not ev.shuffle
        batches = list(ev)
        assert len(batches) == len(ev) and all(b["decoder_target_tokens"].shape == (3, SEQ_LEN) for b in batches)
        got = np.concatenate([b["decoder_target_tokens"] for b in batches])
        weights = sum(int(b["decoder_loss_weights"].sum()) for b in batches)
        assert weights == ev.total_tokens
        nbytes = sum(int(ev.batch_bytes(b).sum()) for b in batches)
        assert nbytes == ev.total_bytes  # the vocabulary is lossless: token bytes == document bytes
        if source is None:
            assert weights == meta["splits"]["heldout"]["tokens"] == int((tokens != 0).sum())
            np.testing.assert_array_equal(got[: tokens.shape[0]], tokens)  # in order, padded at the end
        with pytest.raises(StopIteration):
            next(ev)


def test_heldout_documents_are_not_in_train(tiny_data):
    from moe_jax.data import vocab

    sp = vocab.load(tiny_data["vocab"])
    train = read_array(tiny_data["cache"] / "train" / "tokens")
    held = read_array(tiny_data["cache"] / "heldout" / "tokens")
    train_text = sp.decode([int(t) for t in train[train != 0]])
    segs = read_array(tiny_data["cache"] / "heldout" / "segment_ids")
    checked = 0
    for row, seg in zip(held, segs):
        for s in set(seg[seg != 0].tolist()):
            piece = sp.decode([int(t) for t in row[(seg == s) & (row > 1)]])
            if len(piece) > 80:  # long enough not to occur in other random documents by chance
                assert piece not in train_text
                checked += 1
    assert checked > 5


def test_shorter_seq_len_windows_keep_every_token(tiny_data):
    full = TokenLoader(tiny_data["cache"], split="heldout", batch_size=2, repeat=False)
    half = TokenLoader(tiny_data["cache"], split="heldout", batch_size=4, seq_len=SEQ_LEN // 2, repeat=False)
    a = np.concatenate([b["decoder_target_tokens"] for b in full])
    h = np.concatenate([b["decoder_target_tokens"] for b in half])
    np.testing.assert_array_equal(a[a != 0], h[h != 0])
    assert half.total_tokens == full.total_tokens


def test_rates_mixture(tiny_data):
    only_beta = TokenLoader(tiny_data["cache"], batch_size=4, rates={"alpha": 0.0, "beta": 1.0})
    beta = tiny_data["meta"]["splits"]["train"]["sources"]["beta"]
    units = only_beta._epoch_units(0)
    assert units.size == only_beta.num_units
    assert ((units >= beta["row_start"]) & (units < beta["row_end"])).all()
    with pytest.raises(DataError, match="unknown source"):
        TokenLoader(tiny_data["cache"], batch_size=4, rates={"gamma": 1.0})


# ----------------------------------------------------------------------------------------- errors


def test_error_seq_len_longer_than_cache(tiny_data):
    with pytest.raises(SeqLenError, match=rf"seq_len {2 * SEQ_LEN} is longer than .* {SEQ_LEN}"):
        TokenLoader(tiny_data["cache"], batch_size=4, seq_len=2 * SEQ_LEN)
    with pytest.raises(SeqLenError, match="does not divide"):
        TokenLoader(tiny_data["cache"], batch_size=4, seq_len=SEQ_LEN - 1)


def test_error_missing_cache(tmp_path):
    with pytest.raises(CorpusMissingError, match="no token cache .* run `moe-jax data build`"):
        TokenLoader(tmp_path / "nope", batch_size=4)


def test_error_vocab_does_not_match_cache(tiny_data, tmp_path):
    other = tmp_path / "other.model"
    other.write_bytes(tiny_data["vocab"].read_bytes() + b"changed")
    with pytest.raises(VocabMismatchError, match="does not match the token cache"):
        TokenLoader(tiny_data["cache"], batch_size=4, vocab=other)
    TokenLoader(tiny_data["cache"], batch_size=4, vocab=tiny_data["vocab"])  # the right one is fine
    # the vocabulary recorded in meta.json was replaced after the cache was built
    cache = tmp_path / "cache"
    shutil.copytree(tiny_data["cache"], cache)
    meta = json.loads((cache / "meta.json").read_text())
    meta["vocab"]["path"] = str(other)
    (cache / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(VocabMismatchError, match="moe-jax data build"):
        TokenLoader(cache, batch_size=4)


def test_error_empty_selection(tiny_data):
    with pytest.raises(DataError, match="not in the cache"):
        TokenLoader(tiny_data["cache"], split="heldout", source="gamma", batch_size=4)
    with pytest.raises(DataError, match="fewer than one global batch"):
        TokenLoader(tiny_data["cache"], split="heldout", batch_size=10_000, repeat=True)

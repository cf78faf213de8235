"""The numpy packer: no token lost or duplicated, seqio's layout rules, model features (numpy only)."""

import numpy as np
import pytest

from moe_jax.data.packing import chunk_lengths, model_features, pack, pack_documents, pack_layout


def _docs(rng, n, max_len):
    return [rng.integers(3, 500, size=int(rng.integers(0, max_len))).astype(np.int32) for _ in range(n)]


@pytest.mark.parametrize("seq_len", [8, 64])
def test_pack_keeps_every_token_once(seq_len):
    rng = np.random.default_rng(0)
    docs = _docs(rng, 300, 5 * seq_len)
    tok, seg = pack_documents(docs, seq_len, eos_id=1)
    # count check: every document token + one EOS per document, nothing else
    n_expected = sum(len(d) + 1 for d in docs)
    assert int((tok != 0).sum()) == n_expected
    assert int((tok == 1).sum()) == len(docs)
    flat_in = np.concatenate([np.append(d, 1) for d in docs])
    np.testing.assert_array_equal(np.sort(tok[tok != 0]), np.sort(flat_in))
    # and in order: reading the rows' non-padding tokens back gives the documents in order
    np.testing.assert_array_equal(tok[tok != 0], flat_in)
    assert ((seg != 0) == (tok != 0)).all()


def test_chunk_lengths():
    np.testing.assert_array_equal(chunk_lengths(np.array([1, 8, 9, 17]), 8), [1, 8, 8, 1, 8, 8, 1])


def test_pack_layout_follows_seqio_groups():
    # seqio packs inside groups of seq_len examples and always closes the row at a group end
    lengths = np.ones(10, np.int64)
    rows, offs, n = pack_layout(lengths, 4)
    np.testing.assert_array_equal(rows, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(offs, [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    # greedy, no reordering: an example that does not fit closes the row
    rows, offs, n = pack_layout(np.array([3, 2, 1, 4]), 4)
    np.testing.assert_array_equal(rows, [0, 1, 1, 2])
    assert n == 3


def test_model_features_match_seqio_docstring_example():
    # seqio LMFeatureConverter docstring: targets [3 9 1 4 1 0] packed from [3 9 1] and [4 1]
    tok, seg = pack(np.array([3, 9, 1, 4, 1]), np.array([3, 2]), 6)
    f = model_features(tok, seg)
    np.testing.assert_array_equal(f["decoder_target_tokens"][0], [3, 9, 1, 4, 1, 0])
    np.testing.assert_array_equal(f["decoder_input_tokens"][0], [0, 3, 9, 0, 4, 0])
    np.testing.assert_array_equal(f["decoder_loss_weights"][0], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(f["decoder_positions"][0], [0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(f["decoder_segment_ids"][0], [1, 1, 1, 2, 2, 0])
    assert all(v.dtype == np.int32 for v in f.values())


def test_model_features_on_windows_restart_segments():
    tok, seg = pack(np.arange(2, 12), np.array([6, 4]), 10)
    windows_tok, windows_seg = tok.reshape(2, 5), seg.reshape(2, 5)
    f = model_features(windows_tok, windows_seg)
    np.testing.assert_array_equal(f["decoder_segment_ids"], [[1, 1, 1, 1, 1], [1, 2, 2, 2, 2]])
    np.testing.assert_array_equal(f["decoder_positions"], [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]])
    np.testing.assert_array_equal(f["decoder_input_tokens"], [[0, 2, 3, 4, 5], [0, 0, 8, 9, 10]])


def test_pack_rejects_inconsistent_lengths():
    with pytest.raises(ValueError):
        pack(np.arange(1, 5), np.array([2, 3]), 8)
    with pytest.raises(ValueError):
        pack_layout(np.array([9]), 8)

"""Packing token sequences into fixed-length rows, with exactly the layout of seqio's
`DecoderFeatureConverter(pack=True)` (numpy only; safe on the training import path).

How seqio packs (seqio/utils.py `trim_and_pack_dataset` + `_pack_with_tf_ops`, checked against seqio
0.0.20 by tests/data/test_data_seqio.py): the examples are taken in groups of `L` (= the sequence length)
consecutive examples; inside a group each example is appended to the current row if it fits, otherwise the
row is closed (padded with 0) and a new one started; the last row of a group is always closed. Each row
numbers its examples 1, 2, ... (`segment_ids`, 0 = padding) and counts `positions` from 0 inside each.
The model features are then

    decoder_target_tokens = tokens
    decoder_input_tokens  = tokens shifted right by one inside each segment (0 at a segment start)
    decoder_loss_weights  = tokens != 0
    decoder_segment_ids, decoder_positions

An *example* here is a chunk of at most `L` tokens of one document: each document is tokenised, EOS is
appended, and the result is cut into consecutive chunks of `L` tokens (the last one shorter). So no token
is dropped (seqio's default `append_eos_after_trim` would truncate every document to `L` tokens).
"""

from __future__ import annotations

import numpy as np

FEATURES = (
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
    "decoder_segment_ids",
    "decoder_positions",
)


def chunk_lengths(doc_lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Lengths of the examples made by cutting each document (EOS included) into <= seq_len chunks."""
    doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
    if doc_lengths.size and doc_lengths.min() <= 0:
        raise ValueError("every document must have at least one token (its EOS)")
    n_full = doc_lengths // seq_len
    rem = doc_lengths % seq_len
    counts = n_full + (rem > 0)
    out = np.full(int(counts.sum()), seq_len, dtype=np.int64)
    # the last chunk of each document holds the remainder (if any)
    last = np.cumsum(counts) - 1
    has_rem = rem > 0
    out[last[has_rem]] = rem[has_rem]
    return out


def pack_layout(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(row, offset) of every example and the number of rows, following seqio's greedy packing with
    its groups of `seq_len` examples."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.max() > seq_len or lengths.min() <= 0):
        raise ValueError(f"examples must have 1..{seq_len} tokens")
    rows = np.empty(len(lengths), dtype=np.int64)
    offs = np.empty(len(lengths), dtype=np.int64)
    row, fill = -1, 0
    for i, n in enumerate(lengths.tolist()):
        if i % seq_len == 0 or fill + n > seq_len:
            row += 1
            fill = 0
        rows[i] = row
        offs[i] = fill
        fill += n
    return rows, offs, row + 1


def pack(tokens: np.ndarray, lengths: np.ndarray, seq_len: int, dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Pack the examples (`tokens` = all examples concatenated, `lengths` = their lengths) into
    (tokens [rows, seq_len], segment_ids [rows, seq_len]); 0 is padding in both."""
    tokens = np.asarray(tokens)
    lengths = np.asarray(lengths, dtype=np.int64)
    if int(lengths.sum()) != tokens.size:
        raise ValueError(f"lengths sum to {int(lengths.sum())} but there are {tokens.size} tokens")
    rows, offs, n_rows = pack_layout(lengths, seq_len)
    out_tok = np.zeros((n_rows, seq_len), dtype=dtype)
    out_seg = np.zeros((n_rows, seq_len), dtype=np.uint16 if seq_len < 65535 else np.int32)
    if not lengths.size:
        return out_tok, out_seg
    starts = np.cumsum(lengths) - lengths
    within = np.arange(tokens.size, dtype=np.int64) - np.repeat(starts, lengths)
    dest = np.repeat(rows * seq_len + offs, lengths) + within
    out_tok.reshape(-1)[dest] = tokens
    first_in_row = np.searchsorted(rows, np.arange(n_rows))  # rows is non-decreasing
    seg = np.arange(len(lengths)) - first_in_row[rows] + 1
    out_seg.reshape(-1)[dest] = np.repeat(seg, lengths)
    return out_tok, out_seg


def pack_documents(docs: list[np.ndarray], seq_len: int, eos_id: int, dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Append EOS to each tokenised document, cut into <= seq_len chunks and pack (seqio layout)."""
    if not docs:
        return pack(np.zeros(0, dtype), np.zeros(0, np.int64), seq_len, dtype)
    doc_len = np.array([len(d) + 1 for d in docs], dtype=np.int64)
    flat = np.empty(int(doc_len.sum()), dtype=dtype)
    ends = np.cumsum(doc_len)
    flat[ends - 1] = eos_id
    pos = 0
    for d, n in zip(docs, doc_len.tolist()):
        flat[pos : pos + n - 1] = d
        pos += n
    return pack(flat, chunk_lengths(doc_len, seq_len), seq_len, dtype)


def model_features(tokens: np.ndarray, segment_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The five decoder features (int32) of packed rows [B, S], as seqio's LMFeatureConverter makes them.

    Segments are renumbered from 1 in each row and positions recomputed from the segment starts, so this
    is also correct for windows cut out of longer packed rows (a cut segment restarts at position 0 with
    a 0 input token, like a new chunk of its document)."""
    tok = np.asarray(tokens, dtype=np.int32)
    seg = np.asarray(segment_ids, dtype=np.int32)
    b, s = tok.shape
    nonpad = seg != 0
    prev = np.empty_like(seg)
    prev[:, 0] = -1
    prev[:, 1:] = seg[:, :-1]
    start = (seg != prev) & nonpad
    new_seg = np.cumsum(start, axis=1, dtype=np.int32) * nonpad
    idx = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    start_idx = np.maximum.accumulate(np.where(start, idx, 0), axis=1)
    positions = (idx - start_idx) * nonpad
    inputs = np.zeros_like(tok)
    inputs[:, 1:] = tok[:, :-1]
    inputs[start | ~nonpad] = 0
    return {
        "decoder_input_tokens": inputs,
        "decoder_target_tokens": tok,
        "decoder_loss_weights": (tok != 0).astype(np.int32),
        "decoder_segment_ids": new_seg.astype(np.int32),
        "decoder_positions": positions.astype(np.int32),
    }

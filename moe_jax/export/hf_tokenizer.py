"""The tokenizer files of an export: our SentencePiece model as `tokenizer.json` (the `tokenizers`
library's format, which transformers' `AutoTokenizer` loads without sentencepiece) + `tokenizer.model`.

Our vocabularies (`moe_jax.data.vocab`) are SentencePiece BPE with identity normalisation, no dummy
prefix, no whitespace folding and byte fallback. That maps onto a `tokenizers` BPE model exactly:
  - normaliser: " " -> "\u2581" (SentencePiece's whitespace escape), nothing else;
  - no pre-tokeniser (SentencePiece BPE encodes the whole normalised string; its training-time
    splits - whitespace, scripts, digits - are already in which pieces exist);
  - merges: every split (a, b) of a piece p = a + b with a, b pieces, ranked by p's id (SentencePiece
    orders BPE pieces by score, and BPE merges the highest-scored adjacent pair first), then by a's
    and b's ids;
  - byte fallback to the <0xNN> pieces; control pieces (<pad>, </s>) and <unk> as special tokens,
    which a text cannot produce (`split_special_tokens`: "</s>" in a text is encoded as characters,
    as SentencePiece does);
  - a post-processor that prepends BOS = <pad> (id 0): our models were trained on seqio decoder inputs,
    which start every sequence with id 0 (the project has no BOS piece).
`tests/export/test_transformers.py` checks `AutoTokenizer(out)(text).input_ids == [0] + sp.encode(text)`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class TokenizerExportError(ValueError):
    """A SentencePiece model whose settings `tokenizer.json` cannot reproduce."""


def _model_proto(spm_path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(spm_path).read_bytes())
    return proto


def _check_supported(proto, spm_path: Path) -> None:
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if trainer.model_type != trainer.BPE:
        problems.append(f"model_type {trainer.model_type} (only BPE = {trainer.BPE})")
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        problems.append(f"normalization {norm.name!r} (only identity)")
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        problems.append("add_dummy_prefix / remove_extra_whitespaces on or escape_whitespaces off")
    if problems:
        raise TokenizerExportError(
            f"{spm_path}: cannot be written as tokenizer.json: "
            + "; ".join(problems)
            + " (moe_jax.data.vocab trains identity-normalised BPE vocabularies)"
        )


def bpe_merges(pieces: list[tuple[str, int]]) -> list[list[str]]:
    """Merges [[a, b], ...] of SentencePiece BPE pieces [(piece, type)] (ids = positions), ranked by the
    merged piece's id, then a's and b's ids."""
    ids = {p: i for i, (p, _) in enumerate(pieces)}
    ranked = []
    for i, (p, kind) in enumerate(pieces):
        if kind != NORMAL:
            continue
        for cut in range(1, len(p)):
            a, b = p[:cut], p[cut:]
            if a in ids and b in ids:
                ranked.append((i, ids[a], ids[b], a, b))
    return [[a, b] for *_, a, b in sorted(ranked)]


def tokenizer_json(spm_path: Path, bos_id: int) -> dict:
    """The `tokenizers` JSON of a SentencePiece BPE model, prepending id `bos_id` to every sequence."""
    proto = _model_proto(spm_path)
    _check_supported(proto, spm_path)
    pieces = [(p.piece, p.type) for p in proto.pieces]
    unk = next(p for p, kind in pieces if kind == UNKNOWN)
    bos = pieces[bos_id][0]
    special = [
        {
            "id": i,
            "content": p,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, (p, kind) in enumerate(pieces)
        if kind in (UNKNOWN, CONTROL)
    ]
    seq = [{"Sequence": {"id": "A", "type_id": 0}}]
    bos_item = [{"SpecialToken": {"id": bos, "type_id": 0}}]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": bos_item + seq,
            "pair": bos_item + seq + [{"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {p: i for i, (p, _) in enumerate(pieces)},
            "merges": bpe_merges(pieces),
        },
    }


def write_tokenizer(out: Path, spm_path: Path, ids: dict, max_length: int, tok_json: dict | None = None) -> None:
    """tokenizer.json + tokenizer.model (the SentencePiece model as is) + tokenizer_config.json +
    special_tokens_map.json.

    `<pad>` is declared as the BOS token and prepended (see the module docstring); `ids` holds
    pad_id, eos_id, unk_id. `tok_json`: `tokenizer_json(spm_path, ids["pad_id"])` if already built.
    """
    import sentencepiece as spm

    out = Path(out)
    tok_json = tok_json or tokenizer_json(spm_path, ids["pad_id"])
    shutil.copyfile(spm_path, out / "tokenizer.model")
    (out / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False))
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    pad, eos, unk = (sp.id_to_piece(ids[k]) for k in ("pad_id", "eos_id", "unk_id"))
    special = {"bos_token": pad, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    # split_special_tokens: "</s>" in a text is text (SentencePiece encodes control pieces only by id).
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")

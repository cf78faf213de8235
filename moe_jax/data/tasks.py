"""seqio Tasks and Mixtures for the corpora (imports TensorFlow: only the build step and tests use this).

* `register_corpus_tasks(corpus_dir, vocab_path)`: one Task per source of a built corpus
  (`<prefix>.<source>`, splits "train" and "heldout") and a Mixture `<prefix>` over them with rates
  (default: proportional to each source's training bytes).
* `register_text_files_task(name, patterns, vocab_path)`: a Task over any glob(s) of text files, with the
  same document splitting, normalisation, deduplication and held-out rule as `moe-jax data build`.
* `register_c4_task(vocab_path)`: C4 through TFDS, for machines with internet (defined here; the tests
  never run it because TFDS downloads).
* `packed_dataset(name, seq_len, split)`: the Task/Mixture through `seqio.DecoderFeatureConverter(pack=True)`.
* `materialise(name, cache_dir, seq_len, vocab_path)`: write any Task/Mixture's packed rows into the token
  cache format that `loader.TokenLoader` reads (slow: seqio runs at ~80k tokens/s on 2 CPU cores; the
  default corpus uses the equivalent sentencepiece+numpy path in `cache.py`).

Every Task tokenises "text" into "targets", appends EOS (`append_eos`, not `append_eos_after_trim`, which
would truncate documents) and cuts each document into chunks of at most the sequence length
(`split_to_length`), so that packing drops no token.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from moe_jax.data.corpus import SPLITS, dedupe_group_split, expand_glob, iter_docs, load_manifest, read_text_file_docs  # noqa: E402
from moe_jax.data.errors import CorpusMissingError, DataError, EmptyCorpusError  # noqa: E402
from moe_jax.data.textutil import normalise  # noqa: E402

try:  # keep TensorFlow off any accelerator, next to JAX
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):
    pass

TEXT_SPEC = {"text": tf.TensorSpec(shape=(), dtype=tf.string)}


@functools.lru_cache(maxsize=None)
def vocabulary(vocab_path: str) -> seqio.SentencePieceVocabulary:
    if not Path(vocab_path).exists():
        raise CorpusMissingError(f"no vocabulary at {vocab_path}: run `moe-jax data build`")
    return seqio.SentencePieceVocabulary(str(vocab_path), extra_ids=0)


def output_features(vocab_path: str | Path) -> dict[str, seqio.Feature]:
    return {"targets": seqio.Feature(vocabulary(str(vocab_path)), add_eos=True, dtype=tf.int32)}


def split_to_length(dataset: tf.data.Dataset, sequence_length=None, output_features=None) -> tf.data.Dataset:
    """Cut each example's "targets" into consecutive chunks of at most sequence_length["targets"] tokens
    (one example per chunk, other features dropped). No-op without a sequence length."""
    del output_features
    if not sequence_length or not sequence_length.get("targets"):
        return dataset
    length = int(sequence_length["targets"])

    def chunks(ex):
        t = ex["targets"]
        n = tf.size(t)
        starts = tf.range(0, n, length)
        row_lengths = tf.minimum(length, n - starts)
        return tf.data.Dataset.from_tensor_slices({"targets": tf.RaggedTensor.from_row_lengths(t, row_lengths)})

    return dataset.flat_map(chunks)


def _preprocessors():
    return [
        functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
        seqio.preprocessors.append_eos,
        split_to_length,
    ]


def _generator_source(docs_fn, splits: Sequence[str]) -> seqio.FunctionDataSource:
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # document order is the corpus order; shuffle downstream
        return tf.data.Dataset.from_generator(lambda: ({"text": d} for d in docs_fn(split)), output_signature=TEXT_SPEC)

    return seqio.FunctionDataSource(dataset_fn, splits=list(splits))


def _register_task(name: str, source: seqio.DataSource, vocab_path) -> seqio.Task:
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name, source=source, preprocessors=_preprocessors(), output_features=output_features(vocab_path), metric_fns=[]
    )


def _register_mixture(name: str, tasks_rates: list[tuple[str, float]]) -> seqio.Mixture:
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, tasks_rates)


def register_corpus_tasks(
    corpus_dir: str | Path, vocab_path: str | Path, prefix: str = "moe_jax", rates: Mapping[str, float] | None = None
) -> str:
    """Register `<prefix>.<source>` Tasks for every source of a built corpus and the Mixture `<prefix>`.
    `rates`: {source: weight}; default = training bytes of each source. Returns the mixture name."""
    corpus_dir = Path(corpus_dir)
    manifest = load_manifest(corpus_dir)
    pairs = []
    for src, info in manifest["sources"].items():
        task = f"{prefix}.{src}"
        _register_task(task, _generator_source(functools.partial(iter_docs, corpus_dir, src), SPLITS), vocab_path)
        rate = (rates or {}).get(src, 0.0) if rates else float(info["splits"]["train"]["bytes"])
        if rate > 0:
            pairs.append((task, rate))
    if not pairs:
        raise EmptyCorpusError(f"no source of {corpus_dir} has a positive rate: {rates}")
    _register_mixture(prefix, pairs)
    return prefix


def text_files_docs(
    patterns: Sequence[str],
    doc_split: str = "blank",
    encoding_errors: str = "strict",
    heldout_frac: float = 0.005,
    heldout_min_bytes: int = 65536,
) -> dict[str, list[str]]:
    """{"train": docs, "heldout": docs} of text files, as `moe-jax data build --text_files` splits them."""
    records = []
    for pattern in patterns:
        paths = expand_glob(pattern)
        if not paths:
            raise CorpusMissingError(f"no files match {pattern!r}: check the path/glob")
        for p in paths:
            records.extend(d for d in map(normalise, read_text_file_docs(p, doc_split, encoding_errors)) if d)
    if not records:
        raise EmptyCorpusError(f"the files matching {list(patterns)} contain no text")
    train, held, _ = dedupe_group_split(records, set(), 0, heldout_frac, heldout_min_bytes)
    return {"train": train, "heldout": held}


def register_text_files_task(
    name: str,
    patterns: str | Sequence[str],
    vocab_path: str | Path,
    *,
    doc_split: str = "blank",
    encoding_errors: str = "strict",
    heldout_frac: float = 0.005,
    heldout_min_bytes: int = 65536,
) -> seqio.Task:
    """A Task named `name` over text files (globs; `.jsonl` files: one {"text": ...} per line). The
    files are read (and checked for UTF-8) when the dataset is first iterated."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)

    @functools.lru_cache(maxsize=1)
    def docs():
        return text_files_docs(patterns, doc_split, encoding_errors, heldout_frac, heldout_min_bytes)

    return _register_task(name, _generator_source(lambda split: iter(docs()[split]), SPLITS), vocab_path)


def register_c4_task(
    vocab_path: str | Path, name: str = "c4_en", tfds_name: str = "c4/en:3.0.1", tfds_data_dir: str | None = None
) -> seqio.Task:
    """C4 (English) through TFDS with splits "train" and "heldout" (= C4's validation). Needs the TFDS
    data prepared on a machine with internet (`tfds build c4/en`, hundreds of GB); not run in the tests."""
    source = seqio.TfdsDataSource(
        tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, splits={"train": "train", "heldout": "validation"}
    )
    return _register_task(name, source, vocab_path)


def packed_dataset(
    name: str,
    seq_len: int,
    split: str = "train",
    *,
    shuffle: bool = False,
    seed: int | None = None,
    num_epochs: int | None = 1,
) -> tf.data.Dataset:
    """A registered Task/Mixture packed with seqio's DecoderFeatureConverter(pack=True)."""
    return seqio.get_dataset(
        name,
        task_feature_lengths={"targets": seq_len},
        dataset_split=split,
        shuffle=shuffle,
        seed=seed,
        num_epochs=num_epochs,
        feature_converter=seqio.DecoderFeatureConverter(pack=True),
    )


def iter_packed_rows(
    name: str, seq_len: int, split: str = "train", max_rows: int | None = None, **kw
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(decoder_target_tokens, decoder_segment_ids) rows of `packed_dataset`, as numpy."""
    ds = packed_dataset(name, seq_len, split, **kw)
    if max_rows:
        ds = ds.take(max_rows)
    for ex in ds.as_numpy_iterator():
        yield ex["decoder_target_tokens"], ex["decoder_segment_ids"]


def _materialise_split(
    name: str, split: str, seq_len: int, max_rows: int | None, sp, dtype, byte_table, tmp: Path, progress: bool
) -> dict:
    """Pack one split of a Task/Mixture through seqio and write it under `tmp`. Returns the split's meta."""
    from tqdm import tqdm

    from moe_jax.data.cache import write_split

    toks, segs = [], []
    for t, s in tqdm(
        iter_packed_rows(name, seq_len, split, max_rows),
        desc=f"seqio {split}",
        unit="row",
        disable=not progress,
        leave=False,
    ):
        toks.append(t.astype(dtype))
        segs.append(s.astype(np.uint16))
    tok = np.stack(toks) if toks else np.zeros((0, seq_len), dtype)
    seg = np.stack(segs) if segs else np.zeros((0, seq_len), np.uint16)
    n_tok = int((tok != 0).sum())
    stats = {
        "docs": int((tok == sp.eos_id()).sum()),
        "rows": int(tok.shape[0]),
        "tokens": n_tok,
        "utf8_bytes": int(byte_table[tok].sum()) if tok.size else 0,
    }
    stats["token_bytes"] = stats["utf8_bytes"]
    return write_split(tmp, split, [(name, tok, seg, stats)], seq_len, dtype, byte_table)


def materialise(
    name: str,
    cache_dir: str | Path,
    seq_len: int,
    vocab_path: str | Path,
    splits: Sequence[str] = SPLITS,
    max_rows: int | None = None,
    progress: bool = True,
) -> dict:
    """Write a Task/Mixture's packed rows (via seqio) in the cache format `TokenLoader` reads."""
    import shutil

    from moe_jax.data import vocab as vocab_mod
    from moe_jax.data.cache import FORMAT_VERSION, META, token_dtype
    from moe_jax.data.store import write_array

    cache_dir, vocab_path = Path(cache_dir), Path(vocab_path).resolve()
    sp = vocab_mod.load(vocab_path)
    dtype = token_dtype(sp.get_piece_size())
    byte_table = np.asarray(vocab_mod.token_byte_lengths(sp), dtype=np.int64)
    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    t0 = time.time()
    out = {}
    for split in splits:
        out[split] = _materialise_split(name, split, seq_len, max_rows, sp, dtype, byte_table, tmp, progress)
    if out.get("train", {}).get("rows", 1) == 0:
        raise EmptyCorpusError(f"seqio task {name} produced no training rows")
    write_array(tmp / "token_bytes", byte_table)
    vocab_sha = vocab_mod.file_sha256(vocab_path)
    meta = {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "corpus_fingerprint": f"seqio:{name}",
        "vocab_sha256": vocab_sha,
        "name": cache_dir.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "build_seconds": round(time.time() - t0, 1),
        "corpus_dir": None,
        "vocab": {
            "path": str(vocab_path),
            "sha256": vocab_sha,
            "size": sp.get_piece_size(),
            "pad_id": sp.pad_id(),
            "eos_id": sp.eos_id(),
            "unk_id": sp.unk_id(),
        },
        "dtype": np.dtype(dtype).name,
        "packing": "seqio DecoderFeatureConverter(pack=True)",
        "builder": f"seqio:{name}" + (f" (first {max_rows} rows per split)" if max_rows else ""),
        "splits": out,
    }
    (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    os.replace(tmp, cache_dir)
    if progress:
        print(
            f"seqio cache: {cache_dir} ({out['train']['tokens'] / 1e6:.2f} M train tokens) in {time.time() - t0:.1f} s",
            file=sys.stderr,
        )
    return meta


__all__ = [
    "DataError",
    "register_corpus_tasks",
    "register_text_files_task",
    "register_c4_task",
    "packed_dataset",
    "iter_packed_rows",
    "materialise",
    "split_to_length",
    "output_features",
    "vocabulary",
]

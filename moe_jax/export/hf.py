"""Export a `moe-jax train` workdir to a Hugging Face layout, and import one back.

    export_hf("workdirs/ds_tiny", "hf/ds_tiny", dtype="bfloat16", shard_size=2 * 10**9)   # DeepSeek's layout
    export_hf("workdirs/ds_tiny", "hf/ds_tiny_tf", fmt="transformers")   # Qwen2Moe / Glm4Moe / LlamaForCausalLM
    import_hf("hf/ds_tiny", "workdirs/ds_tiny_again")      # -> config.gin + an orbax checkpoint

Formats (`FORMATS`): "hf" is DeepSeek's `DeepseekForCausalLM` (remote code); "transformers" is
transformers' native `Qwen2MoeForCausalLM` for softmax-routed MoE models, `Glm4MoeForCausalLM` for
sigmoid-scored ones (DeepSeek-V3's router, with its selection bias and groups) and `LlamaForCausalLM` for
dense ones (`layout.transformers_layout`). Import recognises all four by config.json's model_type.

Export streams: the parameters are read from the orbax checkpoint one stored chunk at a time through
tensorstore (`orbax_reader`), never restored as a whole. Shard files are laid out first (names, shapes
and offsets from the layout table, in HF order: embed, layers 0..L-1, norm, lm_head; at most
`shard_size` bytes each), then each chunk is decoded once and every part of every HF tensor it holds is
written into place through a memory map (`safetensors_io.ShardFile`). Host memory holds one checkpoint
chunk (the per-device shard of a sharded checkpoint, the whole array of a single-device one) and at
most one tensor's pages, whatever the model and shard sizes.

Import validates every expected tensor (names and shapes from `layout.plan` and config.json) before
reading any data, then builds the parameters in host memory, writes `config.gin` (the model rebuilt
from config.json + a run file) and an orbax checkpoint with a fresh optimizer state that
`moe-jax train` resumes from and `load_trained` restores.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.export import layout
from moe_jax.export.hf_config import gin_from_hf_config, to_hf_config
from moe_jax.export.hf_tokenizer import tokenizer_json, write_tokenizer
from moe_jax.export.layout import DEEPSEEK, Layout, LayoutError, TensorEntry
from moe_jax.export.orbax_reader import OrbaxParamReader, state_dir
from moe_jax.export.safetensors_io import DTYPES, ShardFile, dtype_code, load_tensor, read_header
from moe_jax.export.transformers_config import (
    MODEL_TYPES,
    gin_from_transformers_config,
    grouped_mm_aligned,
    to_transformers_config,
)

DEFAULT_SHARD_SIZE = 2 * 10**9
INDEX_FILE = "model.safetensors.index.json"
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": DTYPES["BF16"]}
TRAIN_MODULES = ("moe_jax.train.config", "moe_jax.parallel.mesh")
# --format: "hf" = DeepSeek's DeepseekForCausalLM (remote code), "transformers" = native Qwen2Moe / Glm4Moe / Llama.
FORMATS = ("hf", "transformers")
# Buffers some HF checkpoints carry that are recomputed, not learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ExportError(RuntimeError):
    """An export or import that cannot proceed; the message says what and how to fix it."""


class HFImportError(ExportError):
    """HF tensors missing, misshapen or of a bad dtype; the message names each with the expected shape."""


def _warn(msgs: list[str], msg: str) -> None:
    """Record a note for the result (the CLI prints them)."""
    msgs.append(msg)


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        dynamic_ncols=True,
        disable=not (progress and sys.stderr.isatty()),
    )


def abstract_param_shapes(model_cfg: ModelConfig, seed: int = 0) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of the model's parameters and selection bias (`layout.flat_model_shapes`), from
    an abstract (never materialised) model."""
    from flax import nnx

    from moe_jax.model.transformer import Transformer

    return layout.flat_model_shapes(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(seed))))


# ------------------------------------------------------------------------------------------------ export


@dataclasses.dataclass
class ExportResult:
    """What `export_hf` wrote.

    Attributes:
      out: the output directory.
      step: the checkpoint step exported.
      dtype: dtype of the tensors ("float32" or "bfloat16").
      architecture: the HF class of config.json (DeepseekForCausalLM, Qwen2MoeForCausalLM, Glm4MoeForCausalLM,
        LlamaForCausalLM).
      files: shard file names, in order.
      num_tensors, total_bytes: over all shards.
      max_block_bytes: the largest checkpoint chunk held at once (the read unit).
      max_tensor_bytes: the largest single HF tensor.
      tokenizer: the tokenizer model copied, or None.
      warnings: what the user should know (settings HF cannot express, a missing tokenizer).
    """

    out: Path
    step: int
    dtype: str
    architecture: str
    files: list[str]
    num_tensors: int
    total_bytes: int
    max_block_bytes: int
    max_tensor_bytes: int
    tokenizer: Path | None
    warnings: list[str]


def chunk_boxes(shape: tuple[int, ...], chunk: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """The boxes of a regular chunk grid over an array of `shape`, in C order."""
    ranges = [[slice(lo, min(lo + c, n)) for lo in range(0, n, c)] for n, c in zip(shape, chunk)]
    return [tuple(box) for box in itertools.product(*ranges)] if shape else [()]


def chunk_region(entry: TensorEntry, box: tuple[slice, ...]) -> tuple[tuple, tuple[slice, ...]] | None:
    """Where the checkpoint block `box` of our array meets HF tensor `entry`.

    Returns (index into the block giving the piece over the kept axes in our order, region of the HF
    tensor's unflattened view (`TensorSpec.hf_view_shape`) that the piece fills), or None when the block
    does not hold any of the tensor.
    """
    src = []
    for i, b in zip(entry.index, box):
        if isinstance(i, int):
            if not b.start <= i < b.stop:
                return None
            src.append(i - b.start)
        else:
            src.append(slice(None))
    kept = dict(zip(entry.spec.names, (box[a] for a in entry.spec.kept_axes)))
    return tuple(src), tuple(kept[n] for n in entry.spec.flat_names)


def plan_shards(entries: Sequence[TensorEntry], itemsize: int, shard_size: int) -> list[list[TensorEntry]]:
    """Greedy split of `entries` (in order) into shards of at most `shard_size` bytes (a tensor larger
    than that gets a shard of its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        n = math.prod(e.hf_shape) * itemsize
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def shard_file_names(count: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def export_warnings(model_cfg: ModelConfig, lay: Layout = DEEPSEEK) -> list[str]:
    """Settings of `model_cfg` that the `lay` architecture does not reproduce (export proceeds)."""
    out = []
    m = model_cfg.moe
    if m is None:
        return out
    if lay is not DEEPSEEK:
        if m.second_expert_policy == "random":
            out.append(
                "second_expert_policy='random' (GShard) is a training-time policy; transformers keeps all "
                "top-k choices, as our model does without an rng"
            )
        if lay.name in ("qwen2_moe", "glm4_moe") and not grouped_mm_aligned(model_cfg):
            out.append(
                f"d_model={model_cfg.d_model} / expert width {m.expert_dim} are not multiples of 8: torch's "
                f"grouped_mm (transformers' default MoE kernel) cannot run them, so config.json sets "
                f"experts_implementation='eager' (same results, slower on GPU)"
            )
        if lay.name == "llama":
            out.append(
                f"Dense-x{m.num_shared_experts} (shared experts only) is written as LlamaForCausalLM with "
                f"intermediate_size {m.num_shared_experts * m.expert_dim}; an import gives a dense model"
            )
        return out
    if m.dispatch == "capacity":
        out.append(
            "the model uses dispatch='capacity' (token dropping); DeepseekForCausalLM is dropless, so its "
            "logits differ wherever our model drops tokens"
        )
    if m.second_expert_policy == "random":
        out.append(
            "second_expert_policy='random' (GShard) is a training-time policy; HF inference keeps all top-k "
            "choices, as our model does without an rng"
        )
    if m.device_balance_alpha or m.router_z_loss_alpha:
        out.append(
            "the device-level balance loss and router z-loss have no HF config key; their factors are kept "
            "under config.json's 'moe_jax' block"
        )
    if not m.num_shared_experts:
        out.append("no shared experts (GShard/Switch layout): config.json has n_shared_experts: null")
    return out


def find_tokenizer(train_cfg, vocab_size: int) -> tuple[Path | None, dict, str | None]:
    """(SentencePiece model of the workdir's token cache or None, its special ids, a warning or None)."""
    from moe_jax.data.paths import default_cache
    from moe_jax.data.vocab import EOS_ID, PAD_ID, UNK_ID

    ids = {"pad_id": PAD_ID, "eos_id": EOS_ID, "unk_id": UNK_ID}
    cache = default_cache(train_cfg, vocab_size)
    meta_path = Path(cache) / "meta.json"
    if not meta_path.exists():
        return None, ids, f"no token cache at {cache} (meta.json missing): the tokenizer is not exported"
    vocab = json.loads(meta_path.read_text()).get("vocab", {})
    ids.update({k: vocab[k] for k in ids if k in vocab})
    path = Path(vocab.get("path", ""))
    if not path.is_file():
        return None, ids, f"the vocabulary {path} named by {meta_path} is missing: the tokenizer is not exported"
    return path, ids, None


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty `out` unless `overwrite` (then drop an earlier export's shards and index)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out={out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(
                f"{out} is not empty; pass --overwrite to write into it (an earlier export's shards are "
                f"replaced) or choose another --out"
            )
        for p in list(out.glob("model*.safetensors")) + list(out.glob("*.partial")) + [out / INDEX_FILE]:
            p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def layout_of_export(fmt: str, model_cfg: ModelConfig) -> Layout:
    """The layout `--format=fmt` writes `model_cfg` in (LayoutError if the model has none)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt!r} is not one of {FORMATS}")
    lay = DEEPSEEK if fmt == "hf" else layout.transformers_layout(model_cfg)
    layout.check_exportable(model_cfg, lay)
    return lay


def _write_consts(entries: Sequence[TensorEntry], file_of: dict, np_dtype, written: dict) -> None:
    """Fill the constant tensors (no counterpart among our arrays), e.g. Qwen2Moe's zero shared-expert gate."""
    for e in entries:
        if e.const is not None:
            file_of[e.hf_name].write(
                e.hf_name, tuple(slice(None) for _ in e.hf_shape), np.full(e.hf_shape, e.const.value, np_dtype)
            )
            written[e.hf_name] = math.prod(e.hf_shape)


def export_hf(
    workdir: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    dtype: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    bindings: Sequence[str] = (),
    fmt: str = "hf",
) -> ExportResult:
    """Write `workdir`'s checkpoint `step` (default: latest) to `out` in the layout of `fmt`.

    Everything that can refuse (the format, the dtype, the checkpoint's shapes, a non-empty `out`)
    is checked before the first file is written.

    Args:
      fmt: "hf" (DeepSeek's DeepseekForCausalLM) or "transformers" (Qwen2MoeForCausalLM for softmax-routed
        MoE models, Glm4MoeForCausalLM for sigmoid-scored ones, LlamaForCausalLM for dense ones; loads
        without remote code).
      workdir: a `moe-jax train` workdir (config.gin + checkpoints/).
      out: output directory: safetensors shards, model.safetensors.index.json, config.json, tokenizer.
      step: checkpoint step; None = latest.
      dtype: "float32" or "bfloat16"; None = the model's param_dtype (lossless).
      shard_size: maximum bytes of tensor data per shard.
      overwrite: replace an earlier export in `out`.
      bindings: gin bindings applied on top of config.gin (rarely needed).
    """
    from moe_jax.train.restore import parse_workdir_config

    workdir, out = Path(workdir), Path(out)
    model_cfg, train_cfg = parse_workdir_config(workdir, bindings)
    lay = layout_of_export(fmt, model_cfg)
    dtype = dtype or model_cfg.param_dtype
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype={dtype!r} is not one of {sorted(EXPORT_DTYPES)}")
    np_dtype = EXPORT_DTYPES[dtype]
    notes = []
    for msg in export_warnings(model_cfg, lay):
        _warn(notes, msg)

    directory, step = state_dir(workdir, step)
    reader = OrbaxParamReader(directory)
    expected = _checked_shapes(reader, model_cfg, directory, workdir)
    entries = layout.plan(model_cfg, expected, lay)
    shards = plan_shards(entries, np_dtype.itemsize, shard_size)

    spm_path, ids, tok_warning = find_tokenizer(train_cfg, model_cfg.vocab_size)
    tok_json = None if tok_warning else tokenizer_json(spm_path, ids["pad_id"])  # may refuse: before writing
    if tok_warning:
        _warn(notes, tok_warning)

    _prepare_out(out, overwrite)
    max_block = _stream_shards(reader, entries, expected, out, shards, np_dtype, step, progress)
    if tok_json is not None:
        write_tokenizer(out, spm_path, ids, train_cfg.seq_len, tok_json=tok_json)
    _write_config(out, model_cfg, lay, dtype, ids, seq_len=train_cfg.seq_len, step=step, workdir=workdir)
    names, total = _write_index(out, entries, shards, np_dtype)
    return ExportResult(
        out=out,
        step=step,
        dtype=dtype,
        architecture=lay.architecture,
        files=names,
        num_tensors=len(entries),
        total_bytes=total,
        max_block_bytes=max_block,
        max_tensor_bytes=max(math.prod(e.hf_shape) for e in entries) * np_dtype.itemsize,
        tokenizer=spm_path,
        warnings=notes,
    )


def _write_config(
    out: Path, model_cfg: ModelConfig, lay: Layout, dtype: str, ids: dict, *, seq_len: int, step: int, workdir: Path
) -> None:
    """config.json of the export: the layout's architecture, the special token ids, where it came from."""
    special = dict(
        max_position_embeddings=seq_len,
        bos_token_id=ids["pad_id"],
        eos_token_id=ids["eos_id"],
        pad_token_id=ids["pad_id"],
        extra={"step": step, "source_workdir": str(workdir.resolve())},
    )
    config = (
        to_hf_config(model_cfg, torch_dtype=dtype, **special)
        if lay is DEEPSEEK
        else to_transformers_config(model_cfg, dtype=dtype, **special)
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _checked_shapes(reader: OrbaxParamReader, model_cfg: ModelConfig, directory: Path, workdir: Path) -> dict:
    """The model's parameter shapes by path, after checking that the checkpoint holds exactly those."""
    expected = abstract_param_shapes(model_cfg)
    wrong = [
        f"{p}: checkpoint {reader.shape(p)}, config.gin's model {s}"
        for p, s in expected.items()
        if reader.shape(p) != s
    ]
    if wrong:
        raise ExportError(f"checkpoint {directory} does not match {workdir / 'config.gin'}:\n  " + "\n  ".join(wrong))
    return expected


def _write_index(out: Path, entries: Sequence[TensorEntry], shards: list[list[TensorEntry]], np_dtype):
    """Write the safetensors index (which shard holds each tensor); returns (shard file names, total bytes)."""
    names = shard_file_names(len(shards))
    total = sum(math.prod(e.hf_shape) for e in entries) * np_dtype.itemsize
    weight_map = {e.hf_name: name for name, shard in zip(names, shards) for e in shard}
    index = {
        "metadata": {"total_size": total, "format": "pt"},
        "weight_map": {k: weight_map[k] for k in sorted(weight_map)},
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names, total


def _stream_shards(
    reader: OrbaxParamReader,
    entries: Sequence[TensorEntry],
    expected: dict,
    out: Path,
    shards: list[list[TensorEntry]],
    np_dtype,
    step: int,
    progress: bool,
) -> int:
    """Lay out the shard files of `shards`, then read each checkpoint chunk once and write every part of
    every HF tensor it holds (scaled, cast to `np_dtype`), then the constants. On success the files
    appear under their names; on any error none does. Returns the largest chunk read (bytes)."""
    names = shard_file_names(len(shards))
    code = dtype_code(np_dtype)
    files = {
        name: ShardFile(
            out / name,
            [(e.hf_name, code, e.hf_shape) for e in shard],
            metadata={"format": "pt", "source": "moe_jax", "step": str(step)},
        )
        for name, shard in zip(names, shards)
    }
    file_of = {e.hf_name: files[name] for name, shard in zip(names, shards) for e in shard}
    by_array: dict[str, list[TensorEntry]] = {}
    for e in entries:
        if e.ours is not None:
            by_array.setdefault(e.ours, []).append(e)
    written = dict.fromkeys(file_of, 0)
    max_block = 0
    total = sum(math.prod(e.hf_shape) for e in entries) * np_dtype.itemsize
    try:
        with _bar(total, f"export step {step}", progress) as bar:
            for path, array_entries in by_array.items():
                shape = expected[path]
                for box in chunk_boxes(shape, reader.chunk_shape(path)):
                    hits = [(e, r) for e in array_entries if (r := chunk_region(e, box)) is not None]
                    if not hits:
                        continue
                    block = reader.read(path, box)  # one checkpoint chunk: the only large allocation
                    max_block = max(max_block, block.nbytes)
                    for e, (src, dst) in hits:
                        piece = e.spec.to_hf_view(block[src])
                        piece = (piece * np.asarray(e.scale, piece.dtype) if e.scale != 1 else piece).astype(np_dtype)
                        file_of[e.hf_name].write(e.hf_name, dst, piece, e.spec.hf_view_shape(shape))
                        written[e.hf_name] += piece.size
                        bar.update(piece.nbytes)
                        del piece
                    del block
        _write_consts(entries, file_of, np_dtype, written)
        holes = [e.hf_name for e in entries if written[e.hf_name] != math.prod(e.hf_shape)]
        if holes:  # a layout or chunk-grid bug, never silently zeros
            raise ExportError(f"export wrote {len(holes)} tensor(s) incompletely, e.g. {holes[:3]}")
        for f in files.values():
            f.close()
    except BaseException:
        for f in files.values():
            f.abort()
        raise
    return max_block


# ------------------------------------------------------------------------------------------------ import


def read_hf_dir(hf_dir: str | Path) -> tuple[dict, dict, list[str]]:
    """(config.json, {tensor name: TensorInfo}, problems) of an HF directory.

    Uses model.safetensors.index.json when present (a name it lists that its file lacks is reported
    as a problem), else every *.safetensors file.
    """
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.exists():
        raise ExportError(f"{cfg_path} not found: is {hf_dir} a Hugging Face model directory?")
    config = json.loads(cfg_path.read_text())
    problems: list[str] = []
    infos = {}
    index_path = hf_dir / INDEX_FILE
    if index_path.exists():
        weight_map = json.loads(index_path.read_text()).get("weight_map", {})
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            if not (hf_dir / file).exists():
                problems.append(f"{file}: missing (the index lists {len(names)} tensors in it, e.g. {names[0]})")
                continue
            found, _ = read_header(hf_dir / file)
            for name in names:
                if name in found:
                    infos[name] = found[name]
    else:
        files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            raise ExportError(f"no *.safetensors files (and no {INDEX_FILE}) in {hf_dir}")
        for file in files:
            infos.update(read_header(file)[0])
    return config, infos, problems


def validate_tensors(entries: Sequence[TensorEntry], infos: dict, problems: list[str] | None = None) -> list[str]:
    """Raise HFImportError naming every expected tensor that is missing, misshapen or not floating point
    (with the expected shape); return the names of unexpected extra tensors."""
    problems = list(problems or [])
    for e in entries:
        info = infos.get(e.hf_name)
        if info is None:
            problems.append(f"{e.hf_name}: missing (expected shape {list(e.hf_shape)})")
        elif info.shape != e.hf_shape:
            problems.append(
                f"{e.hf_name}: shape {list(info.shape)} in {info.path.name}, expected shape {list(e.hf_shape)}"
            )
        elif not np.issubdtype(info.dtype, np.floating) and info.dtype != DTYPES["BF16"]:
            problems.append(
                f"{e.hf_name}: dtype {info.dtype} in {info.path.name}, expected a float type "
                f"(expected shape {list(e.hf_shape)})"
            )
    if problems:
        shown = problems[:25]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise HFImportError(f"{len(problems)} tensor problem(s); nothing was written:\n  " + "\n  ".join(shown) + more)
    expected = {e.hf_name for e in entries}
    return sorted(n for n in infos if n not in expected and not n.endswith(_IGNORED_SUFFIXES))


def check_consts(entries: Sequence[TensorEntry], infos: dict) -> None:
    """Raise HFImportError naming every checked constant tensor (e.g. Qwen2Moe's shared_expert_gate of a
    layer with shared experts) that does not hold its value: our model has no such parameter."""
    bad = []
    for e in entries:
        if e.const is not None and e.const.checked:
            values = load_tensor(infos[e.hf_name]).astype(np.float32)
            if not np.all(values == e.const.value):
                bad.append(
                    f"{e.hf_name}: max |value - {e.const.value:g}| = "
                    f"{float(np.max(np.abs(values - e.const.value))):.3g}"
                )
    if bad:
        why = []
        if any("shared_expert_gate" in b for b in bad):
            why.append(
                "Qwen2Moe's shared expert is scaled by sigmoid(shared_expert_gate(x)); our shared experts are "
                "always on (gate weight 1), which a zero gate weight (factor 1/2, undone by the down projection) "
                "expresses exactly. An input-dependent gate has no equivalent here."
            )
        if any("e_score_correction_bias" in b for b in bad):
            why.append(
                "config.json's moe_jax block says the model has no selection bias (selection_bias: false), "
                "but its e_score_correction_bias is not zero: remove `selection_bias` from that block to "
                "import the bias (MoEConfig.selection_bias=True)."
            )
        raise HFImportError(
            f"{len(bad)} tensor(s) do not hold the constant our model needs to express the checkpoint; "
            f"nothing was written:\n  " + "\n  ".join(bad[:25]) + "\n" + " ".join(why)
        )


def config_layout(config: dict) -> tuple[Layout, str, list[str]]:
    """(layout, architecture gin file, bindings) of an HF config.json, by its model_type."""
    kind = config.get("model_type")
    if kind == "deepseek":
        return (DEEPSEEK, *gin_from_hf_config(config))
    if kind in MODEL_TYPES:
        return (MODEL_TYPES[kind], *gin_from_transformers_config(config))
    raise LayoutError(
        f"config.json has model_type {kind!r}; import reads 'deepseek' (DeepseekForCausalLM), "
        f"'qwen2_moe' (Qwen2MoeForCausalLM), 'glm4_moe' (Glm4MoeForCausalLM) and 'llama' (LlamaForCausalLM)"
    )


@dataclasses.dataclass
class ImportResult:
    """What `import_hf` wrote.

    Attributes:
      workdir: the new workdir (config.gin, checkpoints/<step>, imported_from.json).
      step: the checkpoint's step.
      model_cfg: the model.
      num_tensors: HF tensors read.
      warnings: what the user should know (unused tensors, tokenizer or data-cache mismatch).
    """

    workdir: Path
    step: int
    model_cfg: ModelConfig
    num_tensors: int
    warnings: list[str]


def _fresh_data_state(train_cfg, vocab_size: int, hf_dir: Path, notes: list[str]) -> dict:
    """The data-loader position a fresh `moe-jax train` run would start from (and tokenizer checks)."""
    from moe_jax.data.loader import TokenLoader
    from moe_jax.data.paths import default_cache
    from moe_jax.data.vocab import file_sha256

    cache = default_cache(train_cfg, vocab_size)
    try:
        loader = TokenLoader(cache, "train", train_cfg.batch_size, train_cfg.seq_len, seed=train_cfg.data_order_seed)
    except Exception as err:  # the loader raises DataError/SeqLenError/OSError for a missing or odd cache
        _warn(
            notes,
            f"cannot open the token cache {cache} ({type(err).__name__}: {err}); the checkpoint's data "
            f"position is empty, so `moe-jax train` cannot resume it until the cache exists and a loader "
            f"position is written (evaluation and load_trained work)",
        )
        return {}
    vocab = loader.meta.get("vocab", {})
    if int(vocab.get("size", vocab_size)) != vocab_size:
        _warn(notes, f"the token cache {cache} has vocabulary size {vocab.get('size')}, the model {vocab_size}")
    tok = hf_dir / "tokenizer.model"
    if tok.exists() and vocab.get("sha256") and file_sha256(tok) != vocab["sha256"]:
        _warn(
            notes,
            f"{tok} differs from the vocabulary of the token cache {cache} ({vocab.get('path')}): training "
            f"or evaluating on that cache uses another tokenizer than the one the model was trained with",
        )
    return loader.get_state()


def _read_arrays(entries: Sequence[TensorEntry], infos: dict, shapes: dict, pdtype, progress: bool) -> dict:
    """{our path: array [shape] of `pdtype`} filled from the HF tensors of `entries` (host memory), each
    piece transposed back and divided by its row's scale."""
    arrays = {path: np.zeros(shape, pdtype) for path, shape in shapes.items()}
    filled = dict.fromkeys(shapes, 0)
    entries = [e for e in entries if e.ours is not None]
    with _bar(sum(infos[e.hf_name].nbytes for e in entries), "import", progress) as bar:
        for e in entries:
            info = infos[e.hf_name]
            piece = e.spec.from_hf(load_tensor(info), shapes[e.ours]).astype(pdtype)
            if e.scale != 1:
                piece = piece * np.asarray(1 / e.scale, pdtype)  # a power of two: exact
            arrays[e.ours][e.index] = piece
            filled[e.ours] += piece.size
            bar.update(info.nbytes)
    unfilled = [p for p, n in filled.items() if n != math.prod(shapes[p])]
    if unfilled:  # a layout-table bug, not a user error
        raise LayoutError(f"the layout did not fill our arrays {unfilled}")
    return arrays


def import_hf(
    hf_dir: str | Path,
    workdir: str | Path,
    *,
    gin_files: Sequence[str] = ("runs/proxy_cpu.gin",),
    bindings: Sequence[str] = (),
    step: int | None = None,
    progress: bool = True,
) -> ImportResult:
    """Read an HF directory into a new `moe-jax train` workdir.

    Args:
      hf_dir: config.json + safetensors (+ index): DeepSeek's layout (model_type "deepseek"), or
        transformers' Qwen2MoeForCausalLM ("qwen2_moe") / Glm4MoeForCausalLM ("glm4_moe") /
        LlamaForCausalLM ("llama"), as our export or
        transformers' `save_pretrained` writes them (one expert per tensor).
      workdir: the new workdir; must not hold checkpoints yet.
      gin_files: run file(s) giving the training setup (TrainConfig) of the workdir.
      bindings: gin bindings applied last (e.g. "TRAIN_STEPS=1000").
      step: checkpoint step; None = the step recorded by our export (config.json moe_jax.step), else 0.
    """
    import jax
    import jax.numpy as jnp

    import gin
    from moe_jax.configs.gin_utils import parse_gin
    from moe_jax.export.orbax_reader import checkpoint_steps
    from moe_jax.parallel import MeshConfig, build_mesh
    from moe_jax.train.checkpoint import Checkpointer
    from moe_jax.train.config import TrainConfig
    from moe_jax.train.state import build_train_state

    hf_dir, workdir = Path(hf_dir), Path(workdir)
    notes: list[str] = []
    config, infos, problems = read_hf_dir(hf_dir)
    lay, arch, hf_bindings = config_layout(config)
    parse_gin([arch, *gin_files], [*hf_bindings, *bindings], modules=TRAIN_MODULES)
    model_cfg, train_cfg = ModelConfig(), TrainConfig()
    gin_text = gin.config_str()
    layout.check_exportable(model_cfg, lay)

    built = build_train_state(model_cfg, train_cfg, build_mesh(MeshConfig()))  # as `load_trained` reads it back
    abstract_params, abstract_bias = built.abstract.params, built.abstract.router_bias
    shapes = layout.flat_param_shapes(abstract_params)
    if abstract_bias is not None:  # DeepSeek-V3's selection bias (Glm4Moe's e_score_correction_bias)
        shapes |= layout.flat_param_shapes(abstract_bias)
    entries = layout.plan(model_cfg, shapes, lay)
    extra = validate_tensors(entries, infos, problems)
    check_consts(entries, infos)
    if extra:
        _warn(notes, f"{len(extra)} tensor(s) of {hf_dir} are not part of the model and were ignored, e.g. {extra[:3]}")
    if checkpoint_steps(workdir):
        raise ExportError(f"{workdir} already has checkpoints {checkpoint_steps(workdir)}; import into a new workdir")
    if step is None:
        step = int((config.get("moe_jax") or {}).get("step", 0))

    arrays = _read_arrays(entries, infos, shapes, np.dtype(jnp.dtype(model_cfg.param_dtype)), progress)

    def value(path, leaf):
        return jnp.asarray(arrays.pop(layout.path_str(path)))

    params = jax.tree_util.tree_map_with_path(value, abstract_params)
    bias = None if abstract_bias is None else jax.tree_util.tree_map_with_path(value, abstract_bias)
    state = built.from_params(params, step, router_bias=bias)

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.gin").write_text(gin_text)
    data_state = _fresh_data_state(train_cfg, model_cfg.vocab_size, hf_dir, notes)
    ckpt = Checkpointer(workdir, keep=train_cfg.keep_checkpoints, async_save=False)
    ckpt.save(step, state, data_state)
    ckpt.close()
    (workdir / "imported_from.json").write_text(
        json.dumps(
            {
                "hf_dir": str(hf_dir.resolve()),
                "step": step,
                "gin_files": list(gin_files),
                "bindings": list(bindings),
                "warnings": notes,
            },
            indent=2,
        )
        + "\n"
    )
    return ImportResult(workdir=workdir, step=step, model_cfg=model_cfg, num_tensors=len(entries), warnings=notes)

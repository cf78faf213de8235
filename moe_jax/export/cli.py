"""`moe-jax export` and `moe-jax import`: Hugging Face layouts <-> a `moe-jax train` workdir.

    moe-jax export --workdir=workdirs/ds_tiny [--step=N] --format=transformers --out=hf/ds_tiny \\
        [--dtype=bfloat16] [--shard_size=2GB] [--overwrite]

--format=transformers writes transformers' native Qwen2MoeForCausalLM (softmax-routed MoE),
Glm4MoeForCausalLM (sigmoid-scored MoE) or LlamaForCausalLM (dense): AutoModelForCausalLM / AutoTokenizer
load it without remote code. --format=hf (the default) writes DeepSeek's DeepseekForCausalLM layout
(loaded with DeepSeek's remote code). Import reads all four:

    moe-jax import --hf=hf/ds_tiny --workdir=workdirs/ds_tiny_imported \\
        [--gin_file=runs/proxy_cpu.gin] [--gin.KEY=VALUE ...] [--step=N]

Then `moe-jax train --workdir=OUT --gin_file=OUT/config.gin` continues training the imported model.
See docs/export.md.
"""

from __future__ import annotations

import argparse
import re
import sys

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """ "2GB" / "500MB" / "1GiB" / "1e9" -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 2GB, 500MB, 1GiB, 1e9)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def export_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="moe-jax export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", required=True, help="a `moe-jax train` workdir (config.gin + checkpoints)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument(
        "--format",
        default="hf",
        choices=["hf", "transformers"],
        help="output layout: hf = DeepSeek's DeepseekForCausalLM (remote code); transformers = native "
        "Qwen2MoeForCausalLM (softmax MoE) / Glm4MoeForCausalLM (sigmoid MoE) / LlamaForCausalLM (dense)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="tensor dtype (default: the model's param_dtype, i.e. lossless)",
    )
    p.add_argument("--shard_size", type=parse_size, default="2GB", help="max bytes per safetensors shard (2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from moe_jax.export.hf import ExportError, export_hf
    from moe_jax.export.hf_tokenizer import TokenizerExportError
    from moe_jax.export.layout import LayoutError
    from moe_jax.export.orbax_reader import CheckpointReadError
    from moe_jax.train.checkpoint import CheckpointError

    try:
        res = export_hf(
            args.workdir,
            args.out,
            step=args.step,
            dtype=args.dtype,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            fmt=args.format,
        )
    except (ExportError, LayoutError, CheckpointReadError, CheckpointError, TokenizerExportError) as err:
        print(f"moe-jax export: {err}", file=sys.stderr)
        return 1
    print(
        f"exported step {res.step} of {args.workdir} to {res.out} as {res.architecture}: {res.num_tensors} tensors, "
        f"{res.total_bytes / 1e6:,.1f} MB {res.dtype} in {len(res.files)} shard(s); tokenizer "
        f"{'copied' if res.tokenizer else 'not found'}"
    )
    for w in res.warnings:
        print(f"  note: {w}")
    return 0


def import_main(argv: list[str] | None = None) -> int:
    from moe_jax.configs.gin_utils import GinConfigError, command_gin_args

    gin_args = command_gin_args("moe-jax import", argv)
    if gin_args is None:
        return 2
    p = argparse.ArgumentParser(
        prog="moe-jax import", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--hf",
        required=True,
        help="HF directory (config.json + safetensors [+ index]) of a "
        "DeepseekForCausalLM, Qwen2MoeForCausalLM, Glm4MoeForCausalLM or LlamaForCausalLM",
    )
    p.add_argument("--workdir", required=True, help="new workdir to create")
    p.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: the step our export recorded, else 0)"
    )
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(list(gin_args.rest))

    from moe_jax.export.hf import ExportError, import_hf
    from moe_jax.export.layout import LayoutError
    from moe_jax.export.safetensors_io import SafetensorsError

    try:
        res = import_hf(
            args.hf,
            args.workdir,
            gin_files=gin_args.gin_files or ("runs/proxy_cpu.gin",),
            bindings=gin_args.bindings,
            step=args.step,
            progress=not args.no_progress,
        )
    except (ExportError, LayoutError, SafetensorsError, GinConfigError) as err:
        print(f"moe-jax import: {err}", file=sys.stderr)
        return 1
    print(
        f"imported {res.num_tensors} tensors from {args.hf} into {res.workdir} (checkpoint step {res.step}); "
        f"continue with: moe-jax train --workdir={res.workdir} --gin_file={res.workdir}/config.gin"
    )
    for w in res.warnings:
        print(f"  note: {w}")
    return 0

"""Peak host memory of `moe-jax export` on a DeepSeekMoE 2B checkpoint (issue 10, item 3).

    python benchmarks/export_memory.py [--dir /tmp/moe_jax_export_bench] [--dtype bfloat16] [--shard_size 1GB] [--keep]

1. `write` (a subprocess): the 2B model (gin/models/deepseekmoe_2b.gin, 2.0B parameters, 8 GB in float32)
   is initialised abstractly (`nnx.eval_shape`) and its parameters are written array by array, chunk by
   chunk, straight into orbax's on-disk format (an OCDBT store of zarr arrays named
   `params.<path>.value` under `checkpoints/0/state`), chunked as orbax saves a state sharded by our
   rules on the golden 2B mesh (data 2 x fsdp 4: every weight matrix split 4 ways along d_model).
   Values are N(0, 0.006) (norm scales 1 + noise). No optimizer state is written: export reads params only.
2. `export` (a fresh subprocess): `export_hf` to `--dtype` safetensors shards of at most `--shard_size`;
   reports the peak resident set (VmHWM) against the baseline after imports, the largest stored chunk
   and the shard size, then spot-checks tensors against the checkpoint.
3. Everything written is deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

MESH = "data:2,fsdp:4"


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def write_checkpoint(workdir: Path) -> dict:
    import numpy as np
    import tensorstore as ts
    from flax import nnx

    import gin
    from moe_jax.config import ModelConfig
    from moe_jax.configs.gin_utils import model_gin_path, parse_gin
    from moe_jax.export.hf import chunk_boxes
    from moe_jax.export.layout import flat_params
    from moe_jax.model.transformer import Transformer
    from moe_jax.parallel import MeshConfig, build_mesh, state_shardings

    parse_gin(
        [model_gin_path("deepseekmoe_2b"), "runs/pretrain_2b.gin"],
        modules=("moe_jax.train.config", "moe_jax.parallel.mesh"),
    )
    cfg = ModelConfig()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.gin").write_text(gin.config_str())
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
    shardings = flat_params(state_shardings(abstract, build_mesh(MeshConfig.from_string(MESH))))
    state = workdir / "checkpoints" / "0" / "state"
    state.mkdir(parents=True)
    context = ts.Context()
    rng = np.random.default_rng(0)
    total = 0
    t0 = time.time()
    for path, leaf in flat_params(abstract).items():
        shape = tuple(leaf.shape)
        chunk = tuple(shardings[path].shard_shape(shape))
        arr = ts.open(
            {
                "driver": "zarr",
                "kvstore": {"driver": "ocdbt", "base": f"file://{state}/", "path": f"params.{path}.value"},
                "metadata": {
                    "shape": list(shape),
                    "chunks": list(chunk),
                    "dtype": "<f4",
                    "compressor": {"id": "zstd", "level": 1},
                },
            },
            create=True,
            context=context,
        ).result()
        for box in chunk_boxes(shape, chunk):
            block_shape = tuple(b.stop - b.start for b in box)
            values = 0.006 * rng.standard_normal(block_shape, dtype=np.float32)
            if path.endswith("scale"):
                values += 1.0
            arr[box].write(values).result()
            del values
        total += math.prod(shape)
        print(f"  wrote {path} {shape} in chunks {chunk}", flush=True)
    return {"params": total, "seconds": round(time.time() - t0, 1)}


def export_and_measure(workdir: Path, out: Path, dtype: str, shard_size: int) -> dict:
    import jax  # noqa: F401  (the export imports it; count it in the baseline)
    import numpy as np
    from flax import nnx  # noqa: F401

    from moe_jax.export.hf import abstract_param_shapes, export_hf, read_hf_dir
    from moe_jax.export.layout import plan
    from moe_jax.export.orbax_reader import OrbaxParamReader, state_dir
    from moe_jax.export.safetensors_io import load_tensor
    from moe_jax.train.restore import parse_workdir_config

    baseline = _rss_kib("VmRSS")
    t0 = time.time()
    res = export_hf(workdir, out, dtype=dtype, shard_size=shard_size, progress=True)
    seconds = time.time() - t0
    peak = _rss_kib("VmHWM")
    sizes = [(out / f).stat().st_size for f in res.files]

    # Spot checks: a few HF tensors equal the checkpoint's values through the layout table.
    model_cfg, _ = parse_workdir_config(workdir)
    reader = OrbaxParamReader(state_dir(workdir)[0])
    entries = {e.hf_name: e for e in plan(model_cfg, abstract_param_shapes(model_cfg))}
    _, infos, _ = read_hf_dir(out)
    checked = []
    for name in (
        "model.layers.4.mlp.experts.37.up_proj.weight",
        "model.layers.8.self_attn.q_proj.weight",
        "model.layers.0.mlp.shared_experts.down_proj.weight",
        "lm_head.weight",
    ):
        e = entries[name]
        want = e.spec.to_hf(reader.read(e.ours, e.index)).astype(infos[name].dtype)
        assert np.array_equal(load_tensor(infos[name]), want), name
        checked.append(name)
    return {
        "dtype": dtype,
        "shard_size": shard_size,
        "files": len(res.files),
        "largest_file": max(sizes),
        "total_bytes": res.total_bytes,
        "max_chunk_bytes": res.max_block_bytes,
        "max_tensor_bytes": res.max_tensor_bytes,
        "baseline_rss": baseline * 1024,
        "peak_rss": peak * 1024,
        "seconds": round(seconds, 1),
        "spot_checked": checked,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/moe_jax_export_bench")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--shard_size", default="1GB")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the export")
    p.add_argument("--step", choices=["all", "write", "export"], default="all", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    root = Path(args.dir)
    workdir, out = root / "wd", root / f"hf_{args.dtype}"
    from moe_jax.export.cli import parse_size

    if args.step == "write":
        print(json.dumps(write_checkpoint(workdir)))
        return 0
    if args.step == "export":
        print("RESULT " + json.dumps(export_and_measure(workdir, out, args.dtype, parse_size(args.shard_size))))
        return 0

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    me = [
        sys.executable,
        str(Path(__file__).resolve()),
        f"--dir={root}",
        f"--dtype={args.dtype}",
        f"--shard_size={args.shard_size}",
    ]
    try:
        if not (workdir / "checkpoints" / "0" / "state").exists():
            shutil.rmtree(root, ignore_errors=True)
            print(f"writing a DeepSeekMoE 2B checkpoint (float32, chunked as on mesh {MESH}) to {workdir} ...")
            subprocess.run(me + ["--step=write"], env=env, check=True)
        shutil.rmtree(out, ignore_errors=True)
        print(f"exporting to {out} ...")
        proc = subprocess.run(
            me + ["--step=export"], env={**env, "XLA_FLAGS": ""}, check=True, stdout=subprocess.PIPE, text=True
        )
        result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    gb = lambda n: f"{n / 1e9:.2f} GB"
    print(json.dumps(result, indent=2))
    print(
        f"\nDeepSeekMoE 2B -> {result['dtype']} safetensors: {result['files']} shards of <= {gb(result['shard_size'])} "
        f"(largest file {gb(result['largest_file'])}), {gb(result['total_bytes'])} in {result['seconds']} s"
    )
    print(
        f"peak RSS {gb(result['peak_rss'])} = baseline after imports {gb(result['baseline_rss'])} "
        f"+ {gb(result['peak_rss'] - result['baseline_rss'])}; largest stored chunk {gb(result['max_chunk_bytes'])}, "
        f"largest tensor {gb(result['max_tensor_bytes'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

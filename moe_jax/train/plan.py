"""`moe-jax plan`: compile one training step ahead of time on a mesh of fake devices and report the
per-device memory it needs, without allocating a single weight.

    moe-jax plan --model=deepseekmoe_16b --gin_file=runs/pretrain_16b.gin --mesh=data:2,expert:4
    moe-jax plan --model=deepseekmoe_145b --gin_file=runs/pretrain_145b.gin \\
        --mesh=fsdp:16,expert:4 --batch_size=64 [--memory_gb=80] [--json]

The command sets up as many CPU devices as the mesh has (XLA_FLAGS, before jax is imported), builds
the abstract model, optimizer state and batch with the shardings of `moe_jax.parallel.rules`, and
lowers + compiles the trainer's step with them; state, shardings and jitted step come from
`moe_jax.train.state`, the builder the trainer uses. It prints, per device: parameters and optimizer
state (exact, from the shard shapes), the compiled program's arguments, outputs and temporaries
(XLA's estimate), the resulting peak, and whether it fits `--memory_gb`.

The temporaries are XLA:CPU's estimate for the CPU kernels (e.g. the chunked grouped matmul); a GPU
compile differs, so treat them as an order of magnitude. Exit status: 0 fits, 1 does not fit,
2 bad configuration (with the offending sizes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Sequence

GIB = 1024**3
PLAN_MODULES = ("moe_jax.train.config", "moe_jax.parallel.mesh")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one training step on a mesh."""

    mesh: dict
    batch_size: int
    seq_len: int
    params: int
    opt_state: int
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    compile_seconds: float

    @property
    def peak(self) -> int:
        """Arguments + temporaries + outputs that do not reuse a donated argument buffer."""
        return self.arguments + self.temporaries + max(self.outputs - self.aliased, 0)

    def fits(self, memory_bytes: float) -> bool:
        return self.peak <= memory_bytes


def _mesh_devices(spec: str) -> int:
    from moe_jax.parallel.mesh import MeshConfig

    sizes = MeshConfig.from_string(spec).sizes()
    if -1 in sizes.values():
        raise ValueError(f"--mesh={spec!r}: give every axis size explicitly (no -1) so the device count is known")
    return math.prod(sizes.values())


def _ensure_devices(n: int) -> None:
    """Make `n` CPU devices available. XLA_FLAGS is read when jax's backend starts (the first device
    query), so this works after `import jax` as long as nothing has asked for devices yet."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    import jax

    try:
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:  # a backend already started: use the devices it has
        pass
    if jax.device_count() < n:
        raise ValueError(
            f"the mesh needs {n} devices but jax already started with {jax.device_count()}; "
            f"run `moe-jax plan` in a fresh process"
        )


def _bytes(tree: Any, shardings: Any) -> int:
    """Per-device bytes of abstract arrays `tree` laid out by `shardings` (same structure)."""
    import jax
    import numpy as np

    leaves, sh = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    return sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize for a, s in zip(leaves, sh))


def lower_step(model_cfg, train_cfg, mesh):
    """The trainer's step for `model_cfg` / `train_cfg` on `mesh`, lowered on abstract inputs (nothing is
    allocated but the small non-parameter state). Returns (the `ShardedTrainState`, the `jax.stages.Lowered`).
    State, shardings and jitted step come from `moe_jax.train.state`, as in `moe_jax.train.loop.train`."""
    from moe_jax.train.state import build_train_state

    built = build_train_state(model_cfg, train_cfg, mesh, global_batch=train_cfg.batch_size, num_devices=mesh.size)
    return built, built.lower_train_step(built.rest(), train_cfg.batch_size, train_cfg.seq_len)


def plan_step(model_cfg, train_cfg, mesh) -> MemoryPlan:
    """Lower and compile the trainer's step for `model_cfg` / `train_cfg` on `mesh` (abstract inputs)."""
    t0 = time.perf_counter()
    built, lowered = lower_step(model_cfg, train_cfg, mesh)
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0  # building the abstract state (fractions of a second), lowering, compiling
    mem = compiled.memory_analysis()
    return MemoryPlan(
        mesh=dict(mesh.shape),
        batch_size=train_cfg.batch_size,
        seq_len=train_cfg.seq_len,
        params=_bytes(built.abstract.params, built.shardings.params),
        opt_state=_bytes(built.abstract.opt_state, built.shardings.opt_state),
        arguments=int(mem.argument_size_in_bytes),
        outputs=int(mem.output_size_in_bytes),
        aliased=int(mem.alias_size_in_bytes),
        temporaries=int(mem.temp_size_in_bytes),
        compile_seconds=seconds,
    )


def format_plan(plan: MemoryPlan, memory_gb: float, model: str) -> str:
    g = lambda n: f"{n / GIB:9.2f} GiB"
    mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh.items())
    verdict = "fits" if plan.fits(memory_gb * GIB) else "does NOT fit"
    return "\n".join(
        [
            f"{model} on {mesh} ({math.prod(plan.mesh.values())} devices), batch {plan.batch_size} x {plan.seq_len}",
            f"  parameters       {g(plan.params)}  per device",
            f"  optimizer state  {g(plan.opt_state)}  per device",
            f"  step arguments   {g(plan.arguments)}  (parameters + optimizer state + batch)",
            f"  step outputs     {g(plan.outputs)}  ({g(plan.aliased).strip()} reuse donated arguments)",
            f"  temporaries      {g(plan.temporaries)}  (XLA:CPU estimate: activations, gradients, buffers)",
            f"  peak             {g(plan.peak)}  -> {verdict} in {memory_gb:g} GiB",
            f"  compiled in {plan.compile_seconds:.1f} s",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-jax plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mesh", required=True, help="mesh axes with explicit sizes, e.g. data:2,expert:4")
    p.add_argument("--memory_gb", type=float, default=80.0, help="device memory in GiB (default 80)")
    p.add_argument("--batch_size", type=int, default=None, help="global batch (default: the run's BATCH_SIZE)")
    p.add_argument("--seq_len", type=int, default=None, help="sequence length (default: the run's SEQ_LEN)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from moe_jax.configs.gin_utils import GinConfigError, parse_gin, split_gin_args

    try:
        gin_args = split_gin_args(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(list(gin_args.rest))
        if not gin_args.gin_files:
            raise ValueError("give a model (--model=NAME or --gin_file=gin/models/NAME.gin) and usually a run file")
        n = _mesh_devices(args.mesh)
        _ensure_devices(n)
        parse_gin(gin_args.gin_files, gin_args.bindings, modules=PLAN_MODULES)
        import jax

        from moe_jax.config import ModelConfig
        from moe_jax.parallel.mesh import MeshConfig, build_mesh
        from moe_jax.train.config import TrainConfig

        model_cfg = ModelConfig()
        overrides = {k: v for k, v in (("batch_size", args.batch_size), ("seq_len", args.seq_len)) if v}
        train_cfg = dataclasses.replace(TrainConfig(), **overrides)
        mesh = build_mesh(MeshConfig.from_string(args.mesh), jax.devices()[:n])
        plan = plan_step(model_cfg, train_cfg, mesh)
    except (GinConfigError, ValueError, TypeError) as err:
        print(f"moe-jax plan: {err}", file=sys.stderr)
        return 2
    model = ", ".join(os.path.basename(f) for f in gin_args.gin_files)
    fits = plan.fits(args.memory_gb * GIB)
    if args.json:
        print(
            json.dumps(
                {
                    **dataclasses.asdict(plan),
                    "peak": plan.peak,
                    "memory_gb": args.memory_gb,
                    "fits": fits,
                    "model": model,
                }
            )
        )
    else:
        print(format_plan(plan, args.memory_gb, model))
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())

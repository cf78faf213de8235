"""`moe-jax train`: train a gin-configured model, T5X style.

    moe-jax train --model=deepseekmoe_tiny --gin_file=runs/proxy_cpu.gin --workdir=workdirs/ds_tiny \\
        [--gin.KEY=VALUE ...] [--mesh=data:2,expert:4] [--restore_step=N]

The effective gin configuration is written to <workdir>/config.gin once the run has started (after every
check; a different previous one is kept as config.gin.<time>.prev). Running the same command again
resumes from the latest checkpoint in the workdir; `moe-jax train --workdir=DIR` alone continues
with DIR/config.gin (e.g. after `moe-jax import`).
"""

from __future__ import annotations

import argparse
import sys

TRAIN_MODULES = ("moe_jax.train.config", "moe_jax.parallel.mesh")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-jax train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", required=True, help="directory for checkpoints, metrics and config.gin")
    p.add_argument("--mesh", default="", help="mesh axes, e.g. data:2,expert:4 (default: MeshConfig from gin)")
    p.add_argument("--restore_step", type=int, default=None, help="restore this step instead of the latest")
    p.add_argument(
        "--discard_later_steps",
        action="store_true",
        help="with --restore_step: move later checkpoints to checkpoints/discarded/ (kept) and continue",
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")
    from moe_jax.parallel import add_distributed_args

    add_distributed_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from moe_jax.configs.gin_utils import GinConfigError, command_gin_args, parse_gin

    gin_args = command_gin_args("moe-jax train", argv)
    if gin_args is None:
        return 2
    args = build_parser().parse_args(list(gin_args.rest))
    gin_files = list(gin_args.gin_files)
    if not gin_files:
        from pathlib import Path

        saved = Path(args.workdir) / "config.gin"
        if not saved.exists():
            print(
                "moe-jax train: give a model (--model=NAME or --gin_file=gin/models/NAME.gin) and usually a run "
                "file (--gin_file=runs/proxy_cpu.gin), or a --workdir that holds a config.gin",
                file=sys.stderr,
            )
            return 2
        gin_files = [str(saved)]  # continue a run (or an imported checkpoint) with its own configuration
    from moe_jax.parallel import DistributedError, distributed_config_from_args, initialize_distributed

    try:
        initialize_distributed(distributed_config_from_args(args))
    except (ValueError, DistributedError) as err:
        print(f"moe-jax train: {err}", file=sys.stderr)
        return 2
    try:
        parse_gin(gin_files, gin_args.bindings, modules=TRAIN_MODULES)
        import gin
        from moe_jax.config import ModelConfig
        from moe_jax.parallel import MeshConfig
        from moe_jax.train.config import TrainConfig

        model_cfg, train_cfg = ModelConfig(), TrainConfig()
        mesh_cfg = MeshConfig.from_string(args.mesh) if args.mesh else MeshConfig()
    except (GinConfigError, ValueError, TypeError) as err:
        print(f"moe-jax train: {err}", file=sys.stderr)
        return 2
    from moe_jax.data.errors import DataError
    from moe_jax.parallel import ShardingError
    from moe_jax.train.checkpoint import CheckpointError
    from moe_jax.train.loop import NonFiniteLossError, train
    from moe_jax.train.validate import RunConfigError

    try:
        result = train(
            args.workdir,
            model_cfg,
            train_cfg,
            mesh_cfg,
            restore_step=args.restore_step,
            progress=not args.no_progress,
            gin_config=gin.config_str(),
            discard_later_steps=args.discard_later_steps,
        )
    except (DataError, ShardingError, CheckpointError, NonFiniteLossError, RunConfigError) as err:
        print(f"moe-jax train: {err}", file=sys.stderr)
        return 1
    print(
        f"done: step {result.step}, train loss {result.train_loss:.4f}, held-out loss "
        f"{result.heldout_loss if result.heldout_loss is None else round(result.heldout_loss, 4)}, "
        f"{result.tokens_per_second:,.0f} tokens/s, MFU {result.mfu:.1%} ({result.stopped})"
    )
    return 130 if result.stopped == "interrupted" else 0

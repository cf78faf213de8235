"""`moe-jax quickstart`: the README's main job.

Trains the tiny DeepSeekMoE proxy (1 shared + 63 routed experts of a quarter FFN, top-7) and its GShard
counterpart (16 full-size experts, top-2; same total and activated parameters) on the offline corpus
with the CPU proxy recipe (`gin/runs/proxy_cpu.gin`), evaluates both on the held-out split and prints
their losses side by side with the corpus's unigram entropy, the loss to beat.

Each model trains in `<workdir>/<model>`; rerunning resumes or, if finished, just reports. Needs the
token cache of `moe-jax data build`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_MODELS = ("deepseekmoe_tiny", "gshard_tiny")
PAPER_TABLE1_PILE_LOSS = {"dense": 2.060, "hash": 1.932, "switch": 1.881, "gshard": 1.867, "deepseekmoe": 1.808}


def train_model(name: str, workdir: Path, steps: int | None, bindings: list[str]) -> dict:
    """Parse `name` + runs/proxy_cpu.gin (+ bindings), train in `workdir`, return a result row."""
    import gin
    from moe_jax.config import ModelConfig
    from moe_jax.configs.gin_utils import model_gin_path, parse_gin
    from moe_jax.model.params import count_params
    from moe_jax.parallel import MeshConfig
    from moe_jax.train.config import TrainConfig
    from moe_jax.train.loop import train
    from moe_jax.train.metrics import read_metrics

    extra = list(bindings) + ([f"TRAIN_STEPS={steps}", f"WARMUP_STEPS={max(1, steps // 10)}"] if steps else [])
    parse_gin(
        [model_gin_path(name), "runs/proxy_cpu.gin"], extra, modules=("moe_jax.train.config", "moe_jax.parallel.mesh")
    )
    model_cfg, train_cfg = ModelConfig(), TrainConfig()
    counts = count_params(model_cfg, train_cfg.seq_len)
    print(
        f"\n=== {name}: {counts.total / 1e6:.2f}M parameters, {counts.activated / 1e6:.2f}M activated; "
        f"{train_cfg.steps} steps of {train_cfg.batch_size} x {train_cfg.seq_len} tokens",
        flush=True,
    )
    t0 = time.perf_counter()
    result = train(workdir / name, model_cfg, train_cfg, MeshConfig(), gin_config=gin.config_str())
    last = [r for r in read_metrics(workdir / name) if "ce" in r][-1]
    loads = {k.split("/")[1]: v for k, v in last.items() if k.startswith("moe/layer") and k.endswith("/max_load")}
    return {
        "expert_max_load": loads,
        "model": name,
        "total_params": counts.total,
        "activated_params": counts.activated,
        "steps": result.step,
        "train_loss": result.train_loss,
        "heldout_loss": result.heldout_loss,
        "tokens_per_second": result.tokens_per_second,
        "wall_seconds": time.perf_counter() - t0,
    }


def format_table(rows: list[dict], unigram) -> str:
    lines = [
        f"{'model':<20} {'params':>8} {'active':>8} {'steps':>6} {'train loss':>10} {'held-out loss':>13} "
        f"{'tok/s':>8} {'paper Pile loss (2B)':>20}"
    ]
    for r in rows:
        family = r["model"].rsplit("_", 1)[0]
        paper = PAPER_TABLE1_PILE_LOSS.get(family)
        lines.append(
            f"{r['model']:<20} {r['total_params'] / 1e6:>7.2f}M {r['activated_params'] / 1e6:>7.2f}M "
            f"{r['steps']:>6} {r['train_loss']:>10.4f} {r['heldout_loss']:>13.4f} "
            f"{r['tokens_per_second']:>8,.0f} {'' if paper is None else f'{paper:.3f}':>20}"
        )
    lines.append(
        f"{'unigram baseline':<20} {'':>8} {'':>8} {'':>6} {unigram.train_entropy:>10.4f} {unigram.heldout_loss:>13.4f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="moe-jax quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default="workdirs/quickstart")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="gin model names to compare")
    p.add_argument("--steps", type=int, default=None, help="override TRAIN_STEPS of runs/proxy_cpu.gin (300)")
    p.add_argument(
        "--gin",
        dest="bindings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra gin binding for every model (repeatable)",
    )
    args = p.parse_args(argv)

    from moe_jax.configs.gin_utils import GinConfigError
    from moe_jax.data import paths
    from moe_jax.data.errors import DataError
    from moe_jax.evaluate.baselines import unigram_baseline

    workdir = Path(args.workdir)
    try:
        unigram = unigram_baseline(paths.cache_dir())
        rows = [train_model(name, workdir, args.steps, args.bindings) for name in args.models]
    except (DataError, GinConfigError) as err:
        print(f"moe-jax quickstart: {err}")
        return 1
    table = format_table(rows, unigram)
    print(
        "\nHeld-out loss (nats/token) on the offline corpus; lower is better. The paper's Pile losses of its 2B "
        "models (Table 1, 100B tokens) are shown for their ordering only: a different corpus and scale.\n"
    )
    print(table)
    (workdir / "quickstart.json").write_text(
        json.dumps({"rows": rows, "unigram": unigram.__dict__}, indent=2, default=float) + "\n"
    )
    print("\nExpert load at the last step, per MoE layer (busiest expert's tokens / mean; 1.00 = balanced):")
    for r in rows:
        print(f"  {r['model']:<20} " + "  ".join(f"{layer} {v:.2f}" for layer, v in r["expert_max_load"].items()))
    best = min(rows, key=lambda r: r["heldout_loss"])
    print(
        f"\nbest held-out loss: {best['model']} ({best['heldout_loss']:.4f}); every model beats the unigram "
        f"baseline: {all(r['heldout_loss'] < unigram.heldout_loss for r in rows)}"
    )
    return 0

"""`moe-jax quickstart`: the README's main job.

Trains DeepSeekMoE (1 shared + 63 routed experts of a quarter FFN, top-7), GShard (16 full-size experts,
top-2; the same total and activated parameters) and the Dense model of their activated size in the CPU
regime the experiments run in (the `*_base` proxies: 1024-piece vocabulary, d = 128, 4 layers; the
recipe `gin/runs/proxy_base.gin`, experiments/README.md "The CPU regime"), but for 300 steps (1.2M
tokens) instead of its 2442 (10M), with the schedule compressed to them (warmup 8% of the steps, decays
at 80% and 90%). Each is evaluated on the whole held-out split and the held-out bits/byte (and
nats/token) are printed side by side with the unigram baseline, the loss to beat.

At 1.2M tokens the MoE models have just overtaken Dense in the crossover study and DeepSeekMoE vs
GShard is within seed noise: this shows the pipeline working end to end, not the paper's result (the
families in experiments/ are that).

Each model trains in `<workdir>/<model>`; rerunning resumes or, if finished, just reports. Needs the
1024-piece token cache of `moe-jax data build --vocab_size 1024` (`make data` builds it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_MODELS = ("deepseekmoe_base", "gshard_base", "dense_base")
RUN_GIN = "runs/proxy_base.gin"
DEFAULT_STEPS = 300
WARMUP_SHARE = 0.08  # runs/proxy_base.gin: 195 of 2442 steps
PAPER_TABLE1_PILE_LOSS = {"dense": 2.060, "hash": 1.932, "switch": 1.881, "gshard": 1.867, "deepseekmoe": 1.808}


def configure(name: str, steps: int, bindings: list[str]):
    """Parse model `name` + RUN_GIN with `steps` training steps (+ bindings): (ModelConfig, TrainConfig)."""
    from moe_jax.config import ModelConfig
    from moe_jax.configs.gin_utils import model_gin_path, parse_gin
    from moe_jax.train.config import TrainConfig

    extra = [f"TRAIN_STEPS={steps}", f"WARMUP_STEPS={max(1, round(WARMUP_SHARE * steps))}", *bindings]
    parse_gin([model_gin_path(name), RUN_GIN], extra, modules=("moe_jax.train.config", "moe_jax.parallel.mesh"))
    return ModelConfig(), TrainConfig()


def train_model(name: str, workdir: Path, steps: int, bindings: list[str]) -> dict:
    """Train model `name` (`configure`) in `workdir`/`name`; return its result row."""
    import gin
    from moe_jax.model.params import count_params
    from moe_jax.parallel import MeshConfig
    from moe_jax.train.loop import train
    from moe_jax.train.metrics import read_metrics

    model_cfg, train_cfg = configure(name, steps, bindings)
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
        "heldout_bits_per_byte": result.heldout_bits_per_byte,
        "tokens_per_second": result.tokens_per_second,
        "wall_seconds": time.perf_counter() - t0,
    }


def format_table(rows: list[dict], unigram) -> str:
    """The result rows and the unigram baseline, one line each."""
    lines = [
        f"{'model':<20} {'params':>8} {'active':>8} {'steps':>6} {'train loss':>10} {'held-out loss':>13} "
        f"{'bits/byte':>9} {'tok/s':>8} {'paper Pile loss (2B)':>20}"
    ]
    for r in rows:
        family = r["model"].rsplit("_", 1)[0]
        paper = PAPER_TABLE1_PILE_LOSS.get(family)
        lines.append(
            f"{r['model']:<20} {r['total_params'] / 1e6:>7.2f}M {r['activated_params'] / 1e6:>7.2f}M "
            f"{r['steps']:>6} {r['train_loss']:>10.4f} {r['heldout_loss']:>13.4f} {r['heldout_bits_per_byte']:>9.4f} "
            f"{r['tokens_per_second']:>8,.0f} {'' if paper is None else f'{paper:.3f}':>20}"
        )
    lines.append(
        f"{'unigram baseline':<20} {'':>8} {'':>8} {'':>6} {unigram.train_entropy:>10.4f} "
        f"{unigram.heldout_loss:>13.4f} {unigram.heldout_bits_per_byte:>9.4f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="moe-jax quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default="workdirs/quickstart")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="gin model names to compare")
    p.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"training steps of 16 x 256 tokens (default {DEFAULT_STEPS})"
    )
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
        configs = [configure(name, args.steps, args.bindings) for name in args.models]  # bad input fails first
        model_cfg, train_cfg = configs[0]
        unigram = unigram_baseline(paths.default_cache(train_cfg, model_cfg.vocab_size))
        rows = [train_model(name, workdir, args.steps, args.bindings) for name in args.models]
    except (DataError, GinConfigError) as err:
        print(f"moe-jax quickstart: {err}")
        return 1
    table = format_table(rows, unigram)
    print(
        "\nHeld-out loss on the offline corpus (nats/token, and bits per UTF-8 byte: comparable across "
        "vocabularies); lower is better. The paper's Pile losses of its 2B models (Table 1, 100B tokens) are shown "
        "for their ordering only: a different corpus and scale. At these 1.2M tokens DeepSeekMoE vs GShard is "
        "within seed noise (experiments/README.md, crossover).\n"
    )
    print(table)
    (workdir / "quickstart.json").write_text(
        json.dumps({"rows": rows, "unigram": unigram.__dict__}, indent=2, default=float) + "\n"
    )
    print("\nExpert load at the last step, per MoE layer (busiest expert's tokens / mean; 1.00 = balanced):")
    for r in rows:
        loads = "  ".join(f"{layer} {v:.2f}" for layer, v in r["expert_max_load"].items()) or "(no MoE layers)"
        print(f"  {r['model']:<20} {loads}")
    best = min(rows, key=lambda r: r["heldout_bits_per_byte"])
    print(
        f"\nbest held-out bits/byte: {best['model']} ({best['heldout_bits_per_byte']:.4f}); every model beats the "
        f"unigram baseline: {all(r['heldout_bits_per_byte'] < unigram.heldout_bits_per_byte for r in rows)}"
    )
    return 0

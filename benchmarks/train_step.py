"""Training-step throughput and model-FLOPs utilisation: a small DeepSeekMoE against the dense model
of equal activated parameters.

One full step (forward, backward, AdamW update) of `moe_jax.model.transformer.Transformer` with loss
= token cross-entropy + the MoE auxiliary losses, jitted with the parameters and optimizer state
donated. Each model is compiled and warmed up, then the two alternate for `--steps` steps and each
reports its median step time (wall, and process CPU time: the steadier one on a shared machine). Model FLOPs
follow docs/paper.md §3.4 (`moe_jax.model.params`):
6 x activated non-embedding parameters x tokens + attention 12 L T^2 (heads x head_dim); MFU divides
the achieved model FLOP rate by a large square matmul's rate measured in the same run. Peak memory
is XLA's buffer assignment of the compiled step (arguments + outputs + temporaries - aliased).

    python benchmarks/train_step.py --quick       # d=256, 2 layers, 4 x 512 tokens
    python benchmarks/train_step.py               # d=512, 4 layers, 8 x 1024 tokens (8K per step)
    python benchmarks/train_step.py --dtype bfloat16 --d 1280 --layers 9 --batch 16 --seq 2048   # GPU

Models (F = 8d/3 rounded up to 64): DeepSeekMoE = 1 shared + 63 routed experts of width F/4, top-7
in every layer; dense = the same trunk with SwiGLU FFNs of width 8 F/4 = 2F (equal activated params).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.moe_layer import compile_step, environment, matmul_peak, standard_ffn_dim  # noqa: E402
from moe_jax.config import ModelConfig, MoEConfig  # noqa: E402
from moe_jax.model.params import count_params  # noqa: E402
from moe_jax.model.transformer import Transformer  # noqa: E402
from moe_jax.moe.dispatch.gmm import prepare_gmm  # noqa: E402
from moe_jax.train.loss import cross_entropy  # noqa: E402


def model_configs(d: int, layers: int, dtype: str, gmm: str, vocab: int = 8192) -> dict[str, ModelConfig]:
    f = standard_ffn_dim(d)
    moe = MoEConfig.fine_grained(16, 2, 4, 1, f, gmm_backend=gmm, expert_balance_alpha=0.01)
    trunk = ModelConfig(
        vocab_size=vocab,
        d_model=d,
        num_layers=layers,
        num_heads=max(1, d // 64),
        head_dim=64,
        ffn_dim=moe.activated_dim,
        dtype=dtype,
    )
    return {"deepseekmoe": trunk.replace(moe=moe), "dense": trunk}


def make_step(cfg: ModelConfig, lr: float = 1e-3):
    """(jitted step, params, opt_state, rest); step(params, opt_state, rest, tokens) -> (params, opt_state, loss)."""
    graphdef, params, rest = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param, ...)
    opt = optax.adamw(lr, weight_decay=0.1)

    def loss_fn(params, rest, tokens):
        out = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
        total, count = cross_entropy(out.logits, tokens[:, 1:])
        return total / count + out.aux_loss

    def step(params, opt_state, rest, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), params, opt.init(params), rest


def measure_models(cfgs: dict[str, ModelConfig], batch: int, seq: int, steps: int) -> dict[str, dict]:
    """Compile each model's step ahead of time (its peak memory: XLA's buffer assignment, as
    `moe_layer.compile_step`), warm it up twice, then alternate `steps` timed steps over the models.

    Returns name -> dict(times, cpu: seconds per step, counts: `count_params`, peak_bytes, loss)."""
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, min(c.vocab_size for c in cfgs.values()))
    runs = {}
    for name, cfg in cfgs.items():
        step, params, opt_state, rest = make_step(cfg)
        compiled, peak_bytes = compile_step(step, (params, opt_state, rest, tokens))
        runs[name] = dict(
            step=compiled,
            state=[params, opt_state],
            rest=rest,
            counts=count_params(cfg, seq - 1),
            peak_bytes=peak_bytes,
            times=[],
            cpu=[],
        )
        for _ in range(2):  # warm-up
            params, opt_state, loss = compiled(*runs[name]["state"], rest, tokens)
            jax.block_until_ready(loss)
            runs[name]["state"] = [params, opt_state]
    for _ in range(steps):
        for r in runs.values():
            t0, c0 = time.perf_counter(), time.process_time()
            params, opt_state, loss = r["step"](*r["state"], r["rest"], tokens)
            jax.block_until_ready(loss)
            r["times"].append(time.perf_counter() - t0)
            r["cpu"].append(time.process_time() - c0)
            r["state"], r["loss"] = [params, opt_state], float(loss)
    return runs


def print_models(runs: dict[str, dict], batch: int, seq: int, peak: float, out=sys.stdout) -> None:
    """The table of `measure_models`: median step time, tokens/s, model FLOPs, MFU vs `peak` FLOP/s."""
    print(
        "| model | total params | activated params | step (s) | CPU s/step | tokens/s | model TFLOP/step | "
        "achieved GFLOP/s | MFU | peak memory (GiB) |",
        file=out,
    )
    print("|---|---|---|---|---|---|---|---|---|---|", file=out)
    for name, r in runs.items():
        c, t = r["counts"], statistics.median(r["times"])
        flops = c.flops * batch
        mem = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
        print(
            f"| {name} | {c.total / 1e6:.1f}M | {c.activated / 1e6:.1f}M | {t:.3f} | "
            f"{statistics.median(r['cpu']):.2f} | "
            f"{batch * (seq - 1) / t:,.0f} | {flops / 1e12:.3f} | {flops / t / 1e9:.1f} | {flops / t / peak:.1%} | "
            f"{mem} |",
            file=out,
            flush=True,
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--d", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (the model sees seq - 1)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--gmm", default="auto")
    a = p.parse_args(argv)
    d = a.d or (256 if a.quick else 512)
    layers = a.layers or (2 if a.quick else 4)
    batch = a.batch or (4 if a.quick else 8)
    seq = a.seq or (512 if a.quick else 1024)
    steps = a.steps or (3 if a.quick else 5)
    gmm = prepare_gmm(a.gmm)
    print(environment())
    peak = matmul_peak(a.dtype)
    print(
        f"gmm kernel: {gmm} | dtype {a.dtype} | matmul peak {peak / 1e9:.1f} GFLOP/s (measured now) | "
        f"d={d} layers={layers} batch={batch} seq={seq} | {steps} timed steps\n",
        flush=True,
    )
    runs = measure_models(model_configs(d, layers, a.dtype, gmm), batch, seq, steps)
    print_models(runs, batch, seq, peak)
    med = {n: (statistics.median(r["times"]), statistics.median(r["cpu"])) for n, r in runs.items()}
    print(
        f"\nstep time DeepSeekMoE / dense = {med['deepseekmoe'][0] / med['dense'][0]:.3f} "
        f"(CPU time {med['deepseekmoe'][1] / med['dense'][1]:.3f}) | {environment()}"
    )


if __name__ == "__main__":
    main()

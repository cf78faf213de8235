"""One MoE layer against the dense SwiGLU FFN of the same activated parameters: time and memory.

Forward + backward (gradients of every parameter and of the input) of `moe_jax.moe.layer.MoELayer`
(router, dropless dispatch, shared experts, balance loss) and of `moe_jax.layers.mlp.MLP` with
intermediate width (K_s + K') * f, compiled ahead of time in the same process on the same inputs.
Each runs once to warm up, then MoE and dense alternate `--repeats` times (so slow phases of a shared
machine hit both) and each reports the median wall time; the median process CPU time is reported
too, as the steadier number when other jobs share the machine. Peak memory is XLA's buffer
assignment of the compiled step: arguments + outputs + temporaries - aliased
(`compiled.memory_analysis()`), i.e. what the step needs resident at its peak.

    python benchmarks/moe_layer.py --quick        # d=512, 8K tokens: a few minutes on 2 CPU cores
    python benchmarks/moe_layer.py                # d=1280 (2B models), 8K and 32K tokens, m sweep
    python benchmarks/moe_layer.py --tokens 8192 --memory_tokens 32768   # time at 8K; 32K memory from the compile alone
    python benchmarks/moe_layer.py --dtype bfloat16 --tokens 32768   # on a GPU: bf16, MFU vs a bf16 matmul

Layers (F = the standard FFN width 8d/3 rounded up to 64; 3456 at d=1280):
  deepseekmoe  1 shared + 63 routed experts of width F/4, top-7    dense width 8 * F/4 = 2F
  gshard       16 experts of width F, top-2                        dense width 2F
  switch       16 experts of width F, top-1                        dense width F
  hash         16 experts of width F, hash routing (top-1)         dense width F
Granularity sweep: 16m experts of width F/m, top-2m (equal activated and total parameters), m=1,2,4,8.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.layers.mlp import MLP
from moe_jax.moe.dispatch.gmm import prepare_gmm
from moe_jax.moe.layer import MoELayer

VOCAB = 8192


def standard_ffn_dim(d: int) -> int:
    """8d/3 rounded up to a multiple of 64 (3456 at d=1280)."""
    return math.ceil(8 * d / 3 / 64) * 64


def layer_configs(d: int) -> dict[str, MoEConfig]:
    f = standard_ffn_dim(d)
    return {
        "deepseekmoe": MoEConfig.fine_grained(16, 2, 4, 1, f),
        "gshard": MoEConfig.fine_grained(16, 2, 1, 0, f),
        "switch": MoEConfig(num_experts=16, top_k=1, expert_dim=f),
        "hash": MoEConfig(num_experts=16, top_k=1, expert_dim=f, router="hash"),
    }


def granularity_configs(d: int, ms=(1, 2, 4, 8)) -> dict[str, MoEConfig]:
    f = standard_ffn_dim(d)
    return {f"m={m}": MoEConfig.fine_grained(16, 2, m, 0, f) for m in ms}


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------


def _model_cfg(d: int, moe: MoEConfig, dtype: str, gmm: str) -> ModelConfig:
    moe = MoEConfig(**{**moe.__dict__, "gmm_backend": gmm})
    return ModelConfig(
        vocab_size=VOCAB,
        d_model=d,
        num_layers=1,
        num_heads=1,
        head_dim=64,
        ffn_dim=moe.activated_dim,
        moe=moe,
        dtype=dtype,
        param_dtype=dtype,
    )


def _grad_step(module: nnx.Module, is_moe: bool):
    """jit(params, x, ids, ct) -> (loss, grads of params and x); loss = <y, ct> (+ aux losses)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, x, ids, ct):
        m = nnx.merge(graphdef, params, rest)
        if is_moe:
            y, aux = m(x, ids)
            extra = aux.losses.total if aux is not None else 0.0
        else:
            y, extra = m(x), 0.0
        return jnp.sum(y.astype(jnp.float32) * ct) + extra

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def build_pair(d: int, moe: MoEConfig, tokens: int, dtype: str = "float32", gmm: str = "auto", seed: int = 0):
    """The MoE layer and its equal-active dense FFN as (step, args) pairs, on the same inputs."""
    cfg = _model_cfg(d, moe, dtype, gmm)
    seq = min(tokens, 4096)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (tokens // seq, seq, d), jnp.dtype(dtype))
    ids = jax.random.randint(k2, (tokens // seq, seq), 0, VOCAB)
    ct = jax.random.normal(k3, x.shape, jnp.float32)
    moe_step, moe_params = _grad_step(MoELayer(cfg, nnx.Rngs(seed)), True)
    dense = MLP(d, moe.activated_dim, init_std=cfg.init_std, param_dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))
    dense_step, dense_params = _grad_step(dense, False)
    return (moe_step, (moe_params, x, ids, ct)), (dense_step, (dense_params, x, ids, ct))


def layer_flops(d: int, moe: MoEConfig, tokens: int) -> float:
    """Model FLOPs of forward+backward: 3 x (expert matmuls 6 d (K_s+K') f + router 2 d E) per token."""
    return 3.0 * tokens * (6.0 * d * moe.activated_dim + 2.0 * d * moe.num_experts * (moe.router == "softmax"))


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------


def compile_step(step, args):
    """AOT-compile `step` for `args`: (compiled executable, peak bytes or None).

    Peak bytes = XLA's buffer assignment of the compiled step: arguments + outputs + temporaries
    - aliased, i.e. what must be resident at the step's peak."""
    compiled = step.lower(*args).compile()
    try:
        m = compiled.memory_analysis()
        peak = int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 (memory analysis is optional on some backends)
        peak = None
    return compiled, peak


def time_interleaved(runs: dict[str, tuple], repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """One warm-up run each, then `repeats` rounds running each once.

    Returns name -> (wall seconds per run, process CPU seconds per run). On a machine shared with
    other jobs the CPU time is the steadier number (it does not count time spent descheduled)."""
    for step, args in runs.values():
        jax.block_until_ready(step(*args))
    times = {name: ([], []) for name in runs}
    for _ in range(repeats):
        for name, (step, args) in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(step(*args))
            times[name][0].append(time.perf_counter() - t0)
            times[name][1].append(time.process_time() - c0)
    return times


def matmul_peak(dtype: str, n: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul in `dtype` (the peak used for MFU): best of `repeats`."""
    n = n or (8192 if jax.default_backend() != "cpu" else 4096)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        ts.append(time.perf_counter() - t0)
    return 2.0 * n**3 / min(ts)


@dataclass
class Row:
    name: str
    d: int
    tokens: int
    moe_s: float
    dense_s: float
    moe_cpu: float
    dense_cpu: float
    moe_bytes: int | None
    dense_bytes: int | None
    flops: float
    cfg: MoEConfig

    @property
    def ratio(self) -> float:
        return self.moe_s / self.dense_s

    @property
    def cpu_ratio(self) -> float:
        return self.moe_cpu / self.dense_cpu


def measure_many(
    named_cfgs: dict[str, MoEConfig],
    d: int,
    tokens: int,
    repeats: int,
    dtype: str,
    gmm: str,
    shared_dense: bool = False,
) -> list[Row]:
    """Time the MoE layers of `named_cfgs` and their dense FFNs, all interleaved in one round robin.

    shared_dense: the configurations have equal activated width, so one dense FFN serves them all.
    """
    runs, peaks, dense_of = {}, {}, {}
    for name, cfg in named_cfgs.items():
        (ms, ma), (ds, da) = build_pair(d, cfg, tokens, dtype, gmm)
        runs[name], peaks[name] = _compiled(ms, ma)
        dense_name = "dense" if shared_dense else f"dense:{name}"
        if dense_name not in runs:
            runs[dense_name], peaks[dense_name] = _compiled(ds, da)
        dense_of[name] = dense_name
    times = time_interleaved(runs, repeats)
    med = {n: (statistics.median(w), statistics.median(c)) for n, (w, c) in times.items()}
    return [
        Row(
            name,
            d,
            tokens,
            med[name][0],
            med[dense_of[name]][0],
            med[name][1],
            med[dense_of[name]][1],
            peaks[name],
            peaks[dense_of[name]],
            layer_flops(d, cfg, tokens),
            cfg,
        )
        for name, cfg in named_cfgs.items()
    ]


def memory_many(named_cfgs: dict[str, MoEConfig], d: int, tokens: int, dtype: str, gmm: str) -> list[tuple]:
    """(name, MoE peak bytes, dense peak bytes) from the compiled steps alone: no step is run, so a
    32K-token configuration costs only its compile."""
    out = []
    for name, cfg in named_cfgs.items():
        (ms, ma), (ds, da) = build_pair(d, cfg, tokens, dtype, gmm)
        out.append((name, compile_step(ms, ma)[1], compile_step(ds, da)[1]))
    return out


def _compiled(step, args):
    compiled, peak = compile_step(step, args)
    return (compiled, args), peak


def _gib(b):
    return "-" if b is None else f"{b / 2**30:.2f}"


def print_table(rows: list[Row], peak: float | None, out=sys.stdout):
    head = (
        "| layer | d | tokens | MoE fwd+bwd (s) | dense fwd+bwd (s) | MoE/dense | MoE/dense (CPU time) | "
        "MoE peak (GiB) | dense peak (GiB) | mem ratio |"
    )
    if peak:
        head += " MoE MFU | dense MFU |"
    print(head, file=out)
    print("|" + "---|" * (head.count("|") - 1), file=out)
    for r in rows:
        mem = "-" if not (r.moe_bytes and r.dense_bytes) else f"{r.moe_bytes / r.dense_bytes:.2f}"
        line = (
            f"| {r.name} | {r.d} | {r.tokens} | {r.moe_s:.3f} | {r.dense_s:.3f} | **{r.ratio:.3f}** | "
            f"{r.cpu_ratio:.3f} | {_gib(r.moe_bytes)} | {_gib(r.dense_bytes)} | {mem} |"
        )
        if peak:
            line += f" {r.flops / r.moe_s / peak:.1%} | {r.flops / r.dense_s / peak:.1%} |"
        print(line, file=out, flush=True)


def print_granularity(rows: list[Row], out=sys.stdout):
    print(
        "| m | experts | top-k | width | MoE fwd+bwd (s) | vs m=1 | vs m=1 (CPU time) | MoE/dense | "
        "MoE peak (GiB) | vs m=1 |",
        file=out,
    )
    print("|---|---|---|---|---|---|---|---|---|---|", file=out)
    base = rows[0]
    for r in rows:
        mem = "-" if not (r.moe_bytes and base.moe_bytes) else f"{r.moe_bytes / base.moe_bytes:.2f}"
        print(
            f"| {r.name.split('=')[-1]} | {r.cfg.num_experts} | {r.cfg.top_k} | {r.cfg.expert_dim} | {r.moe_s:.3f} | "
            f"**{r.moe_s / base.moe_s:.3f}** | {r.moe_cpu / base.moe_cpu:.3f} | {r.ratio:.3f} | "
            f"{_gib(r.moe_bytes)} | {mem} |",
            file=out,
            flush=True,
        )
    print(
        f"\n(dense FFN of the same activated width: {base.dense_s:.3f} s, peak {_gib(base.dense_bytes)} GiB)", file=out
    )


def environment() -> str:
    dev = jax.devices()[0]
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (
        f"{datetime.date.today()} | jax {jax.__version__} | backend {jax.default_backend()} ({dev.device_kind}, "
        f"{jax.device_count()} device(s)) | {platform.processor() or platform.machine()}, {os.cpu_count()} cores | "
        f"load average {load[0]:.2f}"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="d=512, 8K tokens, 3 repeats, m sweep at 8K")
    p.add_argument("--d", type=int, nargs="+", help="hidden sizes (default 1280; quick: 512)")
    p.add_argument(
        "--tokens",
        type=int,
        nargs="*",
        help="tokens per batch timed (default 8192 32768; quick: 8192; none: skip the timed table)",
    )
    p.add_argument("--layers", nargs="+", default=["deepseekmoe", "gshard", "switch", "hash"])
    p.add_argument("--granularity", type=int, nargs="*", default=[1, 2, 4, 8], help="m values; none to skip")
    p.add_argument("--granularity-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per step (default 5; quick: 3)")
    p.add_argument(
        "--memory_tokens",
        type=int,
        nargs="*",
        default=None,
        help="token counts measured for peak memory only (compiled, never run: cheap), e.g. 32768",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--gmm", default="auto", help="grouped-matmul kernel (moe_jax.moe.dispatch.gmm)")
    a = p.parse_args(argv)
    ds = a.d or ([512] if a.quick else [1280])
    tokens = a.tokens if a.tokens is not None else ([8192] if a.quick else [8192, 32768])
    repeats = a.repeats or (3 if a.quick else 5)
    gmm = prepare_gmm(a.gmm)
    t_start = time.perf_counter()
    print(environment())
    peak = matmul_peak(a.dtype)
    print(
        f"gmm kernel: {gmm} | dtype {a.dtype} | repeats {repeats} | matmul peak {peak / 1e9:.1f} GFLOP/s "
        f"({a.dtype}, measured now)\n",
        flush=True,
    )

    rows = []
    for d in ds:
        cfgs = layer_configs(d)
        for t in tokens:
            for name in a.layers:
                rows += measure_many({name: cfgs[name]}, d, t, repeats, a.dtype, gmm)
                r = rows[-1]
                print(
                    f"  {name} d={d} T={t}: MoE {r.moe_s:.3f}s dense {r.dense_s:.3f}s ratio {r.ratio:.3f} "
                    f"(CPU time {r.cpu_ratio:.3f})",
                    file=sys.stderr,
                    flush=True,
                )
    if rows:
        print("## MoE layer vs equal-active dense FFN (forward + backward)\n")
        print_table(rows, peak)

    for t in a.memory_tokens or []:
        d = ds[0]
        print(f"\n## Peak memory at {t} tokens (d={d}; XLA buffer assignment of the compiled step, not run)\n")
        print("| layer | MoE peak (GiB) | dense peak (GiB) | MoE/dense |\n|---|---|---|---|")
        for name, moe_b, dense_b in memory_many({n: layer_configs(d)[n] for n in a.layers}, d, t, a.dtype, gmm):
            ratio = "-" if not (moe_b and dense_b) else f"**{moe_b / dense_b:.2f}**"
            print(f"| {name} | {_gib(moe_b)} | {_gib(dense_b)} | {ratio} |", flush=True)

    if a.granularity:
        d = ds[0]
        grows = measure_many(
            granularity_configs(d, tuple(a.granularity)),
            d,
            a.granularity_tokens,
            repeats,
            a.dtype,
            gmm,
            shared_dense=True,
        )
        print(f"\n## Granularity at equal activated and total parameters (d={d}, {a.granularity_tokens} tokens)\n")
        print_granularity(grows)
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s | {environment()}")


if __name__ == "__main__":
    main()

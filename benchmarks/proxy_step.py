"""Where the time of a CPU proxy's training step goes, and proxy throughput per grouped-matmul kernel.

The step is the trainer's own (`moe_jax.train.step.make_train_step` with the run file's optimizer and
schedule) on the gin-configured model, fed a random batch of the run's shape. Two tables:

1. `--profile`: the step's parts timed alone at the model's shapes, each forward + backward (the
   optimizer update alone): embedding + final norm + LM head + cross-entropy, every attention
   sublayer, and for every MoE layer the router (logits, softmax, top-k, balance loss), the two
   grouped matmuls (at the group sizes a trained router gives: uniform load), the shared experts, and
   the rest of the dispatch (sort, gathers, combine) as the layer minus those parts. Parts are timed
   separately, so their sum differs from the step by fusion and scheduling; the table says by how much.
2. The full step per kernel in `--gmm` (compiled, warmed up, then run alternately; median wall and
   process-CPU time; tokens/s), with the ratio to the first kernel.

    python benchmarks/proxy_step.py --model deepseekmoe_tiny --profile
    python benchmarks/proxy_step.py --model deepseekmoe_cpu --gin_file runs/cpu_regime.gin --gmm chunked,blocked
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.moe_layer import environment  # noqa: E402
from moe_jax.config import ModelConfig  # noqa: E402
from moe_jax.configs.gin_utils import parse_gin  # noqa: E402
from moe_jax.model.params import count_params  # noqa: E402
from moe_jax.model.transformer import Transformer  # noqa: E402
from moe_jax.moe import balance  # noqa: E402
from moe_jax.moe.dispatch.base import ExpertParams  # noqa: E402
from moe_jax.moe.dispatch.dropless import grouped_swiglu  # noqa: E402
from moe_jax.moe.dispatch.gmm import get_gmm, prepare_gmm  # noqa: E402
from moe_jax.moe.gating import router_logits, softmax_topk  # noqa: E402
from moe_jax.train.config import TrainConfig  # noqa: E402
from moe_jax.train.loss import cross_entropy  # noqa: E402
from moe_jax.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from moe_jax.train.step import TrainState, make_train_step  # noqa: E402


def load_configs(model: str, gin_file: str, bindings: list[str]) -> tuple[ModelConfig, TrainConfig]:
    parse_gin(
        [f"models/proxy/{model}.gin" if "/" not in model else model, gin_file],
        bindings,
        modules=("moe_jax.train.config",),
    )
    return ModelConfig(), TrainConfig()


def random_batch(cfg: TrainConfig, vocab: int, seed: int = 0) -> dict:
    tokens = jax.random.randint(jax.random.key(seed), (cfg.batch_size, cfg.seq_len + 1), 0, vocab)
    ones = jnp.ones((cfg.batch_size, cfg.seq_len), jnp.int32)
    return {
        "decoder_input_tokens": tokens[:, :-1],
        "decoder_target_tokens": tokens[:, 1:],
        "decoder_loss_weights": ones,
        "decoder_segment_ids": ones,
        "decoder_positions": jnp.broadcast_to(jnp.arange(cfg.seq_len, dtype=jnp.int32), ones.shape),
    }


def timed(fn, args, repeats: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of fn(*args) after one warm-up call."""
    jax.block_until_ready(fn(*args))
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def fwd_bwd(f):
    """jit of the gradient of sum(f(*args)) with respect to every argument that is floating."""

    def loss(*args):
        return jnp.sum(f(*args).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=0))


def make_state_step(model_cfg: ModelConfig, cfg: TrainConfig):
    """The trainer's jitted step and a fresh state (parameters initialised as in training)."""
    model = Transformer(model_cfg, nnx.Rngs(cfg.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg)
    step = jax.jit(make_train_step(graphdef, rest, tx, learning_rate_schedule(cfg)), donate_argnums=(0,))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    return step, state, tx


def full_step_table(variants: list[tuple[str, ModelConfig, TrainConfig]], steps: int) -> list[dict]:
    """Each variant's step compiled and warmed up, then all run alternately `steps` times."""
    model_cfg, cfg = variants[0][1], variants[0][2]
    batch, rng = random_batch(cfg, model_cfg.vocab_size), jax.random.key(1)
    runs = []
    for name, mcfg, vcfg in variants:
        step, state, _ = make_state_step(mcfg, vcfg)
        for _ in range(2):
            state, metrics = step(state, batch, rng)
            jax.block_until_ready(metrics["loss"])
        runs.append(dict(name=name, step=step, state=state, wall=[], cpu=[]))
    for _ in range(steps):
        for r in runs:
            t, c = time.perf_counter(), time.process_time()
            r["state"], metrics = r["step"](r["state"], batch, rng)
            jax.block_until_ready(metrics["loss"])
            r["wall"].append(time.perf_counter() - t)
            r["cpu"].append(time.process_time() - c)
            r["loss"] = float(metrics["loss"])
    return runs


def profile_parts(model_cfg: ModelConfig, cfg: TrainConfig, repeats: int) -> list[tuple[str, float, float]]:
    """(part, wall seconds per step, cpu seconds per step) for the step's parts, timed alone."""
    b, s, d, v = cfg.batch_size, cfg.seq_len, model_cfg.d_model, model_cfg.vocab_size
    model = Transformer(model_cfg, nnx.Rngs(0))
    key = jax.random.key(0)
    x = jax.random.normal(key, (b, s, d), jnp.float32)
    tokens = jax.random.randint(key, (b, s), 0, v)
    rows = []

    def head(embed, lm_head, x):
        h = jnp.take(embed, tokens, axis=0) + x
        logits = jnp.einsum("bsd,dv->bsv", model.final_norm(h), lm_head)
        return cross_entropy(logits, tokens)[0]

    rows.append(
        (
            "embedding + LM head + cross-entropy",
            *timed(jax.jit(jax.grad(head, argnums=(0, 1, 2))), (model.embed[...], model.lm_head[...], x), repeats),
        )
    )
    first = model.stacks[0]
    block = nnx.merge(*nnx.split(first.blocks))  # a stacked block: index layer 0 below
    attn_state = jax.tree.map(lambda a: a[0], nnx.state(block.attn))
    attn_graph = nnx.graphdef(block.attn)
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))

    def attn(state, x):
        return nnx.merge(attn_graph, state)(x, pos, None)

    t = timed(jax.jit(jax.grad(lambda st, x: jnp.sum(attn(st, x)), argnums=(0, 1))), (attn_state, x), repeats)
    rows.append(
        (f"attention x {model_cfg.num_layers} layers", t[0] * model_cfg.num_layers, t[1] * model_cfg.num_layers)
    )
    if model_cfg.moe is not None:
        rows += _moe_parts(model_cfg, x.reshape(b * s, d), repeats)
    else:
        w = jnp.zeros((d, 2, model_cfg.ffn_dim)) + 0.01, jnp.zeros((model_cfg.ffn_dim, d)) + 0.01
        from moe_jax.layers.mlp import swiglu

        t = timed(jax.jit(jax.grad(lambda wi, wo, x: jnp.sum(swiglu(x, wi, wo)), argnums=(0, 1, 2))), (*w, x), repeats)
        rows.append((f"dense FFN x {model_cfg.num_layers}", t[0] * model_cfg.num_layers, t[1] * model_cfg.num_layers))
    params = nnx.state(model, nnx.Param)
    tx = make_optimizer(cfg)
    opt = tx.init(params)
    update = jax.jit(lambda g, o, p: tx.update(g, o, p))
    rows.append(("optimizer (clip + AdamW update)", *timed(update, (params, opt, params), repeats)))
    return rows


def _moe_parts(model_cfg: ModelConfig, xf: jax.Array, repeats: int) -> list[tuple[str, float, float]]:
    """Router, grouped matmuls, shared experts and the layer as a whole, per step (x MoE layers)."""
    from moe_jax.moe.layer import MoELayer

    m, n_moe = model_cfg.moe, model_cfg.num_moe_layers
    t_tok, d = xf.shape
    layer = MoELayer(model_cfg, nnx.Rngs(0))
    graph, state = nnx.split(layer)

    def whole(st, x):
        y, aux = nnx.merge(graph, st)(x[None])
        return jnp.sum(y) + (aux.losses.total if aux is not None else 0.0)

    rows = [("MoE layer", *timed(jax.jit(jax.grad(whole, argnums=(0, 1))), (state, xf), repeats))]
    if m.num_experts:

        def route(kernel, x):
            r = softmax_topk(router_logits(x, kernel), m.top_k)
            return jnp.sum(r.weights) + balance.expert_balance_loss(
                r.probs[None], r.indices[None], r.mask[None], "global"
            )

        rows.append(
            (
                "  router (logits, softmax, top-k, balance loss)",
                *timed(jax.jit(jax.grad(route, argnums=(0, 1))), (layer.router.kernel[...], xf), repeats),
            )
        )
        rows_k = t_tok * m.top_k
        sizes = np.full(m.num_experts, rows_k // m.num_experts, np.int32)
        sizes[: rows_k - sizes.sum()] += 1
        experts = ExpertParams(wi=layer.wi[...], wo=layer.wo[...])
        xs = jax.random.normal(jax.random.key(2), (rows_k, d))
        gmm = get_gmm(m.gmm_backend)
        f = lambda e, xs: jnp.sum(grouped_swiglu(xs, jnp.asarray(sizes), e, gmm))
        rows.append(
            (
                f"  grouped matmuls ({m.num_experts} experts x {rows_k // m.num_experts} rows, {m.gmm_backend})",
                *timed(jax.jit(jax.grad(f, argnums=(0, 1))), (experts, xs), repeats),
            )
        )
    if layer.shared is not None:
        sg, ss = nnx.split(layer.shared)
        rows.append(
            (
                "  shared experts",
                *timed(
                    jax.jit(jax.grad(lambda st, x: jnp.sum(nnx.merge(sg, st)(x)), argnums=(0, 1))), (ss, xf), repeats
                ),
            )
        )
    parts = rows[1:]
    rest = tuple(rows[0][i] - sum(p[i] for p in parts) for i in (1, 2))
    rows.append(("  rest of the dispatch (sort, gathers, combine)", *rest))
    return [
        (name, w * n_moe, c * n_moe)
        for name, w, c in [(f"{rows[0][0]} x {n_moe} layers", rows[0][1], rows[0][2])] + rows[1:]
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deepseekmoe_tiny", help="a gin/models/proxy name or a gin file path")
    p.add_argument("--gin_file", default="runs/proxy_cpu.gin")
    p.add_argument("--gin", action="append", default=[], help="extra binding, e.g. MoEConfig.top_k=4")
    p.add_argument("--gmm", default="auto", help="comma-separated grouped-matmul kernels to compare")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:BINDING[;BINDING]",
        help="also compare the step with these extra bindings (repeatable), e.g. "
        "'xla_attention:ModelConfig.attention_impl=\"xla\"'",
    )
    p.add_argument("--steps", type=int, default=8, help="timed steps per kernel")
    p.add_argument("--profile", action="store_true", help="also time the step's parts alone")
    a = p.parse_args(argv)
    kernels = [prepare_gmm(k) if k == "auto" else k for k in a.gmm.split(",")]
    variants = []
    for kernel in kernels:
        variants.append((kernel, *load_configs(a.model, a.gin_file, [*a.gin, f"MoEConfig.gmm_backend='{kernel}'"])))
    for spec in a.variant:
        name, _, bindings = spec.partition(":")
        variants.append((name, *load_configs(a.model, a.gin_file, [*a.gin, *filter(None, bindings.split(";"))])))
    model_cfg, cfg = variants[0][1], variants[0][2]
    counts = count_params(model_cfg, cfg.seq_len)
    tokens = cfg.batch_size * cfg.seq_len
    print(environment())
    print(
        f"{a.model} ({a.gin_file}): {counts.total / 1e6:.2f}M params, {counts.activated / 1e6:.2f}M activated, "
        f"{counts.flops / cfg.seq_len / 1e6:.2f} MFLOP/token; {cfg.batch_size} x {cfg.seq_len} tokens per step\n"
    )
    runs = full_step_table(variants, a.steps)
    base = statistics.median(runs[0]["wall"])
    print("| variant | step (s) | CPU s/step | tokens/s | vs first | loss after the timed steps |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        w, c = statistics.median(r["wall"]), statistics.median(r["cpu"])
        print(f"| {r['name']} | {w:.4f} | {c:.3f} | {tokens / w:,.0f} | {base / w:.2f}x | {r['loss']:.6f} |")
    if a.profile:
        step_wall = statistics.median(runs[0]["wall"])
        step_cpu = statistics.median(runs[0]["cpu"])
        rows = profile_parts(model_cfg, cfg, max(3, a.steps // 2))
        print(f"\nParts of the step ({runs[0]['name']}), each timed alone, forward + backward:\n")
        print("| part | wall s/step | share of the step | CPU s/step |")
        print("|---|---|---|---|")
        top = [r for r in rows if not r[0].startswith("  ")]
        for name, w, c in rows:
            print(f"| {name} | {w:.4f} | {w / step_wall:.0%} | {c:.3f} |")
        total_w = sum(r[1] for r in top)
        print(f"| sum of the parts | {total_w:.4f} | {total_w / step_wall:.0%} | {sum(r[2] for r in top):.3f} |")
        print(f"| the whole step | {step_wall:.4f} | 100% | {step_cpu:.3f} |")


if __name__ == "__main__":
    main()

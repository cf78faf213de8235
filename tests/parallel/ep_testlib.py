"""Tiny models, meshes and a loss/grad step shared by the expert-parallel tests (not a test module)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.model.transformer import Transformer
from moe_jax.parallel import MeshConfig, batch_sharding, build_mesh, create_sharded, place
from moe_jax.train.loss import cross_entropy

VOCAB, BATCH, SEQ = 128, 8, 16

# XLA:CPU spends most of these tests compiling; its cheaper optimisation level is ~40% faster and does
# not change what is compared (both sides of every comparison are compiled the same way).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

MOE = {
    # DeepSeekMoE: fine-grained routed experts + shared expert isolation, all three balance terms.
    "deepseekmoe": MoEConfig(
        num_experts=16,
        num_shared_experts=2,
        expert_dim=8,
        top_k=6,
        expert_balance_alpha=0.01,
        device_balance_alpha=0.05,
        num_device_groups=4,
        router_z_loss_alpha=1e-3,
    ),
    # GShard: top-2 with the random second-expert policy (needs the step rng).
    "gshard": MoEConfig(num_experts=8, expert_dim=32, top_k=2, second_expert_policy="random"),
    "switch": MoEConfig(num_experts=8, expert_dim=32, top_k=1),
    "hash": MoEConfig(num_experts=8, expert_dim=32, top_k=1, router="hash"),
}


def model_config(name: str, **moe_overrides) -> ModelConfig:
    """2 layers, d_model 32; DeepSeekMoE has a dense first layer as at 16B/145B."""
    return ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        num_layers=2,
        num_heads=2,
        head_dim=16,
        ffn_dim=64,
        moe=dataclasses.replace(MOE[name], **moe_overrides),
        first_k_dense=1 if name == "deepseekmoe" else 0,
    )


def tokens(seed: int = 1, batch: int = BATCH) -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.key(seed), (batch, SEQ + 1), 0, VOCAB), np.int32)


def loss_fn(params, graphdef, rest, toks, rng):
    """Mean next-token cross-entropy + MoE aux losses; returns (loss, ModelOutput)."""
    model = nnx.merge(graphdef, params, rest)
    out = model(toks[:, :-1], rng=rng)
    total, count = cross_entropy(out.logits, toks[:, 1:])
    return total / count + out.aux_loss, out


def run(cfg: ModelConfig, toks, mesh=None, seed: int = 0, sharded_init: bool = False):
    """(loss, ModelOutput, grads of every Param) on one device (mesh=None) or on `mesh`.

    On a mesh the parameters are placed by the rules: built on one device and moved (`place`), or
    with `sharded_init` born sharded (`create_sharded`, one more compilation).
    """
    make = lambda: Transformer(cfg, nnx.Rngs(seed))
    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=1)
    rng = jax.random.key(7)

    def call(params, graphdef, rest, toks):
        compiled = step.lower(params, graphdef, rest, toks, rng).compile(compiler_options=FAST_COMPILE)
        return compiled(params, rest, toks, rng)

    if mesh is None:
        graphdef, params, rest = nnx.split(make(), nnx.Param, ...)
        (loss, out), grads = call(params, graphdef, rest, jnp.asarray(toks))
    else:
        model = create_sharded(make, mesh) if sharded_init else place(make(), mesh)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        toks = jax.device_put(toks, batch_sharding(mesh))
        with jax.set_mesh(mesh):
            (loss, out), grads = call(params, graphdef, rest, toks)
    return loss, out, grads


def mesh(spec: str, devices=None):
    return build_mesh(MeshConfig.from_string(spec), devices)

"""Jitted, mesh-sharded model functions used by evaluation: request scoring and held-out loss.

Batches are split over the mesh's batch axes (data, fsdp, expert) exactly as in training
(`moe_jax.parallel.shard_batch`), parameters stay where `load_trained` put them, the MoE layers see the
mesh through `jax.set_mesh` (expert parallelism), and the small per-row results come back replicated so
every process can read them. One compile per batch shape.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax.evaluate.scoring import Batch
from moe_jax.parallel import BATCH_AXES, process_batch_rows, shard_batch
from moe_jax.parallel.mesh import axes_size

# apply_fn(params, tokens [B, L] int32) -> logits [B, L, V] float32
ApplyFn = Callable[[object, jax.Array], jax.Array]


def model_apply_fn(graphdef, rest) -> ApplyFn:
    """logits of the nnx Transformer (split as graphdef/params/rest) at default positions 0..L-1."""

    def apply(params, tokens):
        return nnx.merge(graphdef, params, rest)(tokens).logits

    return apply


def make_score_step(apply_fn: ApplyFn) -> Callable:
    """step(params, inputs [B, L], targets [B, L], weights [B, L]) -> (logprob sum [B] (nats over targets
    with weight > 0), count [B], greedy [B] (every weighted target is the argmax))."""

    def step(params, inputs, targets, weights):
        logits = apply_fn(params, inputs).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        tlp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        w = weights.astype(jnp.float32)
        hit = (jnp.argmax(logits, axis=-1) == targets) | (w == 0)
        return jnp.sum(tlp * w, axis=1), jnp.sum(w, axis=1), jnp.all(hit, axis=1)

    return step


def batch_shards(mesh) -> int:
    """How many ways a batch is split (rows must be a multiple of it)."""
    return axes_size(mesh, BATCH_AXES)


class ModelScorer:
    """score(batch) -> (logprob [B], count [B], greedy [B]) numpy, for `scoring.score_requests`.

    Every process builds the same global batches; each feeds its own rows (`process_batch_rows`).
    """

    def __init__(self, apply_fn: ApplyFn, params, mesh):
        self.params, self.mesh = params, mesh
        self.row_multiple = batch_shards(mesh)
        self._step = jax.jit(make_score_step(apply_fn), out_shardings=NamedSharding(mesh, P()))

    def __call__(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = process_batch_rows(self.mesh, batch.inputs.shape[0])
        arrays = shard_batch((batch.inputs[rows], batch.targets[rows], batch.weights[rows]), self.mesh)
        with jax.set_mesh(self.mesh):
            out = self._step(self.params, *arrays)
        return tuple(np.asarray(jax.device_get(x)) for x in out)

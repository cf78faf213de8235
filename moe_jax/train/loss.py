"""The training objective: token cross-entropy plus the MoE auxiliary losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy and the number of weighted tokens.

    logits [B, S, V] float32, targets [B, S] int, weights broadcastable to [B, S] (1 = counted)
    -> (sum, count).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = jnp.ones_like(nll) if weights is None else jnp.broadcast_to(weights.astype(jnp.float32), nll.shape)
    return jnp.sum(nll * w), jnp.sum(w)

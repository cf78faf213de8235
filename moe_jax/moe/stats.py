"""Per-layer routing statistics returned with every MoE layer's output (for metrics and analyses)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class RoutingStats:
    """Statistics of one MoE layer on one batch (stacked to [L, ...] by the model).

    Attributes:
      tokens_per_expert: [E] float32 assignments computed per routed expert.
      max_load: max over experts of tokens_per_expert / mean (1.0 = perfectly balanced).
      dropped_fraction: fraction of active assignments not computed (capacity overflow).
      router_entropy: mean per-token entropy of the router scores, in nats (0 for hash routing).
    """

    tokens_per_expert: jax.Array
    max_load: jax.Array
    dropped_fraction: jax.Array
    router_entropy: jax.Array


def routing_stats(tokens_per_expert: jax.Array, dropped: jax.Array, mask: jax.Array,
                  probs: jax.Array | None) -> RoutingStats:
    """tokens_per_expert [E]; dropped, mask [T, k]; probs [T, E] or None."""
    counts = jax.lax.stop_gradient(tokens_per_expert.astype(jnp.float32))
    mean = jnp.maximum(counts.mean(), 1e-9)
    if probs is None:
        entropy = jnp.zeros((), jnp.float32)
    else:
        p = jax.lax.stop_gradient(probs)
        entropy = -jnp.mean(jnp.sum(p * jnp.log(jnp.maximum(p, 1e-20)), axis=-1))
    active = jnp.maximum(mask.sum(), 1)
    return RoutingStats(tokens_per_expert=counts, max_load=counts.max() / mean,
                        dropped_fraction=dropped.sum() / active, router_entropy=entropy)

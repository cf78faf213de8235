"""The oracle: a naive loop over experts, each applied to every token and masked by its gate.

O(E * T) expert FLOPs; only for tests and tiny models. Everything else is checked against it.
"""

from __future__ import annotations

import jax.numpy as jnp

from moe_jax.layers.mlp import swiglu
from moe_jax.moe.dispatch.base import DispatchOutput, ExpertParams, active_expert_ids, count_per_expert
from moe_jax.moe.gating import Routing


def reference_dispatch(x, routing: Routing, experts: ExpertParams) -> DispatchOutput:
    """y_t = sum_e (sum_k [indices[t,k] == e] * mask * weights[t,k]) * FFN_e(x_t). x [T, d] -> [T, d]."""
    y = jnp.zeros(x.shape, jnp.float32)
    for e in range(experts.num_experts):
        gate = jnp.sum(jnp.where((routing.indices == e) & routing.mask, routing.weights, 0.0), axis=-1)
        y = y + gate[:, None] * swiglu(x, experts.wi[e], experts.wo[e]).astype(jnp.float32)
    ids = active_expert_ids(routing.indices, routing.mask, experts.num_experts)
    return DispatchOutput(
        y=y.astype(x.dtype),
        tokens_per_expert=count_per_expert(ids, experts.num_experts),
        dropped=jnp.zeros(routing.mask.shape, bool),
    )

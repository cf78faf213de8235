"""What every dispatch strategy shares: the experts' weights, the SwiGLU expert, the result type.

A dispatch strategy is a function (its options keyword-only, declared in `moe_jax.moe.dispatch.DISPATCH_SPECS`)
    dispatch(x [T, d], routing: Routing, experts: ExpertParams, *, <its options>) -> DispatchOutput
that computes  y_t = sum_k mask[t,k] * weights[t,k] * FFN_{indices[t,k]}(x_t)  (paper Eq 3 / 9
without the shared experts and the residual), possibly dropping assignments (capacity).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class ExpertParams:
    """Stacked SwiGLU weights of E experts.

    Attributes:
      wi: [E, d, 2, f] fused input projection; [..., 0, :] is the gate, [..., 1, :] the up projection.
      wo: [E, f, d] output projection.
    """

    wi: jax.Array
    wo: jax.Array

    @property
    def num_experts(self) -> int:
        return self.wi.shape[0]


@struct.dataclass
class DispatchOutput:
    """Result of a dispatch.

    Attributes:
      y: [T, d] combined expert output (float32 accumulation, cast to x's dtype).
      tokens_per_expert: [E] int32 assignments each expert processed.
      dropped: [T, k] bool, active assignments that were not computed (capacity overflow).
    """

    y: jax.Array
    tokens_per_expert: jax.Array
    dropped: jax.Array


def combine(expert_out: jax.Array, weights: jax.Array, mask: jax.Array, dtype) -> jax.Array:
    """Weighted sum over the k choices in float32. expert_out [T, k, d], weights/mask [T, k] -> [T, d]."""
    w = jnp.where(mask, weights, 0.0).astype(jnp.float32)
    return jnp.einsum("tkd,tk->td", expert_out.astype(jnp.float32), w).astype(dtype)


def active_expert_ids(indices: jax.Array, mask: jax.Array, num_experts: int) -> jax.Array:
    """Flattened [T*k] expert ids in token-major order, with inactive assignments mapped to the
    sentinel id `num_experts` (sorted last, processed by nobody)."""
    return jnp.where(mask, indices, num_experts).reshape(-1).astype(jnp.int32)


def count_per_expert(expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """[N] ids in [0, E] (E = sentinel) -> [E] int32 counts, sentinel excluded."""
    return jnp.zeros(num_experts + 1, jnp.int32).at[expert_ids].add(1)[:num_experts]

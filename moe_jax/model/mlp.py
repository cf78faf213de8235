"""The dense SwiGLU FFN (also the fused shared experts of a MoE layer)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.moe.dispatch.base import swiglu


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x)) with a fused input kernel wi [d, 2, F] and wo [F, d]."""

    def __init__(self, d_model: int, hidden: int, *, init_std: float, param_dtype, rngs: nnx.Rngs):
        k1, k2 = rngs.params(), rngs.params()
        self.wi = nnx.Param(init_std * jax.random.normal(k1, (d_model, 2, hidden), param_dtype),
                            axes=("embed", None, "mlp"))
        self.wo = nnx.Param(init_std * jax.random.normal(k2, (hidden, d_model), param_dtype),
                            axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return swiglu(x, self.wi[...].astype(x.dtype), self.wo[...].astype(x.dtype))

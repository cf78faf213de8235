"""The SwiGLU FFN: the one `swiglu` function (dense FFN, shared experts, every routed expert) and the
dense `MLP` module (also the fused shared experts of a MoE layer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def swiglu_activation(h: jax.Array) -> jax.Array:
    """silu(gate) * up from the fused input projection. h [..., 2, f] (gate, up) -> [..., f].

    Shared by `swiglu` and the dispatches that batch the projections themselves (per expert, or as
    grouped matmuls), so that every expert computes the same function."""
    return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


def swiglu(x: jax.Array, wi: jax.Array, wo: jax.Array) -> jax.Array:
    """One SwiGLU FFN: down(silu(gate(x)) * up(x)). x [..., d], wi [d, 2, f], wo [f, d] -> [..., d]."""
    h = jnp.einsum("...d,dcf->...cf", x, wi)
    return jnp.einsum("...f,fd->...d", swiglu_activation(h), wo)


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x)) with a fused input kernel wi [d, 2, F] and wo [F, d]."""

    def __init__(self, d_model: int, hidden: int, *, init_std: float, param_dtype, rngs: nnx.Rngs):
        k1, k2 = rngs.params(), rngs.params()
        self.wi = nnx.Param(
            init_std * jax.random.normal(k1, (d_model, 2, hidden), param_dtype), axes=("embed", None, "mlp")
        )
        self.wo = nnx.Param(init_std * jax.random.normal(k2, (hidden, d_model), param_dtype), axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return swiglu(x, self.wi[...].astype(x.dtype), self.wo[...].astype(x.dtype))

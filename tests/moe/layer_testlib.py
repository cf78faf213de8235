"""A loss through one MoE layer and its gradients, shared by the layer tests (not a test module)."""

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.moe.layer import MoELayer


def layer_loss(params, rest, graphdef, x):
    """sum(sin(y)) plus the layer's auxiliary losses, for the layer (graphdef, params, rest) on `x`;
    returns (loss, (y, aux))."""
    y, aux = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(jnp.sin(y)) + aux.losses.total, (y, aux)


# ((loss, (y, aux)), (d params, d x)) of `layer_loss`, jitted (graphdef static).
layer_loss_grad = jax.jit(jax.value_and_grad(layer_loss, argnums=(0, 3), has_aux=True), static_argnums=2)


def layer_grads(cfg, x):
    """`layer_loss_grad` of MoELayer(cfg, nnx.Rngs(0)) on `x`."""
    graphdef, params, rest = nnx.split(MoELayer(cfg, nnx.Rngs(0)), nnx.Param, ...)
    return layer_loss_grad(params, rest, graphdef, x)

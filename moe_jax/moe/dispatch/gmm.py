"""Grouped matrix multiplication kernels for the dropless dispatch.

A kernel computes, for rows sorted by expert,
    gmm(lhs [M, K], rhs [E, K, N], group_sizes [E]) -> [M, N]
where rows [offset_e, offset_e + group_sizes[e]) are multiplied by rhs[e] and rows past
sum(group_sizes) are zero (in the output and in every gradient).

Kernels are registered by name; `get_gmm("auto")` picks the best measured one for the platform.
"""
from __future__ import annotations

from typing import Callable

import jax

GmmFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

_GMM_KERNELS: dict[str, GmmFn] = {}


def register_gmm(name: str):
    """Decorator adding a grouped-matmul kernel under `name`."""

    def wrap(fn: GmmFn) -> GmmFn:
        _GMM_KERNELS[name] = fn
        return fn

    return wrap


@register_gmm("ragged_dot")
def ragged_dot_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """jax.lax.ragged_dot: native on TPU/GPU; on XLA:CPU a dense fallback costing E x the FLOPs."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jax.numpy.int32))


def available_gmm() -> tuple[str, ...]:
    return tuple(_GMM_KERNELS)


def get_gmm(name: str = "auto", platform: str | None = None) -> GmmFn:
    """The kernel registered as `name`; "auto" chooses per platform (jax.default_backend())."""
    if name == "auto":
        name = "ragged_dot"
    if name not in _GMM_KERNELS:
        raise ValueError(f"unknown gmm backend {name!r}; available: {available_gmm()}")
    return _GMM_KERNELS[name]

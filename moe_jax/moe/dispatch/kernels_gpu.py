"""Grouped matmul for GPUs: `jax.lax.ragged_dot` with JAX's Pallas/Triton lowering.

    triton_ragged_dot_gmm(lhs [M, K], rhs [E, K, N], group_sizes [E]) -> [M, N]

XLA's default GPU lowering of ragged_dot reaches ~15% of an H100's matmul peak and may rewrite the
weight gradient into a dense [E, M, ...] product that runs out of memory (reported in the marin project,
github.com/marin-community/marin PR #4297 and issue #6979). jax >= 0.10 has an opt-in lowering to a
Pallas/Triton grouped GEMM, switched on by the config flag `jax_ragged_dot_use_gpu_pallas_triton_lowering`.
The flag is read when XLA lowers the whole program (not when our function is traced), so it must be set
process-wide before jitting:
`gmm.prepare_gmm("auto")` does that on a GPU; the kernel also sets it when first traced on a GPU
(a program traced before that is then lowered once more). Where the Pallas lowering module is
missing (e.g. some jax builds) the default lowering is kept. On CPU the flag is ignored and this is
the dense ragged_dot fallback: correct (tested) but slow.

The gradients are JAX's ragged_dot transposes (dlhs: ragged_dot with rhs transposed; drhs: the
ragged-contraction form), lowered by the same rule.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp

FLAG = "jax_ragged_dot_use_gpu_pallas_triton_lowering"
_PALLAS_MODULE = "jax._src.lax.pallas_lowerings.gpu.ragged_dot"
GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def triton_lowering_available() -> bool:
    """Whether this jax has the flag and the Pallas/Triton ragged_dot lowering module."""
    if not hasattr(jax.config, FLAG):
        return False
    try:
        return importlib.util.find_spec(_PALLAS_MODULE) is not None
    except ImportError:
        return False


def enable_triton_ragged_dot() -> bool:
    """Set the flag process-wide if the lowering exists; returns whether it is on."""
    if not triton_lowering_available():
        return False
    if not getattr(jax.config, FLAG):
        jax.config.update(FLAG, True)
    return True


def triton_ragged_dot_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """ragged_dot with the Triton lowering on GPU (see the module docstring); output in lhs.dtype."""
    if jax.default_backend() in GPU_PLATFORMS:
        enable_triton_ragged_dot()
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=lhs.dtype)

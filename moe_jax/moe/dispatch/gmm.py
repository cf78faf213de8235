"""Grouped matrix multiplication kernels for the dropless dispatch.

A kernel computes, for rows sorted by expert,
    gmm(lhs [M, K], rhs [E, K, N], group_sizes [E]) -> [M, N]
where rows [offset_e, offset_e + group_sizes[e]) are multiplied by rhs[e] and rows past
sum(group_sizes) are zero (in the output and in every gradient).

Kernels are registered by name; `get_gmm("auto")` picks the best one for the platform:

  name                     backend     how                                                module
  "chunked"                CPU         loop over experts, static-size row chunks, custom VJP  kernels_cpu
  "mosaic_gpu"             GPU (H100)  Pallas Mosaic-GPU kernels (wgmma), custom VJP          kernels_mosaic
  "mosaic_gpu_chunked_dw"  GPU (H100)  the same, weight gradient as chunked XLA dots          kernels_mosaic
  "ragged_dot_triton"      GPU         jax.lax.ragged_dot with the Pallas/Triton lowering     kernels_gpu
  "ragged_dot"             TPU         jax.lax.ragged_dot (XLA:CPU: dense fallback, E x the   here
                                       FLOPs; XLA:GPU: its default lowering, ~15% of peak)

On a GPU, "auto" is the first of GPU_PREFERENCE that can run here (`gmm_usable`): "mosaic_gpu" if
the kernels import and the device is a Hopper (sm_90), else "ragged_dot_triton" if this jax has the
Triton lowering (the 0.10.2 wheel does not), else "ragged_dot". The order is the expected speed
(Hopper wgmma kernel > Triton grouped GEMM > XLA's default); benchmarks/gpu_check.py measures every
usable one and prints which "auto" chose. Measurements behind the choices: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

from moe_jax.moe.dispatch import kernels_cpu, kernels_gpu, kernels_mosaic

GmmFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

_GMM_KERNELS: dict[str, GmmFn] = {}

GPU_PREFERENCE = ("mosaic_gpu", "ragged_dot_triton", "ragged_dot")  # fastest first; see gmm_usable
AUTO_BY_PLATFORM = {
    "cpu": "chunked",
    "gpu": GPU_PREFERENCE,
    "cuda": GPU_PREFERENCE,
    "rocm": ("ragged_dot_triton", "ragged_dot"),
    "tpu": "ragged_dot",
}


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


register_gmm("chunked")(kernels_cpu.chunked_gmm)
register_gmm("ragged_dot_triton")(kernels_gpu.triton_ragged_dot_gmm)
register_gmm("mosaic_gpu")(kernels_mosaic.mosaic_gmm)
# The same with the weight gradient as XLA dots over row chunks (not chosen by "auto"; measured by
# benchmarks/gpu_check.py next to "mosaic_gpu", in case jax's transposed Mosaic kernel misbehaves).
register_gmm("mosaic_gpu_chunked_dw")(
    functools.partial(kernels_mosaic.mosaic_gmm, config=kernels_mosaic.MosaicConfig(weight_grad="chunked"))
)

# Whether a GPU kernel can run in this process (a name not listed here always can).
_USABLE = {
    "mosaic_gpu": kernels_mosaic.available,
    "mosaic_gpu_chunked_dw": kernels_mosaic.available,
    "ragged_dot_triton": kernels_gpu.triton_lowering_available,
}


def gmm_usable(name: str) -> bool:
    """Whether kernel `name` can run here: "mosaic_gpu" needs its kernels importable and a Hopper GPU,
    "ragged_dot_triton" the Pallas/Triton lowering module in this jax; the others run anywhere."""
    return _USABLE.get(name, lambda: True)()


def available_gmm() -> tuple[str, ...]:
    return tuple(_GMM_KERNELS)


def resolve_gmm(name: str = "auto", platform: str | None = None) -> str:
    """The kernel name `name` stands for: itself, or for "auto" the choice for `platform`
    (default jax.default_backend()): a name, or for GPUs the first usable name of a preference order
    (`gmm_usable`); unknown platforms get "chunked", which runs anywhere."""
    if name != "auto":
        return name
    choice = AUTO_BY_PLATFORM.get(platform or jax.default_backend(), "chunked")
    if isinstance(choice, str):
        return choice
    return next((n for n in choice if gmm_usable(n)), choice[-1])


def get_gmm(name: str = "auto", platform: str | None = None) -> GmmFn:
    """The kernel registered as `name`; "auto" chooses per platform (see `resolve_gmm`)."""
    name = resolve_gmm(name, platform)
    if name not in _GMM_KERNELS:
        raise ValueError(f"unknown gmm backend {name!r}; available: {available_gmm()}")
    return _GMM_KERNELS[name]


def prepare_gmm(name: str = "auto", platform: str | None = None) -> str:
    """Process-wide setup a kernel needs before anything is jitted (the GPU Triton lowering is a
    jax config flag read when XLA lowers); call once at program start. Returns the resolved name."""
    name = resolve_gmm(name, platform)
    if name == "ragged_dot_triton":
        kernels_gpu.enable_triton_ragged_dot()
    return name

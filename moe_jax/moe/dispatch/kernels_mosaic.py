"""Grouped matmul on Hopper GPUs: JAX's Pallas Mosaic-GPU kernels behind a custom VJP.

    mosaic_gmm(lhs [M, K], rhs [E, K, N], group_sizes [E]) -> [M, N]

The jax wheel ships two grouped-matmul kernels for Hopper (wgmma + TMA, sm_90a) in
`jax.experimental.pallas.ops.gpu`; the three products of forward and backward are:
    out  [M, N]    = ragged_dot_mgpu.ragged_dot(lhs, rhs)                     rows of e: lhs_e @ rhs[e]
    dlhs [M, K]    = ragged_dot_mgpu.ragged_dot(g, rhs, transpose_rhs=True)   rows of e: g_e @ rhs[e]^T
    drhs [E, K, N] = transposed_ragged_dot_mgpu.transposed_ragged_dot(lhs, g)  [e] = lhs_e^T @ g_e
The input gradient reads rhs [E, K, N] as the transposed weights in place (no transpose copy).
`MosaicConfig(weight_grad="chunked")` computes drhs with kernels_cpu's loop of row-chunk XLA dots
instead (registered as "mosaic_gpu_chunked_dw"). As for every gmm kernel, sum(group_sizes) <= M.

Why a custom VJP: a Mosaic-GPU kernel is opaque to autodiff (it has no JVP or transpose rule), so
the backward pass is stated as the two other kernels.

What the kernels accept, and what `mosaic_gmm` does about the rest (all decided at trace time):
  * dtypes: bfloat16 or float16 with lhs.dtype == rhs.dtype (wgmma operands; accumulation is
    float32, the output lhs.dtype). Anything else falls back to `jax.lax.ragged_dot` (XLA's own
    lowering, same contract), so a float32 model still runs, slowly.
  * divisibility: every contracted dimension a multiple of block_k (64), every output dimension a
    multiple of its block (the configured 128, or 64 when that divides and 128 does not), the rows
    a multiple of block_m and block_k. A dimension that is not is zero-padded up to one (zeros add
    nothing) and the result sliced back: free when it divides (d_model 1280, 2 x 864 = 1728), a
    copy of the operand and of the result when it does not (expert width 864 -> 896 in the wo
    products; the paper's 2B width 853: 853 -> 896 and 2 x 853 = 1706 -> 1792).
  * rows past sum(group_sizes): the forward kernel never writes them (their memory is
    uninitialised), so the output and the input gradient are zeroed there (a select XLA fuses into
    the consumer); the weight-gradient kernel reads whole block_k-row blocks and masks the rows of
    neighbouring groups by multiplying with 0, which keeps a NaN, so lhs and g are zeroed past the
    groups before it runs.
  * device: the kernels are Hopper-only (wgmma); `available()` says whether they import and the
    default device has compute capability 9.x. Not yet run under `jax.shard_map` (expert parallelism).

`kernels=` substitutes other kernels with the same signatures and contract; `emulated_kernels()`
is that contract in plain jnp (CPU), which the tests use to check this wrapper's padding, masking,
slicing and custom VJP against the per-expert reference without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.moe.dispatch import kernels_cpu
from moe_jax.moe.dispatch.kernels_cpu import _varying_like

MOSAIC_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tile sizes of the kernels (their `main()` autotunes over these; 128/128/64/4/1 is a middle
    choice that fits the shared memory of an H100: (128*64 + 64*128) * 2 B * 4 stages = 128 KiB).

    weight_grad: "mosaic" (transposed_ragged_dot_mgpu) or "chunked" (kernels_cpu's per-expert loop
    of row-chunk matmuls, plain XLA dots): a fallback, because jax's own test of the transposed
    kernel is skipped in its CI ("broken in CI", jax tests/pallas/mgpu_ragged_dot_test.py).
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    grid_block_n: int = 1
    weight_grad: str = "mosaic"

    def __post_init__(self):
        if self.weight_grad not in ("mosaic", "chunked"):
            raise ValueError(f"MosaicConfig.weight_grad={self.weight_grad!r}: use 'mosaic' or 'chunked'")


class Kernels(NamedTuple):
    """ragged_dot(lhs [M, K], rhs [G, K, N] (or [G, N, K] with transpose_rhs), *, group_sizes,
    block_m, block_n, block_k, max_concurrent_steps, grid_block_n, transpose_rhs) -> [M, N];
    transposed_ragged_dot(lhs [R, K], rhs [R, N], *, group_sizes, block_m, block_n, block_k,
    max_concurrent_steps, grid_block_n) -> [G, K, N]; dtypes: the operand dtypes they take."""

    ragged_dot: Callable
    transposed_ragged_dot: Callable
    dtypes: tuple = MOSAIC_DTYPES


@functools.lru_cache(maxsize=None)
def mosaic_kernels() -> Kernels:
    """The Pallas Mosaic-GPU kernels of this jax (ImportError if it lacks them)."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

    return Kernels(ragged_dot_mgpu.ragged_dot, transposed_ragged_dot_mgpu.transposed_ragged_dot)


def importable() -> bool:
    """Whether this jax ships the two kernels (true of the 0.10.2 wheel, on any platform)."""
    try:
        mosaic_kernels()
    except ImportError:
        return False
    return True


def hopper_visible() -> bool:
    """Whether the default device is a CUDA GPU of compute capability 9.x (the kernels use wgmma)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    cc = getattr(dev, "compute_capability", None)
    return dev.platform == "gpu" and isinstance(cc, str) and cc.split(".")[0] == "9"


def available() -> bool:
    """The kernels import and can run here (a Hopper GPU is the default device)."""
    return importable() and hopper_visible()


# ------------------------------------------------------------------------------------------------
# Padding and masking
# ------------------------------------------------------------------------------------------------


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Zero-pad x at the end of each axis up to `shape` (x itself when it already has it)."""
    if tuple(x.shape) == tuple(shape):
        return x
    return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def _out_block(n: int, block: int) -> int:
    """Output tile along a dimension of size n: `block` if it divides n, else 64 if that divides
    (1728 = 27 x 64), else `block` (n is then padded to a multiple of it)."""
    if n % block == 0:
        return block
    return 64 if n % 64 == 0 and block > 64 else block


def _rows_in_groups(x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, ...] with rows past sum(group_sizes) set to 0 (also NaN: a select, not a product)."""
    rows = jnp.arange(x.shape[0], dtype=jnp.int32)
    keep = rows < jnp.sum(group_sizes.astype(jnp.int32))
    return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def _row_multiple(cfg: MosaicConfig) -> int:
    """Rows are padded to this: whole block_m tiles (forward) and block_k tiles (weight gradient)."""
    return math.lcm(cfg.block_m, cfg.block_k)


# ------------------------------------------------------------------------------------------------
# The three products
# ------------------------------------------------------------------------------------------------


def _tiles(cfg: MosaicConfig) -> dict:
    return dict(block_k=cfg.block_k, max_concurrent_steps=cfg.max_concurrent_steps, grid_block_n=cfg.grid_block_n)


def _grouped_rows(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, kern: Kernels, cfg: MosaicConfig, transpose_w: bool
) -> jax.Array:
    """Rows of group e times w[e] (transpose_w: times w[e]^T), zero past the groups.

    x [M, A]; w [E, A, B], or [E, B, A] with transpose_w -> [M, B] in x.dtype. A is padded to a
    multiple of block_k, B to one of its output tile, M to whole row tiles.
    """
    m, a = x.shape
    b = w.shape[1] if transpose_w else w.shape[2]
    bn = _out_block(b, cfg.block_n)
    mp, ap, bp = _round_up(m, _row_multiple(cfg)), _round_up(a, cfg.block_k), _round_up(b, bn)
    wp = _pad_to(w, (w.shape[0], bp, ap) if transpose_w else (w.shape[0], ap, bp))
    out = kern.ragged_dot(
        _pad_to(x, (mp, ap)),
        wp,
        group_sizes=group_sizes,
        block_m=cfg.block_m,
        block_n=bn,
        transpose_rhs=transpose_w,
        **_tiles(cfg),
    )
    return _rows_in_groups(out[:m, :b], group_sizes)


def _grouped_outer(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, kern: Kernels, cfg: MosaicConfig) -> jax.Array:
    """tgmm: [E, K, N] with [e] = x_e^T @ dy_e over the rows of group e (an empty group: zeros).

    x [M, K], dy [M, N] -> [E, K, N] in x.dtype. Rows past the groups are zeroed first (the kernel
    masks neighbouring rows by a product); M is padded to whole block_k tiles, K and N to tiles.
    """
    m, k = x.shape
    n = dy.shape[1]
    bm, bn = _out_block(k, cfg.block_m), _out_block(n, cfg.block_n)
    mp, kp, np_ = _round_up(m, _row_multiple(cfg)), _round_up(k, bm), _round_up(n, bn)
    xp = _pad_to(_rows_in_groups(x, group_sizes), (mp, kp))
    dyp = _pad_to(_rows_in_groups(dy, group_sizes), (mp, np_))
    # The kernel's grid sizes are traced int arithmetic that needs standard promotion (jax's own test).
    with jax.numpy_dtype_promotion("standard"):
        out = kern.transposed_ragged_dot(xp, dyp, group_sizes=group_sizes, block_m=bm, block_n=bn, **_tiles(cfg))
    return out[:, :k, :n]


# Custom VJP: the Mosaic kernels have no autodiff rules, so the backward is the two other products.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _mosaic_gmm(lhs, rhs, group_sizes, kern, cfg):
    return _grouped_rows(lhs, rhs, group_sizes, kern, cfg, transpose_w=False)


def _fwd(lhs, rhs, group_sizes, kern, cfg):
    return _grouped_rows(lhs, rhs, group_sizes, kern, cfg, transpose_w=False), (lhs, rhs, group_sizes)


def _bwd(kern, cfg, res, g):
    lhs, rhs, group_sizes = res
    g = g.astype(lhs.dtype)
    dlhs = _grouped_rows(g, rhs, group_sizes, kern, cfg, transpose_w=True)
    if cfg.weight_grad == "chunked":
        sizes = kernels_cpu._chunk_sizes(kernels_cpu.DEFAULT_CHUNKS, lhs.shape[0])
        drhs = kernels_cpu._grouped_outer(lhs, g, group_sizes, sizes)
    else:
        drhs = _grouped_outer(lhs, g, group_sizes, kern, cfg)
    return dlhs, drhs.astype(rhs.dtype), None


_mosaic_gmm.defvjp(_fwd, _bwd)


def mosaic_gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    config: MosaicConfig = MosaicConfig(),
    kernels: Kernels | None = None,
) -> jax.Array:
    """Grouped matmul on the Mosaic-GPU kernels (module docstring). lhs [M, K], rhs [E, K, N],
    group_sizes [E] -> [M, N] in lhs.dtype; rows past sum(group_sizes) are zero, and so are their
    gradients. Operands the kernels do not take (see `Kernels.dtypes`) go to jax.lax.ragged_dot.
    `kernels`: default the Mosaic-GPU ones (`mosaic_kernels()`); `emulated_kernels()` on CPU."""
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1] or group_sizes.shape != rhs.shape[:1]:
        raise ValueError(f"mosaic_gmm: bad shapes lhs {lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape}")
    kern = kernels or Kernels(None, None)
    group_sizes = group_sizes.astype(jnp.int32)
    if lhs.dtype != rhs.dtype or jnp.dtype(lhs.dtype) not in tuple(map(jnp.dtype, kern.dtypes)):
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype)
    if kernels is None:
        if not hopper_visible():
            raise ValueError(
                f"gmm backend mosaic_gpu needs a Hopper GPU (compute capability 9.x) as the default "
                f"device, not {jax.devices()[0].device_kind}: use gmm_backend='auto' (it picks what "
                f"runs here) or 'ragged_dot'"
            )
        kern = mosaic_kernels()
    if lhs.shape[0] == 0:
        return jnp.zeros((0, rhs.shape[2]), lhs.dtype)
    lhs, rhs = _varying_like(lhs, rhs, group_sizes), _varying_like(rhs, lhs, group_sizes)
    return _mosaic_gmm(lhs, rhs, group_sizes, kern, config)


# ------------------------------------------------------------------------------------------------
# The kernels' contract in plain jnp (for testing the wrapper on CPU)
# ------------------------------------------------------------------------------------------------


def _check_tiles(name: str, dims: dict[str, tuple[int, int]]) -> None:
    for what, (size, block) in dims.items():
        if size % block:
            raise ValueError(f"{name}: {what}={size} must be a multiple of {block}")


def _emulated_ragged_dot(
    lhs, rhs, *, group_sizes, block_m, block_n, block_k, max_concurrent_steps, grid_block_n, transpose_rhs=False
):
    """ragged_dot_mgpu.ragged_dot's contract: same dtype, tiles dividing M, K, N; out in lhs.dtype
    from a float32 accumulation; rows outside every group unwritten (here: NaN)."""
    if lhs.dtype != rhs.dtype:
        raise NotImplementedError(f"lhs and rhs must have the same dtype, got {lhs.dtype} and {rhs.dtype}")
    w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    if w.shape[1] != lhs.shape[1]:
        raise ValueError(f"contracted sizes differ: lhs {lhs.shape}, rhs {rhs.shape}, transpose_rhs={transpose_rhs}")
    _check_tiles("ragged_dot", {"m": (lhs.shape[0], block_m), "k": (lhs.shape[1], block_k), "n": (w.shape[2], block_n)})
    out = jax.lax.ragged_dot(lhs, w, group_sizes, preferred_element_type=jnp.float32)
    rows = jnp.arange(lhs.shape[0])
    out = jnp.where((rows < jnp.sum(group_sizes))[:, None], out, jnp.nan)
    return out.astype(lhs.dtype)


def _emulated_transposed_ragged_dot(
    lhs, rhs, *, group_sizes, block_m, block_n, block_k, max_concurrent_steps, grid_block_n
):
    """transposed_ragged_dot's contract: [g] = lhs_g^T @ rhs_g, read in whole block_k-row blocks whose
    rows outside group g are masked by a product with 0 (a NaN there leaks into [g]); empty: zeros."""
    if lhs.dtype != rhs.dtype:
        raise NotImplementedError(f"lhs and rhs must have the same dtype, got {lhs.dtype} and {rhs.dtype}")
    _check_tiles(
        "transposed_ragged_dot",
        {"rows": (lhs.shape[0], block_k), "m": (lhs.shape[1], block_m), "n": (rhs.shape[1], block_n)},
    )
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    rows = jnp.arange(lhs.shape[0])[None, :]
    in_group = (rows >= starts[:, None]) & (rows < ends[:, None])  # [G, R]
    read = (rows >= starts[:, None] // block_k * block_k) & (rows < -(-ends[:, None] // block_k) * block_k)
    a = jnp.where(read[..., None], lhs.astype(jnp.float32) * in_group[..., None], 0.0)  # NaN * 0 stays NaN
    b = jnp.where(read[..., None], rhs.astype(jnp.float32)[None], 0.0)
    out = jnp.einsum("grk,grn->gkn", a, b)
    return jnp.where((group_sizes > 0)[:, None, None], out, 0.0).astype(lhs.dtype)


def emulated_kernels(dtypes=(jnp.float32, jnp.bfloat16, jnp.float16)) -> Kernels:
    """Stand-ins with the Mosaic kernels' signatures and contract (checks, unwritten rows, masking),
    in plain jnp: CPU tests of `mosaic_gmm` substitute them for the real kernels."""
    return Kernels(_emulated_ragged_dot, _emulated_transposed_ragged_dot, tuple(map(jnp.dtype, dtypes)))

"""Checks of a training run that the dataclasses cannot make alone, run before anything is compiled
or written to the workdir (issue 18): kernel names, the hash router's frequency table, and how the
gradient-accumulation micro-batch splits over the mesh. Each message names the setting to change.

The single-field checks (capacity_factor > 0, learning_rate > 0, choices of router/dispatch, ...) live
in `MoEConfig` / `ModelConfig` / `TrainConfig.__post_init__`, so they fail while gin is parsed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.parallel.mesh import axis_size
from moe_jax.parallel.rules import BATCH_AXES
from moe_jax.train.config import TrainConfig


class RunConfigError(ValueError):
    """A configuration that cannot train; the message names every problem and the setting to change."""


def gmm_problems(model_cfg: ModelConfig) -> list[str]:
    """An unknown `MoEConfig.gmm_backend` (it would otherwise fail while the step is traced)."""
    moe = model_cfg.moe
    if moe is None or not moe.num_experts:
        return []
    from moe_jax.moe.dispatch.gmm import available_gmm

    known = ("auto", *available_gmm())
    if moe.gmm_backend not in known:
        return [
            f"MoEConfig.gmm_backend={moe.gmm_backend!r} is not one of {known}: set "
            f"--gin.MoEConfig.gmm_backend to one of them ('auto' picks the platform's fastest)"
        ]
    return []


def hash_table_problems(model_cfg: ModelConfig) -> list[str]:
    """A balanced hash table needs a readable [vocab_size] array of non-negative token counts."""
    moe = model_cfg.moe
    if moe is None or moe.router != "hash" or moe.hash_table != "balanced" or not moe.num_experts:
        return []
    path = Path(moe.hash_frequencies)
    fix = (
        f"give --gin.MoEConfig.hash_frequencies a .npy of {model_cfg.vocab_size} token counts (one per "
        f"vocabulary entry), or use MoEConfig.hash_table='random'"
    )
    if not path.is_file():
        return [f"MoEConfig.hash_frequencies={str(path)!r} does not exist: {fix}"]
    try:
        freqs = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        return [f"MoEConfig.hash_frequencies={str(path)!r} is not a .npy array ({err}): {fix}"]
    if freqs.shape != (model_cfg.vocab_size,):
        return [
            f"MoEConfig.hash_frequencies={str(path)!r} has shape {freqs.shape}, but the model's vocabulary needs "
            f"({model_cfg.vocab_size},): {fix}"
        ]
    if not np.issubdtype(freqs.dtype, np.number) or not np.all(np.isfinite(freqs)) or np.any(freqs < 0):
        return [f"MoEConfig.hash_frequencies={str(path)!r} must hold finite non-negative counts: {fix}"]
    return []


def micro_batch_problems(cfg: TrainConfig, mesh) -> list[str]:
    """With gradient accumulation each micro-batch (batch_size / grad_accum_steps) is split over the
    batch shards of the mesh, so it must divide by them too."""
    if cfg.grad_accum_steps <= 1:
        return []
    micro = cfg.batch_size // cfg.grad_accum_steps
    shards = math.prod(axis_size(mesh, a) for a in BATCH_AXES)
    if micro % shards == 0:
        return []
    axes = " x ".join(f"{a}={axis_size(mesh, a)}" for a in BATCH_AXES)
    fits = [a for a in range(1, cfg.batch_size + 1) if cfg.batch_size % a == 0 and (cfg.batch_size // a) % shards == 0]
    hint = (
        f"set --gin.TrainConfig.grad_accum_steps to one of {fits}"
        if fits
        else f"make TrainConfig.batch_size a multiple of {shards * cfg.grad_accum_steps}"
    )
    return [
        f"the micro-batch of {micro} sequences (batch_size {cfg.batch_size} / grad_accum_steps "
        f"{cfg.grad_accum_steps}) does not divide by the {shards} batch shards ({axes}): {hint}, or change --mesh"
    ]


def validate_run(model_cfg: ModelConfig, cfg: TrainConfig, mesh) -> None:
    """Raise RunConfigError listing every problem above (call before compiling or writing anything)."""
    problems = gmm_problems(model_cfg) + hash_table_problems(model_cfg) + micro_batch_problems(cfg, mesh)
    if problems:
        raise RunConfigError("cannot train this configuration:\n  - " + "\n  - ".join(problems))

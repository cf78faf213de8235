"""AdamW with the paper's learning-rate schedules, gradient clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from moe_jax.train.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup 0 -> peak over `warmup_steps`, then constant or step decay (paper §4.1.3):
    multiplied by `decay_factor` at each boundary (fractions of `steps`, counted from step 0)."""
    peak = cfg.learning_rate
    warmup = optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        boundaries = {int(round(b * cfg.steps)) - cfg.warmup_steps: cfg.decay_factor for b in cfg.decay_boundaries}
        after = optax.piecewise_constant_schedule(peak, {k: v for k, v in boundaries.items() if k > 0})
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def weight_decay_mask(params: nnx.State, decay_norms: bool = False) -> nnx.State:
    """True for every parameter AdamW should decay: all but RMSNorm scales (unless `decay_norms`)."""

    def decays(v: nnx.Variable):
        axes = v.get_metadata().get("axes", ())
        return v.replace(decay_norms or "norm" not in axes)

    return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) then AdamW(schedule, beta1, beta2, eps, weight_decay, mask)."""
    adamw = optax.adamw(
        learning_rate_schedule(cfg),
        b1=cfg.beta1,
        b2=cfg.beta2,
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        mask=lambda p: weight_decay_mask(p, cfg.decay_norms),
    )
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw

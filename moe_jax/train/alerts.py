"""Console alerts for a run that trains but not as intended (issue 18): MoE layers that keep
dropping most token-to-expert assignments (a capacity or buffer factor far too small)."""

from __future__ import annotations

import re
from typing import Callable, Mapping

from moe_jax.config import ModelConfig

DROP_THRESHOLD = 0.5
DROP_PATIENCE = 3  # consecutive logged steps above the threshold before saying so
_LAYER_DROP = re.compile(r"^moe/layer\d+/dropped_fraction$")


def mean_dropped_fraction(scalars: Mapping[str, float]) -> float | None:
    """Mean over MoE layers of the fraction of assignments dropped (None when not logged)."""
    values = [v for k, v in scalars.items() if _LAYER_DROP.match(k)]
    if values:
        return sum(values) / len(values)
    return scalars.get("moe/mean_dropped_fraction")


class DropWatch:
    """Says once on the console when the dropped fraction stays above half for DROP_PATIENCE logged steps."""

    def __init__(self, model_cfg: ModelConfig, log: Callable[[str], None] = print):
        self.model_cfg = model_cfg
        self.log = log
        self.run: list[float] = []
        self.said = False

    def update(self, step: int, scalars: Mapping[str, float]) -> None:
        frac = mean_dropped_fraction(scalars)
        if frac is None or self.said:
            return
        self.run = self.run + [frac] if frac > DROP_THRESHOLD else []
        if len(self.run) >= DROP_PATIENCE:
            self.said = True
            moe = self.model_cfg.moe
            settings = (
                f"MoEConfig.dispatch={moe.dispatch!r}, capacity_factor={moe.capacity_factor}, "
                f"expert_parallel={moe.expert_parallel!r}, ep_buffer_factor={moe.ep_buffer_factor}"
            )
            self.log(
                f"warning: at step {step} the MoE layers have dropped more than half of the token-to-expert "
                f"assignments for {len(self.run)} logged steps running (last: {self.run[-1]:.0%}; {settings}): "
                f"most tokens skip their experts. Raise MoEConfig.capacity_factor (1.0-2.0 is usual) or "
                f"ep_buffer_factor, or use dispatch='dropless'."
            )

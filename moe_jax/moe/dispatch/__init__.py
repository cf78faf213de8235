"""Dispatch strategies behind one interface (see `base.py`), selected by `MoEConfig.dispatch`.

`DISPATCH_SPECS` is the registry: each dispatch function with the options it takes (keyword-only, each
named like the MoEConfig field that sets it). `get_dispatch` binds a dispatch's options once and
refuses an option it does not declare; `dispatch_from_config` does so from a MoEConfig, once per
MoE layer at construction.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from moe_jax.config import MoEConfig, check_registry
from moe_jax.moe.dispatch.base import DispatchOutput, ExpertParams
from moe_jax.moe.dispatch.capacity import capacity_dispatch
from moe_jax.moe.dispatch.dropless import dropless_dispatch
from moe_jax.moe.dispatch.gmm import available_gmm
from moe_jax.moe.dispatch.reference import reference_dispatch
from moe_jax.moe.gating import Routing


@dataclasses.dataclass(frozen=True)
class DispatchSpec:
    """A dispatch function fn(x, routing, experts, **options) -> DispatchOutput and its option names."""

    fn: Callable[..., DispatchOutput]
    options: tuple[str, ...]


# Keyed by the names of `moe_jax.config.DISPATCHES` (checked below).
DISPATCH_SPECS = {
    "dropless": DispatchSpec(dropless_dispatch, ("gmm_backend",)),
    "capacity": DispatchSpec(capacity_dispatch, ("capacity_factor",)),
    "reference": DispatchSpec(reference_dispatch, ()),
}
check_registry("dispatch", DISPATCH_SPECS)
for _name, _spec in DISPATCH_SPECS.items():
    if not set(_spec.options) <= {f.name for f in dataclasses.fields(MoEConfig)}:
        raise RuntimeError(f"dispatch {_name!r} declares options {_spec.options}: each must be a MoEConfig field")


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """A dispatch with its options bound, called as dispatch(x, routing, experts) -> DispatchOutput.

    Frozen and hashable, so an NNX module can hold it as static configuration.
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def __call__(self, x, routing: Routing, experts: ExpertParams) -> DispatchOutput:
        return DISPATCH_SPECS[self.name].fn(x, routing, experts, **dict(self.options))


def get_dispatch(name: str, **options) -> Dispatch:
    """Dispatch `name` with `options` bound; an unknown name or option raises, naming the valid ones."""
    if name not in DISPATCH_SPECS:
        raise ValueError(f"unknown dispatch {name!r}; available: {tuple(DISPATCH_SPECS)}")
    valid = DISPATCH_SPECS[name].options
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"dispatch {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options: {', '.join(valid) if valid else 'none'}"
        )
    backend = options.get("gmm_backend", "auto")
    if backend != "auto" and backend not in available_gmm():
        raise ValueError(f"unknown gmm_backend {backend!r}; available: 'auto', {', '.join(map(repr, available_gmm()))}")
    return Dispatch(name, tuple(sorted(options.items())))


def dispatch_from_config(cfg: MoEConfig) -> Dispatch:
    """`cfg.dispatch` with its declared options read from the MoEConfig fields of the same names."""
    if cfg.dispatch not in DISPATCH_SPECS:
        return get_dispatch(cfg.dispatch)  # raises with the available names
    return get_dispatch(cfg.dispatch, **{o: getattr(cfg, o) for o in DISPATCH_SPECS[cfg.dispatch].options})


__all__ = [
    "DISPATCH_SPECS",
    "Dispatch",
    "DispatchOutput",
    "DispatchSpec",
    "ExpertParams",
    "dispatch_from_config",
    "get_dispatch",
]

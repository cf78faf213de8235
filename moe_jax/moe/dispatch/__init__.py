"""Dispatch strategies behind one interface (see `base.py`), selected by `MoEConfig.dispatch`."""

from moe_jax.moe.dispatch.base import DispatchOutput, ExpertParams
from moe_jax.moe.dispatch.capacity import capacity_dispatch
from moe_jax.moe.dispatch.dropless import dropless_dispatch
from moe_jax.moe.dispatch.reference import reference_dispatch

DISPATCHERS = {
    "dropless": dropless_dispatch,
    "capacity": capacity_dispatch,
    "reference": reference_dispatch,
}


def get_dispatch(name: str):
    if name not in DISPATCHERS:
        raise ValueError(f"unknown dispatch {name!r}; available: {tuple(DISPATCHERS)}")
    return DISPATCHERS[name]


__all__ = ["DISPATCHERS", "DispatchOutput", "ExpertParams", "get_dispatch"]

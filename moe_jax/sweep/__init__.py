"""Experiment families and the sweep runner (`moe-jax sweep experiments/<family>.py`)."""

from moe_jax.sweep.family import Family, Member

__all__ = ["Family", "Member"]

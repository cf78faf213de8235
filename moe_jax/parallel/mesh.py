"""The device mesh: built from configuration, sized from the real devices, and multi-host start-up.

Mesh axes, outermost first (the order in which devices are laid out, so the outer axes are the ones
that cross hosts):

    data    pure data parallelism (parameters replicated)
    fsdp    data parallelism with parameters and optimizer state sharded over it (ZeRO-3 style)
    expert  expert parallelism: each device holds E/EP routed experts; outside the MoE dispatch the
            expert axis acts as one more data-parallel axis
    tensor  tensor (Megatron) parallelism over heads, MLP width and expert width

Sizes come from `MeshConfig`; one of them may be -1 ("fill the remaining devices"). Everything
downstream reads sizes from the built mesh (`axis_size(mesh, name)`), never from the config.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Mapping, Sequence

import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "expert", "tensor")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Requested size of every mesh axis; -1 (at most one axis) takes the remaining devices.

    Attributes:
      data: data-parallel axis size.
      fsdp: fully-sharded data-parallel axis size.
      expert: expert-parallel axis size (must divide the number of routed experts).
      tensor: tensor-parallel axis size.
    """

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.sizes()
        bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
        if bad:
            raise ValueError(f"MeshConfig: axis sizes must be >= 1 or -1, got {bad}")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {sizes}")

    def sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_AXES}

    @classmethod
    def from_string(cls, spec: str) -> "MeshConfig":
        """Parse "data:2,expert:4" (unnamed axes keep size 1; data defaults to 1 when given as a string
        without any -1, so "expert:8" means exactly 8 devices on the expert axis)."""
        sizes = {name: 1 for name in MESH_AXES}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, _, value = item.partition(":")
            if name not in MESH_AXES or not value:
                raise ValueError(f"bad mesh item {item!r} in {spec!r}; expected NAME:SIZE with NAME in {MESH_AXES}")
            sizes[name] = int(value)
        return cls(**sizes)


def resolve_axis_sizes(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Concrete axis sizes for `num_devices`: fills the -1 axis, checks the product.

    Raises:
      ValueError naming every axis size and the device count when they do not match.
    """
    sizes = cfg.sizes()
    fixed = math.prod(v for v in sizes.values() if v != -1)
    shown = " x ".join(f"{k}={v}" for k, v in sizes.items())
    if -1 in sizes.values():
        if num_devices % fixed:
            raise ValueError(f"mesh {shown}: the fixed axes use {fixed} devices, which does not divide the "
                             f"{num_devices} available devices")
        sizes = {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}
    elif fixed != num_devices:
        raise ValueError(f"mesh {shown} needs {fixed} devices, but {num_devices} devices are available")
    return sizes


def build_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes MESH_AXES (all `AxisType.Auto`, i.e. GSPMD) over `devices` (default: all).

    Devices are laid out in process-major order, so the outer axes (data, fsdp) cross hosts first.
    """
    cfg = cfg or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(ordered, dtype=object).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_size(mesh, name: str) -> int:
    """Size of mesh axis `name` (1 if the mesh has no such axis); works for Mesh and AbstractMesh."""
    if mesh is None or getattr(mesh, "empty", False):
        return 1
    return int(dict(mesh.shape).get(name, 1))


def axes_size(mesh, names: Sequence[str]) -> int:
    return math.prod(axis_size(mesh, n) for n in names)


def describe(mesh) -> str:
    """"data=2 x fsdp=1 x expert=4 x tensor=1" for error messages and logs."""
    return " x ".join(f"{k}={v}" for k, v in dict(mesh.shape).items())


# ----------------------------------------------------------------------------------------------
# Multi-host start-up
# ----------------------------------------------------------------------------------------------

ENV_COORDINATOR = "MOE_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MOE_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MOE_JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where the coordinator runs and who this process is. Empty coordinator = single process."""

    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.coordinator_address) and self.num_processes > 1


def distributed_config(coordinator_address: str | None = None, num_processes: int | None = None,
                       process_id: int | None = None, env: Mapping[str, str] | None = None) -> DistributedConfig:
    """Resolve the multi-host settings: explicit arguments (flags) win, then the environment
    (MOE_JAX_COORDINATOR_ADDRESS / MOE_JAX_NUM_PROCESSES / MOE_JAX_PROCESS_ID)."""
    env = os.environ if env is None else env
    addr = coordinator_address if coordinator_address else env.get(ENV_COORDINATOR, "")
    n = num_processes if num_processes is not None else int(env.get(ENV_NUM_PROCESSES, "1"))
    pid = process_id if process_id is not None else int(env.get(ENV_PROCESS_ID, "0"))
    if n < 1 or not 0 <= pid < n:
        raise ValueError(f"distributed: process_id={pid} must be in [0, num_processes={n})")
    if n > 1 and not addr:
        raise ValueError(f"distributed: num_processes={n} needs a coordinator address "
                         f"(--coordinator_address or ${ENV_COORDINATOR})")
    return DistributedConfig(addr, n, pid)


def initialize_distributed(cfg: DistributedConfig | None = None, *, initialization_timeout: int = 300) -> bool:
    """Call `jax.distributed.initialize` when `cfg` (default: from the environment) asks for several
    processes. Must run before anything touches the devices. Returns True if it initialised."""
    cfg = cfg or distributed_config()
    if not cfg.enabled:
        return False
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                               process_id=cfg.process_id, initialization_timeout=initialization_timeout)
    return True


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """--coordinator_address / --num_processes / --process_id (defaults: the environment)."""
    parser.add_argument("--coordinator_address", default=None, help=f"host:port of process 0 (${ENV_COORDINATOR})")
    parser.add_argument("--num_processes", type=int, default=None, help=f"number of processes (${ENV_NUM_PROCESSES})")
    parser.add_argument("--process_id", type=int, default=None, help=f"this process's index (${ENV_PROCESS_ID})")


def distributed_config_from_args(args: argparse.Namespace) -> DistributedConfig:
    return distributed_config(args.coordinator_address, args.num_processes, args.process_id)

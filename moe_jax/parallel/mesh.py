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
import socket
import sys
import threading
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

import gin

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "expert", "tensor")
FAKE_DEVICES_HINT = (
    "on a CPU, start that many fake devices with XLA_FLAGS=--xla_force_host_platform_device_count={n}, or change --mesh"
)


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
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ValueError(
                    f"--mesh={spec}: the size of axis {name!r} is {value!r}, not an integer; write "
                    f"NAME:SIZE with a whole number (e.g. --mesh=data:2,expert:4) or -1"
                ) from None
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
            raise ValueError(
                f"mesh {shown}: the fixed axes use {fixed} devices, which does not divide the "
                f"{num_devices} available devices"
            )
        sizes = {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}
    elif fixed != num_devices:
        raise ValueError(
            f"mesh {shown} needs {fixed} devices, but {num_devices} devices are available "
            f"({FAKE_DEVICES_HINT.format(n=fixed)})"
        )
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
    return Mesh(np.array(ordered, dtype=object).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_size(mesh, name: str) -> int:
    """Size of mesh axis `name` (1 if the mesh has no such axis); works for Mesh and AbstractMesh."""
    if mesh is None or getattr(mesh, "empty", False):
        return 1
    return int(dict(mesh.shape).get(name, 1))


def axes_size(mesh, names: Sequence[str]) -> int:
    return math.prod(axis_size(mesh, n) for n in names)


def describe(mesh) -> str:
    """ "data=2 x fsdp=1 x expert=4 x tensor=1" for error messages and logs."""
    return " x ".join(f"{k}={v}" for k, v in dict(mesh.shape).items())


# ----------------------------------------------------------------------------------------------
# Multi-host start-up
# ----------------------------------------------------------------------------------------------

ENV_COORDINATOR = "MOE_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MOE_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MOE_JAX_PROCESS_ID"
ENV_TIMEOUT = "MOE_JAX_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 300


class DistributedError(RuntimeError):
    """Multi-host start-up cannot go ahead; the one-line message says who was waited for and what to do."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where the coordinator runs, who this process is and how long start-up waits for the others.
    Empty coordinator = single process."""

    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0
    timeout_s: int = DEFAULT_TIMEOUT_S

    @property
    def enabled(self) -> bool:
        return bool(self.coordinator_address) and self.num_processes > 1


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"distributed: ${name}={value!r} is not an integer") from None


def distributed_config(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: int | None = None,
) -> DistributedConfig:
    """Resolve the multi-host settings: explicit arguments (flags) win, then the environment
    (MOE_JAX_COORDINATOR_ADDRESS / MOE_JAX_NUM_PROCESSES / MOE_JAX_PROCESS_ID / MOE_JAX_DISTRIBUTED_TIMEOUT)."""
    env = os.environ if env is None else env
    addr = coordinator_address if coordinator_address else env.get(ENV_COORDINATOR, "")
    n = num_processes if num_processes is not None else _env_int(env, ENV_NUM_PROCESSES, 1)
    pid = process_id if process_id is not None else _env_int(env, ENV_PROCESS_ID, 0)
    timeout = timeout_s if timeout_s is not None else _env_int(env, ENV_TIMEOUT, DEFAULT_TIMEOUT_S)
    if n < 1 or not 0 <= pid < n:
        raise ValueError(
            f"distributed: process_id={pid} must be in [0, num_processes={n}): give each of the {n} "
            f"processes its own --process_id from 0 to {max(n - 1, 0)}"
        )
    if n > 1 and not addr:
        raise ValueError(
            f"distributed: num_processes={n} needs a coordinator address (--coordinator_address or ${ENV_COORDINATOR})"
        )
    if n > 1 and (":" not in addr or not addr.rsplit(":", 1)[1].isdigit()):
        raise ValueError(f"distributed: --coordinator_address={addr!r} must be HOST:PORT (e.g. 10.0.0.1:1234)")
    if timeout < 1:
        raise ValueError(f"distributed: --distributed_timeout={timeout} must be >= 1 second")
    return DistributedConfig(addr, n, pid, timeout)


def _reachable(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _waiting_for(cfg: DistributedConfig) -> str:
    if cfg.process_id == 0:
        return (
            f"process 0 of {cfg.num_processes} (the coordinator, at {cfg.coordinator_address}): waiting up to "
            f"{cfg.timeout_s} s for the other {cfg.num_processes - 1} process(es) to join"
        )
    return (
        f"process {cfg.process_id} of {cfg.num_processes}: waiting up to {cfg.timeout_s} s for the coordinator "
        f"(process 0) at {cfg.coordinator_address} and the other processes"
    )


def _gave_up(cfg: DistributedConfig) -> str:
    fix = (
        f"start all {cfg.num_processes} processes (--process_id 0 to {cfg.num_processes - 1}) with the same "
        f"--coordinator_address and --num_processes, or raise --distributed_timeout"
    )
    if cfg.process_id != 0 and not _reachable(cfg.coordinator_address):
        return (
            f"distributed start-up: the coordinator at {cfg.coordinator_address} was unreachable for "
            f"{cfg.timeout_s} s (process {cfg.process_id} of {cfg.num_processes}): check the address and that "
            f"process 0 runs there; {fix}"
        )
    return (
        f"distributed start-up: not every one of the {cfg.num_processes} processes joined the coordinator at "
        f"{cfg.coordinator_address} within {cfg.timeout_s} s (this is process {cfg.process_id}); {fix}"
    )


def initialize_distributed(
    cfg: DistributedConfig | None = None, *, initialization_timeout: int | None = None, log=print
) -> bool:
    """Call `jax.distributed.initialize` when `cfg` (default: from the environment) asks for several
    processes. Must run before anything touches the devices. Returns True if it initialised.

    Says whom it waits for and for how long. jax aborts the process (a C++ fatal error) when the
    coordinator stays unreachable, so a watchdog thread ends the process first, after `cfg.timeout_s`
    (or `initialization_timeout`), with a one-line message on stderr and exit status 1; configuration
    errors raise DistributedError.
    """
    cfg = cfg or distributed_config()
    if not cfg.enabled:
        return False
    if initialization_timeout is not None:
        cfg = dataclasses.replace(cfg, timeout_s=initialization_timeout)
    log(_waiting_for(cfg), flush=True)
    done = threading.Event()

    def watchdog():
        if not done.wait(cfg.timeout_s):
            print(f"moe-jax: {_gave_up(cfg)}", file=sys.stderr, flush=True)
            os._exit(1)

    threading.Thread(target=watchdog, name="moe-jax-distributed-watchdog", daemon=True).start()
    try:  # jax's own deadline comes later than the watchdog's, which then speaks first
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            initialization_timeout=cfg.timeout_s + 30,
        )
    except (ValueError, RuntimeError) as err:
        raise DistributedError(
            f"distributed start-up: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    finally:
        done.set()
    return True


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """--coordinator_address / --num_processes / --process_id / --distributed_timeout (defaults: the environment)."""
    parser.add_argument("--coordinator_address", default=None, help=f"host:port of process 0 (${ENV_COORDINATOR})")
    parser.add_argument("--num_processes", type=int, default=None, help=f"number of processes (${ENV_NUM_PROCESSES})")
    parser.add_argument("--process_id", type=int, default=None, help=f"this process's index (${ENV_PROCESS_ID})")
    parser.add_argument(
        "--distributed_timeout",
        type=int,
        default=None,
        metavar="SECONDS",
        help=f"how long start-up waits for the coordinator and the other processes "
        f"(${ENV_TIMEOUT}; default {DEFAULT_TIMEOUT_S})",
    )


def distributed_config_from_args(args: argparse.Namespace) -> DistributedConfig:
    return distributed_config(
        args.coordinator_address,
        args.num_processes,
        args.process_id,
        timeout_s=getattr(args, "distributed_timeout", None),
    )

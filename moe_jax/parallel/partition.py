"""Placing model, optimizer state and batches on a mesh, and checking sizes before anything compiles.

Typical use (see docs/parallelism.md):

    mesh = build_mesh(MeshConfig(data=-1, expert=4))
    validate(cfg, mesh, global_batch=B, state=abstract_state(make_model))
    model = create_sharded(make_model, mesh)              # parameters are born sharded
    optimizer = create_sharded(lambda: nnx.Optimizer(model, tx, wrt=nnx.Param), mesh)
    batch = shard_batch(local_batch, mesh)                # each process feeds its own rows
    with jax.set_mesh(mesh):
        state, metrics = train_step(state, batch, rng)    # the MoE layers switch to expert parallelism
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from moe_jax.config import ModelConfig
from moe_jax.parallel.mesh import axis_size, describe
from moe_jax.parallel.rules import (
    BATCH_AXES,
    EXPERT_AXIS,
    LOGICAL_RULES,
    MeshAxes,
    batch_sharding,
    iter_params,
    state_shardings,
    variable_spec,
)

M = TypeVar("M")


class ShardingError(ValueError):
    """A configuration that cannot be laid out on the mesh; the message names every offending size."""


def abstract_state(make: Callable[[], Any]) -> Any:
    """The nnx.State of `make()` as ShapeDtypeStructs with metadata (nothing is allocated)."""
    return nnx.state(nnx.eval_shape(make))


def _batch_shards(mesh) -> int:
    return math.prod(axis_size(mesh, a) for a in BATCH_AXES)


def size_problems(
    cfg: ModelConfig,
    mesh,
    global_batch: int | None = None,
    state: Any = None,
    rules: Mapping[str, MeshAxes] = LOGICAL_RULES,
    num_devices: int | None = None,
) -> list[str]:
    """Every reason `cfg` / `global_batch` / `state` cannot run on `mesh` (empty list: fine).

    Args:
      cfg: the model configuration.
      mesh: a Mesh (or AbstractMesh) with axes from moe_jax.parallel.mesh.MESH_AXES.
      global_batch: sequences per step over all processes.
      state: an (abstract) nnx.State whose Variables carry `axes` metadata; each sharded dimension
        must divide by the product of its mesh axes.
      num_devices: devices the mesh must cover (default: jax.device_count() for a concrete Mesh).
    """
    problems = []
    mesh_size = math.prod(dict(mesh.shape).values())
    if num_devices is None and hasattr(mesh, "devices"):
        num_devices = jax.device_count()
    if num_devices is not None and mesh_size != num_devices:
        problems.append(f"the mesh ({describe(mesh)}) has {mesh_size} devices but {num_devices} devices are available")
    ep = axis_size(mesh, EXPERT_AXIS)
    moe = cfg.moe
    if moe is not None and moe.num_experts and moe.num_experts % ep:
        problems.append(
            f"num_experts={moe.num_experts} routed experts do not divide by the expert axis size {ep} "
            f"(mesh {describe(mesh)})"
        )
    if moe is not None and moe.num_experts and moe.num_device_groups and moe.num_experts % moe.num_device_groups:
        problems.append(f"num_device_groups={moe.num_device_groups} does not divide num_experts={moe.num_experts}")
    if global_batch is not None:
        shards = _batch_shards(mesh)
        if global_batch % shards:
            axes = " x ".join(f"{a}={axis_size(mesh, a)}" for a in BATCH_AXES)
            problems.append(f"global batch {global_batch} does not divide by the {shards} batch shards ({axes})")
        if global_batch % jax.process_count():
            problems.append(f"global batch {global_batch} does not divide by the {jax.process_count()} processes")
    if state is not None:
        for path, var in iter_params(state):
            shape = var.get_value().shape
            spec = variable_spec(var, rules, mesh)
            for dim, (size, axes) in enumerate(zip(shape, spec)):
                names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
                parts = math.prod(axis_size(mesh, a) for a in names)
                if size % parts:
                    logical = var.get_metadata()["axes"][dim]
                    problems.append(
                        f"{path}: dimension {dim} ({logical!r}) of size {size} does not divide by "
                        f"{' x '.join(f'{a}={axis_size(mesh, a)}' for a in names)} = {parts}"
                    )
    return problems


def validate(
    cfg: ModelConfig,
    mesh,
    global_batch: int | None = None,
    state: Any = None,
    rules: Mapping[str, MeshAxes] = LOGICAL_RULES,
    num_devices: int | None = None,
) -> None:
    """Raise ShardingError listing every problem found by `size_problems` (call before compiling)."""
    problems = size_problems(cfg, mesh, global_batch, state, rules, num_devices)
    if problems:
        raise ShardingError("cannot lay out the model on the mesh:\n  - " + "\n  - ".join(problems))


def create_sharded(make: Callable[[], M], mesh, rules: Mapping[str, MeshAxes] = LOGICAL_RULES) -> M:
    """Build `make()` (an nnx Module or Optimizer) under jax.jit with its state sharded by the rules,
    so no device ever holds a full copy. Random initialisation is sharding-independent
    (threefry is partitionable): the values equal those of `jax.jit(make)` on one device, and those
    of an eager `make()` up to the last ulp (XLA compiles the normal sampler slightly differently)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def place(obj: M, mesh, rules: Mapping[str, MeshAxes] = LOGICAL_RULES) -> M:
    """Move the state of an existing nnx object (model or optimizer) onto `mesh` by the rules, in place."""
    state = nnx.state(obj)
    nnx.update(obj, jax.device_put(state, state_shardings(state, mesh, rules)))
    return obj


def process_batch_rows(mesh, global_batch: int) -> slice:
    """Rows [start, stop) of the global batch that this process's devices hold (and must load).

    Raises:
      ShardingError if this process's rows are not one contiguous block.
    """
    sharding = batch_sharding(mesh, ndim=1)
    rows = sorted(
        {
            (idx[0].start or 0, global_batch if idx[0].stop is None else idx[0].stop)
            for idx in sharding.addressable_devices_indices_map((global_batch,)).values()
        }
    )
    start, stop = rows[0][0], rows[0][1]
    for a, b in rows[1:]:
        if a > stop:
            raise ShardingError(f"process {jax.process_index()} holds non-contiguous batch rows {rows}")
        stop = max(stop, b)
    return slice(start, stop)


def shard_batch(local: Any, mesh) -> Any:
    """Assemble global arrays from each process's rows: every leaf [B_local, ...] (numpy) becomes a
    jax.Array [B_local * processes, ...] split over the batch axes. Single process: B_local = B."""

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(one, local)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, jax.sharding.PartitionSpec())

"""Device meshes, the logical sharding rules, placement of state and batches, multi-host start-up.

See docs/parallelism.md. The expert-parallel dispatch itself lives in
`moe_jax.moe.dispatch.expert_parallel` (the MoE layer uses it whenever a mesh is set).
"""

from moe_jax.parallel.mesh import (
    MESH_AXES,
    DistributedConfig,
    DistributedError,
    MeshConfig,
    add_distributed_args,
    axis_size,
    build_mesh,
    describe,
    distributed_config,
    distributed_config_from_args,
    initialize_distributed,
    resolve_axis_sizes,
)
from moe_jax.parallel.partition import (
    ShardingError,
    abstract_state,
    create_sharded,
    place,
    process_batch_rows,
    replicated,
    shard_batch,
    size_problems,
    validate,
)
from moe_jax.parallel.rules import (
    BATCH_AXES,
    LOGICAL_RULES,
    batch_sharding,
    batch_spec,
    constrain,
    logical_to_spec,
    sharding_table,
    state_shardings,
    state_specs,
    tree_shardings_like,
)

__all__ = [
    "BATCH_AXES",
    "LOGICAL_RULES",
    "MESH_AXES",
    "DistributedConfig",
    "DistributedError",
    "MeshConfig",
    "ShardingError",
    "abstract_state",
    "add_distributed_args",
    "axis_size",
    "batch_sharding",
    "batch_spec",
    "build_mesh",
    "constrain",
    "create_sharded",
    "describe",
    "distributed_config",
    "distributed_config_from_args",
    "initialize_distributed",
    "logical_to_spec",
    "place",
    "process_batch_rows",
    "replicated",
    "resolve_axis_sizes",
    "shard_batch",
    "sharding_table",
    "size_problems",
    "state_shardings",
    "state_specs",
    "tree_shardings_like",
    "validate",
]

"""THE logical-axis -> mesh-axis table, and the shardings it gives parameters, optimizer state and batches.

Every parameter carries logical axis names in its `axes` metadata (e.g. routed experts' `wi` has
("layers", "experts", "embed", None, "expert_mlp")). `LOGICAL_RULES` maps each name to mesh axes;
`logical_to_spec` turns a tuple of names into a `PartitionSpec`. A name missing from the table is an
error (so a new parameter cannot silently end up replicated); the golden file
`tests/parallel/golden/` pins the resulting sharding of every parameter.

    logical name     mesh axes            why
    batch            (data, fsdp, expert) tokens are split over every data-like axis, expert included
    layers           -                    scanned layer axis stays whole (each device runs every layer)
    vocab            tensor               embedding rows / LM-head columns
    embed            fsdp                 d_model: the ZeRO-3 axis of every weight matrix
    heads            tensor               attention heads
    head_dim         -
    mlp              tensor               dense / shared-expert FFN width
    experts          expert               routed experts: each device holds E/EP of them
    expert_mlp       tensor               routed-expert FFN width
    router_experts   -                    the router's [d, E] kernel is small and used by every token
    norm             -                    RMSNorm scales
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None

LOGICAL_RULES: Mapping[str, MeshAxes] = {
    "batch": ("data", "fsdp", "expert"),
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "expert_mlp": "tensor",
    "router_experts": None,
    "norm": None,
}

BATCH_AXES: tuple[str, ...] = LOGICAL_RULES["batch"]
EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Mapping[str, MeshAxes] = LOGICAL_RULES, mesh=None) -> P:
    """Logical names -> PartitionSpec, one entry per array dimension.

    Args:
      logical_axes: one name (or None = replicated) per dimension, e.g. ("experts", "embed", None).
      rules: the logical -> mesh table (default LOGICAL_RULES).
      mesh: if given, mesh axes the mesh does not have are left out (sizes are not looked at).

    Raises:
      KeyError for a name not in `rules`; ValueError if two dimensions map to the same mesh axis.
    """
    present = None if mesh is None else set(mesh.axis_names)
    used: dict[str, str] = {}
    entries = []
    for name in logical_axes:
        if name is None:
            entries.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        mesh_axes = tuple(a for a in _as_tuple(rules[name]) if present is None or a in present)
        for a in mesh_axes:
            if a in used:
                raise ValueError(
                    f"logical axes {tuple(logical_axes)}: {used[a]!r} and {name!r} both map to mesh axis {a!r}"
                )
            used[a] = name
        entries.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*entries)


def variable_axes(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """The `axes` metadata of a Variable, or None if it has none (then it is replicated)."""
    axes = var.get_metadata().get("axes")
    return None if axes is None else tuple(axes)


def variable_spec(var: nnx.Variable, rules: Mapping[str, MeshAxes] = LOGICAL_RULES, mesh=None) -> P:
    """PartitionSpec of one Variable (replicated when it carries no logical axes)."""
    axes = variable_axes(var)
    if axes is None:
        return P()
    ndim = len(var.get_value().shape)
    if len(axes) != ndim:
        raise ValueError(f"variable with shape {var.get_value().shape} has {len(axes)} logical axes {axes}")
    return logical_to_spec(axes, rules, mesh)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_specs(state: Any, rules: Mapping[str, MeshAxes] = LOGICAL_RULES, mesh=None) -> Any:
    """The same tree as `state` (an nnx.State, concrete or abstract, of a model or an nnx.Optimizer)
    with every Variable replaced by its PartitionSpec. Non-Variable leaves are replicated (P())."""
    return jax.tree.map(
        lambda v: variable_spec(v, rules, mesh) if _is_variable(v) else P(), state, is_leaf=_is_variable
    )


def state_shardings(state: Any, mesh, rules: Mapping[str, MeshAxes] = LOGICAL_RULES) -> Any:
    """`state_specs` as NamedShardings on `mesh`; pass them to jax.jit / jax.device_put.

    The result's Variables hold NamedShardings, so it can be given directly as `out_shardings` for a
    function returning `state` (or mapped over with `jax.tree.map(..., is_leaf=...)`)."""

    def one(v):
        spec = variable_spec(v, rules, mesh) if _is_variable(v) else P()
        sharding = NamedSharding(mesh, spec)
        return v.replace(sharding) if _is_variable(v) else sharding

    return jax.tree.map(one, state, is_leaf=_is_variable)


def tree_shardings_like(tree: Any, params: Any, param_shardings: Any, mesh) -> Any:
    """Shardings for a plain optax state built over `params`: every subtree with the same structure
    as `params` (Adam's mu, nu, ...) gets `param_shardings`, every other leaf (step counts) is replicated.

    Args:
      tree: the (abstract) optimizer state.
      params: the parameter tree the optimizer was initialised with.
      param_shardings: a tree of NamedSharding with `params`' structure.
    """
    structure = jax.tree.structure(params)
    flat = jax.tree.leaves(param_shardings)

    def is_param_tree(x):
        return jax.tree.structure(x) == structure

    def one(x):
        if is_param_tree(x):
            return jax.tree.unflatten(structure, flat)
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), x)

    return jax.tree.map(one, tree, is_leaf=is_param_tree)


def batch_spec(ndim: int = 2) -> P:
    """[B, ...] arrays: B split over every batch axis, the rest whole."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
    """NamedSharding of a [B, S] (ndim=2) batch array on `mesh` (batch axes the mesh lacks are left out)."""
    present = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, P(present or None, *([None] * (ndim - 1))))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Mapping[str, MeshAxes] = LOGICAL_RULES):
    """`with_sharding_constraint` by logical names under the ambient mesh (`jax.set_mesh`); the
    identity without one. E.g. constrain(h, ("batch", None, None)) keeps activations split over the
    batch axes where GSPMD would otherwise follow a weight's fsdp split of d_model."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size <= 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules, mesh))


def sharding_table(state: Any, mesh=None, rules: Mapping[str, MeshAxes] = LOGICAL_RULES) -> dict[str, dict]:
    """{"path/to/param": {"shape", "axes", "spec", ["shard_shape"]}} for every Variable of `state`.

    `spec` lists the mesh axes of each dimension (None = whole); `shard_shape` (with a mesh) is the
    per-device block. This is what the golden-file test pins.
    """
    table = {}
    for path, var in nnx.to_flat_state(state):
        shape = tuple(int(s) for s in var.get_value().shape)
        spec = variable_spec(var, rules, mesh)
        padded = tuple(spec) + (None,) * (len(shape) - len(spec))
        entry = {
            "type": type(var).__name__,
            "shape": list(shape),
            "axes": None if variable_axes(var) is None else list(variable_axes(var)),
            "spec": [None if e is None else list(_as_tuple(e)) for e in padded],
        }
        if mesh is not None:
            entry["shard_shape"] = list(NamedSharding(mesh, spec).shard_shape(shape))
        table["/".join(str(p) for p in path)] = entry
    return table


def iter_params(state: Any) -> Iterable[tuple[str, nnx.Variable]]:
    """("path/to/param", Variable) pairs of a state."""
    for path, var in nnx.to_flat_state(state):
        yield "/".join(str(p) for p in path), var

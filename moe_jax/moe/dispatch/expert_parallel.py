"""Expert parallelism: the dispatch under `jax.shard_map` over the mesh's expert axis.

Tokens [T, d] arrive split over the batch axes (data x fsdp x expert); routed expert weights arrive
split over `expert` (each device holds E_l = E / EP consecutive experts, device j owns experts
[j*E_l, (j+1)*E_l)) and, within an expert, over `tensor` on the FFN width. Routing (router matmul,
softmax, top-k) and the balance losses run before this, under GSPMD, on the global arrays.

Two exchange schemes, chosen by `scheme`:

"ring" (default; exactly dropless, best for large k such as DeepSeekMoE's top-7)
    1. all_gather the tokens and their routing over `expert`: every device of an expert group sees
       the group's T_g = EP * T_l tokens;
    2. each device runs the sort + grouped-matmul dropless computation of its E_l experts on the
       assignments that go to them (all others are masked to the sentinel and never computed);
    3. psum_scatter the [T_g, d] float32 partial outputs over `expert`: every token gets the sum of
       its experts' contributions and returns to its own device.
    A routing with a per-expert bound (`Routing.max_per_expert` = C*G: expert choice, whose k = E
    columns would otherwise make step 2 gather and hold T_g * E rows) computes only the
    min(E_l * C * G, T_g * k) sorted active rows of its experts and scatter-adds them
    (`dropless.bounded_outputs`), as the single-device dropless dispatch does.

"all_to_all" (moves T_l * k rows instead of EP * T_l rows; better for small k)
    1. every assignment is written into a fixed-size buffer [EP, C, d] at the slot (destination
       device, rank among this device's assignments to it, first choices before second choices);
    2. all_to_all over `expert`; each device runs its E_l experts on the EP*C received rows
       (empty slots carry the sentinel expert id and are never computed);
    3. all_to_all back, gather each assignment's row, weighted sum over k in float32.
    C = T_l * min(k, E_l) (the worst case) keeps it dropless; `buffer_factor` > 0 gives
    C = ceil(buffer_factor * T_l * k / EP) and drops (and reports in `dropped`) what overflows.
    With `Routing.max_per_expert` (expert choice) C is at most E_l * max_per_expert and the combine
    scatter-adds the EP*C received rows by slot instead of gathering a [T_l, k, d] (k = E) array.

`mode="capacity"` applies GShard's expert capacity C_e = ceil(capacity_factor * T_g * k / E) with
GShard priority (all first choices before second choices, then token order) over the tokens of the
expert group, i.e. it equals `capacity_dispatch` run on the T_g tokens of each data-parallel group
(on a mesh whose data and fsdp axes are 1: equal to the single-device capacity dispatch).

Padded rows (empty buffer slots, assignments owned by other devices) are removed with `jnp.where`
before every reduction, so they never reach outputs or gradients even if they hold NaN or Inf.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax.moe.dispatch.base import DispatchOutput, ExpertParams, combine
from moe_jax.moe.dispatch.capacity import capacity_positions, expert_capacity
from moe_jax.moe.dispatch.dropless import SAVED_NAME, bounded_outputs, grouped_swiglu, sort_by_expert
from moe_jax.moe.dispatch.gmm import GmmFn, get_gmm
from moe_jax.moe.dispatch.permute import gather_replicated, permute_rows
from moe_jax.moe.gating import Routing
from moe_jax.parallel.mesh import axis_size, describe
from moe_jax.parallel.rules import BATCH_AXES, EXPERT_AXIS, TENSOR_AXIS

SCHEMES = ("ring", "all_to_all")
MODES = ("dropless", "capacity")


def ambient_mesh():
    """The mesh set with `jax.set_mesh` (an AbstractMesh under jit), or None when there is none or it
    has a single device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(dict(mesh.shape).values()) <= 1:
        return None
    return mesh


def expert_axis_size(mesh=None) -> int:
    """EP: size of the expert axis of `mesh` (default: the ambient mesh); 1 without a mesh."""
    return axis_size(ambient_mesh() if mesh is None else mesh, EXPERT_AXIS)


# ----------------------------------------------------------------------------------------------
# Local computation (inside shard_map)
# ----------------------------------------------------------------------------------------------


def local_expert_outputs(
    x: jax.Array, local_ids: jax.Array, mask: jax.Array, experts: ExpertParams, gmm: GmmFn
) -> tuple[jax.Array, jax.Array]:
    """Run the local experts on the active assignments (sort + grouped matmul, as the dropless dispatch).

    Args:
      x: [T, d] tokens.
      local_ids: [T, k] local expert ids in [0, E_l) (any value where mask is False).
      mask: [T, k] assignments to compute.
      experts: the E_l local experts.

    Returns:
      out [T, k, d] in x's dtype (exact zeros where mask is False) and counts [E_l] int32.
    """
    t, k = local_ids.shape
    routing = Routing(indices=jnp.where(mask, local_ids, 0), weights=jnp.zeros(mask.shape, jnp.float32), mask=mask)
    order, inv, group_sizes = sort_by_expert(routing, experts.num_experts)
    out = _sorted_rows(x, order, inv, k, group_sizes, experts, gmm)
    out_tk = permute_rows(out, inv, order).reshape(t, k, -1)
    return jnp.where(mask[..., None], out_tk, jnp.zeros((), out_tk.dtype)), group_sizes


@functools.partial(
    jax.checkpoint, static_argnums=(3, 6), policy=jax.checkpoint_policies.save_only_these_names(SAVED_NAME)
)
def _sorted_rows(x, order, inv, k: int, group_sizes, experts: ExpertParams, gmm: GmmFn) -> jax.Array:
    """x [T, d] -> [T*k, d] expert outputs in expert order; as in the dropless dispatch only the first
    projection h is kept for the backward pass (the gather and the rest are recomputed)."""
    return grouped_swiglu(gather_replicated(x, order, inv, k), group_sizes, experts, gmm)


def _weighted_sum(out_tk: jax.Array, weights: jax.Array, mask: jax.Array) -> jax.Array:
    """[T, k, d], [T, k] -> [T, d] float32, masked assignments removed with where (not a 0 product)."""
    out_tk = jnp.where(mask[..., None], out_tk, jnp.zeros((), out_tk.dtype))
    return combine(out_tk, weights, mask, jnp.float32)


def _gshard_positions_in_group(ids: jax.Array, mask: jax.Array, num_experts: int, axis: str | None) -> jax.Array:
    """Rank of each local assignment in its expert's queue over the whole expert group, in GShard
    priority: choice c of every token of the group before choice c+1, then (device, token) order.

    Args:
      ids, mask: [T_l, k] global expert ids and active assignments of this device.
      axis: the expert mesh axis (None when EP = 1).

    Returns:
      [T_l, k] int32 positions (undefined where mask is False); equal to `capacity_positions` on the
      all-gathered [EP*T_l, k] routing.
    """
    k = ids.shape[1]
    onehot = jax.nn.one_hot(jnp.where(mask, ids, num_experts), num_experts, dtype=jnp.int32)  # [T, k, E]
    per_choice = onehot.sum(0)  # [k, E]
    local_rank = capacity_positions(ids, mask, num_experts)  # [T, k]
    local_before_choice = jnp.cumsum(per_choice, axis=0) - per_choice  # [k, E]
    if axis is None:
        return local_rank
    every = jax.lax.all_gather(per_choice, axis)  # [EP, k, E]
    me = jax.lax.axis_index(axis)
    earlier = (jnp.arange(every.shape[0]) < me)[:, None, None]
    group_per_choice = every.sum(0)
    group_before_choice = jnp.cumsum(group_per_choice, axis=0) - group_per_choice  # [k, E]
    before_me = jnp.where(earlier, every, 0).sum(0)  # [k, E]
    offset = group_before_choice + before_me - local_before_choice  # [k, E]
    safe = jnp.where(mask, ids, 0)
    return local_rank + offset[jnp.arange(k)[None, :], safe]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a shard_map body knows statically: the dispatch's options and where the mesh axes are.

    Attributes:
      num_experts: E, routed experts over the whole mesh.
      mode / capacity_factor / buffer_factor: as `expert_parallel_dispatch`.
      gmm: the grouped-matmul kernel of the local experts.
      expert_axis: the mesh's expert axis (None: EP = 1); tensor_axis: its tensor axis when larger than
        1; reduce_axes: the batch axes other than expert, over which expert counts are summed.
      max_per_expert: `Routing.max_per_expert` (expert choice), else None.
    """

    num_experts: int
    mode: str
    capacity_factor: float
    buffer_factor: float
    gmm: GmmFn
    expert_axis: str | None
    tensor_axis: str | None
    reduce_axes: tuple[str, ...]
    max_per_expert: int | None = None


def _reduce(y: jax.Array, counts: jax.Array, plan: _Plan) -> tuple[jax.Array, jax.Array]:
    """Sum the partial outputs over the tensor axis (each shard holds a slice of the FFN width) and the
    expert counts over the batch axes."""
    if plan.tensor_axis is not None:
        y = jax.lax.psum(y, plan.tensor_axis)
    if plan.reduce_axes:
        counts = jax.lax.psum(counts, plan.reduce_axes)
    return y, counts


def _ring_body(x, ids, weights, mask, wi, wo, *, plan: _Plan):
    """shard_map body of the ring scheme. x [T_l, d]; ids/weights/mask [T_l, k]; wi/wo local experts.
    With `plan.max_per_expert` (dropless only) the local computation is bounded."""
    e_local, axis = wi.shape[0], plan.expert_axis
    if axis is not None:
        gather = functools.partial(jax.lax.all_gather, axis_name=axis, axis=0, tiled=True)
        x, ids, weights, mask = gather(x), gather(ids), gather(weights), gather(mask)
        first = jax.lax.axis_index(axis) * e_local
    else:
        first = 0
    t_g, k = ids.shape
    local = ids - first
    mine = mask & (local >= 0) & (local < e_local)
    keep = mine
    if plan.mode == "capacity":
        cap = expert_capacity(t_g, k, plan.num_experts, plan.capacity_factor)
        keep = mine & (capacity_positions(ids, mine, plan.num_experts) < cap)
    experts = ExpertParams(wi=wi, wo=wo)
    if plan.max_per_expert is not None and plan.mode == "dropless":
        bound = min(e_local * plan.max_per_expert, t_g * k)
        local_routing = Routing(indices=jnp.where(keep, local, 0), weights=weights, mask=keep, max_active=bound)
        y, counts = bounded_outputs(x, local_routing, experts, plan.gmm)  # [T_g, d] f32
    else:
        out_tk, counts = local_expert_outputs(x, local, keep, experts, plan.gmm)
        y = _weighted_sum(out_tk, weights, keep)  # [T_g, d] f32
    dropped = (mine & ~keep).astype(jnp.int32)
    if axis is not None:
        y = jax.lax.psum_scatter(y, axis, scatter_dimension=0, tiled=True)
        dropped = jax.lax.psum_scatter(dropped, axis, scatter_dimension=0, tiled=True)
    y, counts = _reduce(y, counts, plan)
    return y, counts, dropped > 0


def _buffer_rows(t: int, k: int, e_local: int, ep: int, plan: _Plan, cap: int | None) -> int:
    """C, the rows each (source, destination) pair of the all_to_all buffer holds: the worst case
    T_l * min(k, E_l) (dropless), bounded by the destination's capacity E_l * C_e (capacity mode) and
    by E_l * max_per_expert (expert choice); with buffer_factor > 0, ceil(buffer_factor * T_l * k / EP)."""
    worst = t * min(k, e_local)
    if cap is not None:
        worst = min(worst, e_local * cap)
    if plan.max_per_expert is not None:
        worst = min(worst, e_local * plan.max_per_expert)
    return worst if plan.buffer_factor <= 0 else max(1, min(worst, math.ceil(plan.buffer_factor * t * k / ep)))


def _all_to_all_body(x, ids, weights, mask, wi, wo, *, plan: _Plan):
    """shard_map body of the all_to_all scheme. x [T_l, d]; ids/weights/mask [T_l, k]; with
    `plan.max_per_expert`, smaller buffers and a scatter-add combine."""
    (t, k), d = ids.shape, x.shape[1]
    e_local = wi.shape[0]
    ep = plan.num_experts // e_local
    keep, cap = mask, None
    if plan.mode == "capacity":
        cap = expert_capacity(t * ep, k, plan.num_experts, plan.capacity_factor)
        keep = mask & (_gshard_positions_in_group(ids, mask, plan.num_experts, plan.expert_axis) < cap)
    rows = _buffer_rows(t, k, e_local, ep, plan, cap)
    dest = ids // e_local
    rank = capacity_positions(dest, keep, ep)  # [T, k] in dest queue
    keep = keep & (rank < rows)
    slot = jnp.where(keep, dest * rows + rank, ep * rows).reshape(-1)  # [T*k]; ep*rows = trash
    token = jnp.repeat(jnp.arange(t, dtype=jnp.int32), k)
    slot_token = jnp.full(ep * rows + 1, t, jnp.int32).at[slot].set(token)[:-1]  # [EP*C]; t = empty
    slot_expert = (
        jnp.full(ep * rows + 1, e_local, jnp.int32).at[slot].set((ids % e_local).reshape(-1).astype(jnp.int32))[:-1]
    )  # e_local = empty
    x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])
    send = jnp.take(x_pad, slot_token, axis=0).reshape(ep, rows, d)
    send_ids = slot_expert.reshape(ep, rows)
    if plan.expert_axis is not None:
        exchange = functools.partial(
            jax.lax.all_to_all, axis_name=plan.expert_axis, split_axis=0, concat_axis=0, tiled=True
        )
        recv, recv_ids = exchange(send), exchange(send_ids)
    else:
        recv, recv_ids = send, send_ids
    valid = (recv_ids < e_local).reshape(-1, 1)  # [EP*C, 1]
    out, counts = local_expert_outputs(
        recv.reshape(-1, d), recv_ids.reshape(-1, 1), valid, ExpertParams(wi=wi, wo=wo), plan.gmm
    )
    back = out.reshape(ep, rows, d)
    if plan.expert_axis is not None:
        back = exchange(back)
    if plan.max_per_expert is not None:  # combine by slot: EP*C rows, never [T_l, k, d] (k = E for expert choice)
        slot_weight = jnp.zeros(ep * rows + 1, jnp.float32).at[slot].set(jnp.where(keep, weights, 0.0).reshape(-1))
        rows_f32 = back.reshape(ep * rows, d).astype(jnp.float32) * slot_weight[:-1, None]
        y = jnp.zeros((t + 1, d), jnp.float32).at[slot_token].add(rows_f32)[:t]  # empty slots: row t, dropped
    else:
        back_pad = jnp.concatenate([back.reshape(ep * rows, d), jnp.zeros((1, d), back.dtype)])
        out_tk = jnp.take(back_pad, slot, axis=0).reshape(t, k, d)
        y = _weighted_sum(out_tk, weights, keep)
    y, counts = _reduce(y, counts, plan)
    return y, counts, mask & ~keep


# ----------------------------------------------------------------------------------------------
# The dispatch
# ----------------------------------------------------------------------------------------------


def check_expert_parallel_sizes(num_tokens: int, num_experts: int, mesh) -> None:
    """Raise ValueError (before anything compiles) when E or T do not split over the mesh."""
    ep = axis_size(mesh, EXPERT_AXIS)
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    shards = math.prod(axis_size(mesh, a) for a in batch_axes)
    if num_experts % ep:
        raise ValueError(
            f"expert parallelism: num_experts={num_experts} routed experts do not divide by the "
            f"expert axis size {ep} (mesh {describe(mesh)})"
        )
    if num_tokens % shards:
        raise ValueError(
            f"expert parallelism: {num_tokens} tokens do not divide by the {shards} batch shards "
            f"({' x '.join(f'{a}={axis_size(mesh, a)}' for a in batch_axes)}; mesh {describe(mesh)})"
        )


def expert_parallel_dispatch(
    x: jax.Array,
    routing: Routing,
    experts: ExpertParams,
    *,
    mesh=None,
    mode: str = "dropless",
    scheme: str = "ring",
    capacity_factor: float = 1.25,
    buffer_factor: float = 0.0,
    gmm_backend: str = "auto",
) -> DispatchOutput:
    """The MoE dispatch on a device mesh. Same contract as every dispatch:
    x [T, d] (global view), routing [T, k], experts [E, ...] -> DispatchOutput(y [T, d], counts [E], dropped [T, k]).

    Args:
      mesh: a Mesh or AbstractMesh with (some of) the axes data/fsdp/expert/tensor; default the
        ambient one (`jax.set_mesh`).
      mode: "dropless" or "capacity" (see the module docstring).
      scheme: "ring" or "all_to_all".
      capacity_factor: for mode="capacity".
      buffer_factor: for scheme="all_to_all": 0 = worst-case buffers (dropless), else rows per
        (source, destination) pair = ceil(buffer_factor * T_l * k / EP), overflow dropped.
      gmm_backend: grouped-matmul kernel for the local experts.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown expert-parallel scheme {scheme!r}; available: {SCHEMES}")
    if mode not in MODES:
        raise ValueError(f"expert-parallel dispatch supports modes {MODES}, got {mode!r}")
    mesh = ambient_mesh() if mesh is None else mesh
    if mesh is None:
        raise ValueError("expert_parallel_dispatch needs a mesh (pass mesh= or use jax.set_mesh)")
    t, k = routing.indices.shape
    e = experts.num_experts
    check_expert_parallel_sizes(t, e, mesh)
    names = set(mesh.axis_names)
    batch_axes = tuple(a for a in BATCH_AXES if a in names) or None
    expert_axis = EXPERT_AXIS if EXPERT_AXIS in names else None
    tensor_axis = TENSOR_AXIS if TENSOR_AXIS in names and axis_size(mesh, TENSOR_AXIS) > 1 else None
    reduce_axes = tuple(a for a in BATCH_AXES if a in names and a != EXPERT_AXIS)
    tok = P(batch_axes, None)
    in_specs = (tok, tok, tok, tok, P(expert_axis, None, None, tensor_axis), P(expert_axis, tensor_axis, None))
    out_specs = (tok, P(expert_axis), tok)
    plan = _Plan(
        num_experts=e,
        mode=mode,
        capacity_factor=capacity_factor,
        buffer_factor=buffer_factor,
        gmm=get_gmm(gmm_backend),
        expert_axis=expert_axis,
        tensor_axis=tensor_axis,
        reduce_axes=reduce_axes,
        max_per_expert=routing.max_per_expert,
    )
    body = functools.partial(_ring_body if scheme == "ring" else _all_to_all_body, plan=plan)
    sharded = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    y, counts, dropped = sharded(x, routing.indices, routing.weights, routing.mask, experts.wi, experts.wo)
    return DispatchOutput(y=y.astype(x.dtype), tokens_per_expert=counts, dropped=dropped)

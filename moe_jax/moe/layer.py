"""The MoE FFN of paper Eq 9: shared experts + routed experts chosen by a router, run by a dispatch.

    h = sum_{i <= K_s} FFN_i(u) + c * sum_{routed i} g_{i,t} FFN_i(u)        (the residual is added by the block)

c is `MoEConfig.routed_scaling_factor` (1 in the paper; DeepSeek-V3's released models scale by 2.5).

One class expresses every model of the paper by configuration: DeepSeekMoE (K_s >= 1, fine-grained),
GShard/Switch (K_s = 0, k = 2 / 1), Hash (router="hash"), Dense x4 / x16 (no routed experts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moe_jax.config import ModelConfig
from moe_jax.layers.mlp import MLP
from moe_jax.moe import balance
from moe_jax.moe.dispatch import ExpertParams, dispatch_from_config
from moe_jax.moe.dispatch.expert_parallel import ambient_mesh, expert_axis_size, expert_parallel_dispatch
from moe_jax.moe.router import ROUTER_CLASSES, expert_groups, route
from moe_jax.moe.stats import RoutingStats, routing_stats


@struct.dataclass
class MoELosses:
    """Auxiliary losses of one MoE layer (or summed over layers), already multiplied by their alphas."""

    expert_balance: jax.Array
    device_balance: jax.Array
    z_loss: jax.Array
    comm_balance: jax.Array  # DeepSeek-V2's communication balance loss (arXiv:2405.04434 Eq 29)

    @classmethod
    def zeros(cls) -> "MoELosses":
        z = jnp.zeros((), jnp.float32)
        return cls(z, z, z, z)

    @property
    def total(self) -> jax.Array:
        return self.expert_balance + self.device_balance + self.z_loss + self.comm_balance

    def __add__(self, other: "MoELosses") -> "MoELosses":
        return jax.tree.map(jnp.add, self, other)


@struct.dataclass
class MoEAux:
    """What a MoE layer returns beside its output: losses for the objective, stats for metrics, and the
    routing it used: expert_ids [T, k] int32 (best first, -1 for an inactive assignment)."""

    losses: MoELosses
    stats: RoutingStats
    expert_ids: jax.Array


def _dtype(name: str):
    return jnp.dtype(name)


class MoELayer(nnx.Module):
    """Router + routed experts (stacked [E, ...]) + fused shared experts, behind one dispatch."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        m = cfg.moe
        self.cfg = m
        self.compute_dtype = _dtype(cfg.dtype)
        std, pd, d = cfg.init_std, _dtype(cfg.param_dtype), cfg.d_model
        if m.num_experts:
            self.router = ROUTER_CLASSES[m.router](cfg, rngs)
            self.dispatch = dispatch_from_config(m)  # chosen and its options validated once, here
            e, f = m.num_experts, m.expert_dim
            self.wi = nnx.Param(
                std * jax.random.normal(rngs.params(), (e, d, 2, f), pd), axes=("experts", "embed", None, "expert_mlp")
            )
            self.wo = nnx.Param(
                std * jax.random.normal(rngs.params(), (e, f, d), pd), axes=("experts", "expert_mlp", "embed")
            )
        else:
            self.router = self.dispatch = None
        self.shared = (
            MLP(d, m.num_shared_experts * m.expert_dim, init_std=std, param_dtype=pd, rngs=rngs)
            if m.num_shared_experts
            else None
        )
        self.num_device_groups = m.num_device_groups  # 0: the ambient mesh's expert-axis size, read per call

    def __call__(
        self,
        x: jax.Array,
        token_ids: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, MoEAux | None]:
        """x [B, S, d], token_ids [B, S] (needed by hash routing), rng (GShard random policy).

        Returns y [B, S, d] and MoEAux (None when the layer has no routed experts).
        """
        b, s, d = x.shape
        xf = x.reshape(b * s, d)
        y = jnp.zeros_like(xf)
        shared = None
        if self.shared is not None and not self.cfg.disable_shared:  # disable_shared: §4.5 analysis
            shared = self.shared(xf)
        aux = None
        if self.router is not None:
            m = self.cfg
            ids = None if token_ids is None else token_ids.reshape(b * s)
            routing = route(self.router, xf, ids, rng, b)
            experts = ExpertParams(wi=self.wi[...].astype(x.dtype), wo=self.wo[...].astype(x.dtype))
            mesh = ambient_mesh()
            if mesh is not None and m.dispatch != "reference":
                # Expert parallelism (docs/parallelism.md): shard_map over the mesh set by jax.set_mesh.
                out = expert_parallel_dispatch(
                    xf,
                    routing,
                    experts,
                    mesh=mesh,
                    mode=m.dispatch,
                    scheme=m.expert_parallel,
                    capacity_factor=m.capacity_factor,
                    buffer_factor=m.ep_buffer_factor,
                    gmm_backend=m.gmm_backend,
                )
            else:
                out = self.dispatch(xf, routing, experts)
            if m.routed_scaling_factor != 1.0:  # a Python branch: the paper's models compute what they did
                out = out.replace(y=out.y * jnp.asarray(m.routed_scaling_factor, out.y.dtype))
            y = y + out.y
            stats = routing_stats(
                out.tokens_per_expert,
                out.dropped,
                routing.mask,
                routing.probs,
                routing.indices,
                routed_out=out.y,
                shared_out=shared,
            )
            aux = MoEAux(
                losses=self._losses(routing, b, s), stats=stats, expert_ids=jnp.where(routing.mask, routing.indices, -1)
            )
        if shared is not None:
            y = y + shared
        return y.reshape(b, s, d), aux

    def _losses(self, routing, b: int, s: int) -> MoELosses:
        m = self.cfg
        losses = MoELosses.zeros()
        if routing.probs is None or not self.router.uses_balance_loss:
            return losses
        probs = routing.probs.reshape(b, s, -1)
        idx = routing.indices.reshape(b, s, -1)
        mask = routing.mask.reshape(b, s, -1)
        expert = device = z = losses.z_loss
        if m.expert_balance_alpha:
            expert = m.expert_balance_alpha * balance.expert_balance_loss(probs, idx, mask, m.balance_loss_scope)
        if m.device_balance_alpha:
            groups = self.num_device_groups or expert_axis_size()
            device = m.device_balance_alpha * balance.device_balance_loss(
                probs, idx, mask, groups, m.balance_loss_scope
            )
        if m.router_z_loss_alpha:
            z = m.router_z_loss_alpha * balance.router_z_loss(routing.logits)
        comm = self._comm_loss(probs, idx, mask) if m.comm_balance_alpha else losses.comm_balance
        return MoELosses(expert_balance=expert, device_balance=device, z_loss=z, comm_balance=comm)

    def _comm_loss(self, probs, idx, mask) -> jax.Array:
        """alpha_3 * L_CommBal (DeepSeek-V2 Eq 29) over the groups the router limited the tokens to."""
        m = self.cfg
        groups, topk_groups = expert_groups(m)
        return m.comm_balance_alpha * balance.communication_balance_loss(
            probs, idx, mask, groups, topk_groups, m.balance_loss_scope
        )

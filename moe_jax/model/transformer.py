"""The decoder-only Transformer: embeddings, pre-norm blocks (dense or MoE FFN by the layer pattern),
final RMSNorm and an untied LM head.

Consecutive layers of the same kind form a `LayerStack` whose parameters are stacked on a leading
"layers" axis; a stack runs under jax.lax.scan (`scan_layers`) or as an unrolled loop with the same
parameter layout, so checkpoints do not depend on the choice. MoE auxiliary losses and routing
statistics come back from the scan as outputs and are summed/stacked here: nothing is sown.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moe_jax.config import ModelConfig
from moe_jax.layers.attention import Attention
from moe_jax.layers.mlp import MLP
from moe_jax.layers.norms import RMSNorm
from moe_jax.moe.layer import MoEAux, MoELayer, MoELosses
from moe_jax.moe.stats import RoutingStats


@struct.dataclass
class ModelOutput:
    """Logits and what the MoE layers report.

    Attributes:
      logits: [B, S, V] float32.
      moe_losses: auxiliary losses summed over all MoE layers (zeros for a dense model).
      stats: RoutingStats with a leading [L_moe] axis over MoE layers (in layer order), or None.
      expert_ids: [L_moe, B*S, k] int32 routed experts each token used (-1: inactive), or None.
    """

    logits: jax.Array
    moe_losses: MoELosses
    stats: RoutingStats | None
    expert_ids: jax.Array | None = None

    @property
    def aux_loss(self) -> jax.Array:
        return self.moe_losses.total


@struct.dataclass
class BlockInputs:
    """What every block sees besides the hidden states: positions [B, S], segment ids [B, S] or None,
    input token ids [B, S] (hash routing)."""

    positions: jax.Array
    segment_ids: jax.Array | None
    token_ids: jax.Array


class Block(nnx.Module):
    """x + Attn(RMSNorm(x)), then + FFN(RMSNorm(x)) with FFN dense or MoE."""

    def __init__(self, cfg: ModelConfig, is_moe: bool, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        self.attn = Attention(cfg, rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        self.is_moe = is_moe
        self.ffn = (
            MoELayer(cfg, rngs)
            if is_moe
            else MLP(cfg.d_model, cfg.ffn_dim, init_std=cfg.init_std, param_dtype=pd, rngs=rngs)
        )

    def __call__(self, x: jax.Array, inputs: BlockInputs, rng: jax.Array | None):
        x = x + self.attn(self.attn_norm(x), inputs.positions, inputs.segment_ids)
        h = self.ffn_norm(x)
        if self.is_moe:
            y, aux = self.ffn(h, inputs.token_ids, rng)
        else:
            y, aux = self.ffn(h), None
        return x + y, aux


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LayerStack(nnx.Module):
    """`count` identical blocks with parameters stacked on a leading "layers" axis."""

    def __init__(self, cfg: ModelConfig, is_moe: bool, first_layer: int, count: int, rngs: nnx.Rngs):
        self.cfg, self.is_moe, self.first_layer, self.count = cfg, is_moe, first_layer, count

        @nnx.split_rngs(splits=count)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return Block(cfg, is_moe, r)

        self.blocks = make(rngs)
        for _, var in nnx.iter_graph(self.blocks):
            if isinstance(var, nnx.Variable) and "axes" in var.get_metadata():
                var.set_metadata(axes=("layers",) + tuple(var.get_metadata()["axes"]))

    def __call__(self, x: jax.Array, inputs: BlockInputs, rng: jax.Array | None):
        """x [B, S, d] -> (x, MoEAux stacked over the stack's layers, or None)."""
        graphdef, state = nnx.split(self.blocks)
        layer_rngs = None if rng is None else jax.random.split(jax.random.fold_in(rng, self.first_layer), self.count)

        def body(carry, layer_state, layer_rng):
            return nnx.merge(graphdef, layer_state)(carry, inputs, layer_rng)

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.cfg.remat])
        if self.cfg.scan_layers:

            def scan_body(carry, xs):
                return body(carry, *xs)

            return jax.lax.scan(scan_body, x, (state, layer_rngs))
        auxes = []
        for i in range(self.count):
            layer_state = jax.tree.map(lambda a: a[i], state)  # noqa: B023 (called at once)
            x, aux = body(x, layer_state, None if layer_rngs is None else layer_rngs[i])
            auxes.append(aux)
        stacked = None if auxes[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *auxes)
        return x, stacked


class Transformer(nnx.Module):
    """Decoder-only LM: tokens [B, S] -> ModelOutput(logits [B, S, V], moe_losses, stats)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = nnx.Param(
            cfg.init_std * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), pd), axes=("vocab", "embed")
        )
        self.stacks = nnx.List(
            [LayerStack(cfg, is_moe, first, count, rngs) for is_moe, first, count in cfg.layer_segments()]
        )
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        self.lm_head = nnx.Param(
            cfg.init_std * jax.random.normal(rngs.params(), (cfg.d_model, cfg.vocab_size), pd), axes=("embed", "vocab")
        )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> ModelOutput:
        """tokens [B, S] int; positions [B, S] (default 0..S-1); segment_ids [B, S] for packed
        sequences (attention stays inside a segment); rng for stochastic routing (GShard random)."""
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        dtype = jnp.dtype(self.cfg.dtype)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        inputs = BlockInputs(positions=positions, segment_ids=segment_ids, token_ids=tokens)
        losses, stats, expert_ids = MoELosses.zeros(), [], []
        for stack in self.stacks:
            x, aux = stack(x, inputs, rng)
            if aux is not None:
                aux: MoEAux
                losses = losses + jax.tree.map(lambda a: a.sum(0), aux.losses)
                stats.append(aux.stats)
                expert_ids.append(aux.expert_ids)
        x = self.final_norm(x)
        logits = jnp.einsum("bsd,dv->bsv", x, self.lm_head[...].astype(dtype)).astype(jnp.float32)
        stacked = jax.tree.map(lambda *a: jnp.concatenate(a), *stats) if stats else None
        ids = jnp.concatenate(expert_ids) if expert_ids else None
        return ModelOutput(logits=logits, moe_losses=losses, stats=stacked, expert_ids=ids)

"""The decoder-only Transformer: embeddings, pre-norm blocks (dense or MoE FFN by the layer pattern),
final RMSNorm and an untied LM head.

Consecutive layers of the same kind form a `LayerStack` whose parameters are stacked on a leading
"layers" axis; a stack runs under jax.lax.scan (`scan_layers`) or as an unrolled loop with the same
parameter layout, so checkpoints do not depend on the choice. MoE auxiliary losses and routing
statistics come back from the scan as outputs and are summed/stacked here: nothing is sown.

The same forward serves training, evaluation, generation and the routing analyses: given a `KVCache`,
the tokens continue cached sequences (incremental decoding), and `ModelOutput.expert_ids` is the
routing every MoE layer used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moe_jax.config import ModelConfig
from moe_jax.layers.attention import Attention, AttentionCache
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
      expert_ids: [L_moe, B*S, k] int32 routed experts each token used, best first (-1: an inactive
        choice), as the routers chose them in this forward; None for a model without routed experts.
      cache: the updated KVCache when one was given, else None.
    """

    logits: jax.Array
    moe_losses: MoELosses
    stats: RoutingStats | None
    expert_ids: jax.Array | None = None
    cache: KVCache | None = None

    @property
    def aux_loss(self) -> jax.Array:
        return self.moe_losses.total


@struct.dataclass
class KVCache:
    """Keys and values of every attention layer, for incremental decoding (`Transformer(..., cache=)`).

    Attributes:
      k, v: one array per `LayerStack` of the model, [layers_in_stack, B, T, H, Dh] (T: the cache length).
      index: int32 scalar, tokens already written (the next token goes to cache position `index`).
      offset: int32 [B], left padding of each row: keys before it are masked, and RoPE positions count
        from it (so a left-padded prompt sees the positions it would see alone).
    """

    k: list
    v: list
    index: jax.Array
    offset: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, offset=None) -> KVCache:
        """An empty cache of `max_len` positions for `batch` rows (offset [B]: left padding, default 0)."""
        shape = lambda n: (n, batch, max_len, cfg.num_heads, cfg.head_dim)
        counts = [count for _, _, count in cfg.layer_segments()]
        dtype = jnp.dtype(cfg.dtype)
        return cls(
            k=[jnp.zeros(shape(n), dtype) for n in counts],
            v=[jnp.zeros(shape(n), dtype) for n in counts],
            index=jnp.zeros((), jnp.int32),
            offset=jnp.zeros((batch,), jnp.int32) if offset is None else jnp.asarray(offset, jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def stack(self, i: int) -> AttentionCache:
        """The cache of layer stack i: k, v [layers_in_stack, B, T, H, Dh]."""
        return AttentionCache(k=self.k[i], v=self.v[i], index=self.index, offset=self.offset)


def _check_cache(cache: KVCache, num_stacks: int, s: int, positions, segment_ids) -> None:
    if positions is not None or segment_ids is not None:
        raise ValueError(
            "Transformer: with a cache, positions come from cache.index and cache.offset and packed "
            "segments are not supported: pass neither positions nor segment_ids"
        )
    if len(cache.k) != num_stacks:
        raise ValueError(f"KVCache has {len(cache.k)} layer stacks, the model {num_stacks}: use KVCache.init(cfg, ...)")
    held = 0 if isinstance(cache.index, jax.core.Tracer) else int(cache.index)  # under jit: S alone is checked
    if held + s > cache.max_len:
        raise ValueError(
            f"KVCache of {cache.max_len} positions holds {held} tokens: no room for {s} more "
            f"(make it at least prompt + new tokens long)"
        )


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

    def __call__(
        self, x: jax.Array, inputs: BlockInputs, rng: jax.Array | None, cache: AttentionCache | None = None
    ) -> tuple[jax.Array, MoEAux | None, AttentionCache | None]:
        """x [B, S, d] -> (x, MoEAux or None, the updated cache or None). With `cache` the tokens continue
        the cached sequences (inputs.positions and inputs.segment_ids are then not used)."""
        if cache is None:
            x = x + self.attn(self.attn_norm(x), inputs.positions, inputs.segment_ids)
        else:
            attended, cache = self.attn.with_cache(self.attn_norm(x), cache)
            x = x + attended
        h = self.ffn_norm(x)
        if self.is_moe:
            y, aux = self.ffn(h, inputs.token_ids, rng)
        else:
            y, aux = self.ffn(h), None
        return x + y, aux, cache


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

    def __call__(
        self, x: jax.Array, inputs: BlockInputs, rng: jax.Array | None, cache: AttentionCache | None = None
    ) -> tuple[jax.Array, MoEAux | None, AttentionCache | None]:
        """x [B, S, d] -> (x, MoEAux stacked over the stack's layers or None, the updated cache or None).

        cache: the stack's AttentionCache, k and v [layers_in_stack, B, T, H, Dh]."""
        graphdef, state = nnx.split(self.blocks)
        layer_rngs = None if rng is None else jax.random.split(jax.random.fold_in(rng, self.first_layer), self.count)
        kv = None if cache is None else (cache.k, cache.v)

        def body(carry, layer_state, layer_rng, layer_kv):
            layer_cache = None if layer_kv is None else cache.replace(k=layer_kv[0], v=layer_kv[1])
            carry, aux, layer_cache = nnx.merge(graphdef, layer_state)(carry, inputs, layer_rng, layer_cache)
            return carry, (aux, None if layer_cache is None else (layer_cache.k, layer_cache.v))

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.cfg.remat])
        if self.cfg.scan_layers:

            def scan_body(carry, xs):
                return body(carry, *xs)

            x, (aux, kv) = jax.lax.scan(scan_body, x, (state, layer_rngs, kv))
        else:
            outs = []
            for i in range(self.count):
                layer = lambda tree: jax.tree.map(lambda a: a[i], tree)  # noqa: B023 (called at once)
                x, out = body(x, layer(state), None if layer_rngs is None else layer_rngs[i], layer(kv))
                outs.append(out)
            aux, kv = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return x, aux, None if cache is None else cache.replace(k=kv[0], v=kv[1], index=cache.index + x.shape[1])


class Transformer(nnx.Module):
    """Decoder-only LM: tokens [B, S] -> ModelOutput(logits [B, S, V], moe_losses, stats, expert_ids)."""

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
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """tokens [B, S] int; positions [B, S] (default 0..S-1); segment_ids [B, S] for packed
        sequences (attention stays inside a segment); rng for stochastic routing (GShard random).

        With `cache` (a KVCache, positions and segment_ids None) the tokens continue the cached rows at
        cache positions cache.index.., each row's RoPE positions counted from its cache.offset; the
        output then carries the updated cache. MoE routing is per token, so decoding a token at a time
        routes as the full forward does (with the dropless dispatch; a capacity dispatch drops tokens
        depending on the rest of the batch). Expert-choice routing is not per token and refuses a cache."""
        b, s = tokens.shape
        if cache is not None:
            _check_cache(cache, len(self.stacks), s, positions, segment_ids)
            if self.cfg.moe is not None and self.cfg.moe.router == "expert_choice":
                raise ValueError(
                    "expert-choice routing (MoEConfig.router='expert_choice') picks each expert's tokens among a "
                    "whole sequence or batch, so it cannot route the new tokens of a KV-cached step as the full "
                    "forward does: decode without the cache (moe_jax.evaluate.generate.greedy_generate(..., "
                    "use_cache=False), which reruns the full forward and so still routes with the later padding) "
                    "or use a token-choice router"
                )
            positions = cache.stack(0).positions(s)
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        dtype = jnp.dtype(self.cfg.dtype)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        inputs = BlockInputs(positions=positions, segment_ids=segment_ids, token_ids=tokens)
        losses, stats, expert_ids, new_k, new_v = MoELosses.zeros(), [], [], [], []
        for i, stack in enumerate(self.stacks):
            x, aux, stack_cache = stack(x, inputs, rng, None if cache is None else cache.stack(i))
            if stack_cache is not None:
                new_k.append(stack_cache.k)
                new_v.append(stack_cache.v)
            if aux is not None:
                aux: MoEAux
                losses = losses + jax.tree.map(lambda a: a.sum(0), aux.losses)
                stats.append(aux.stats)
                expert_ids.append(aux.expert_ids)
        x = self.final_norm(x)
        logits = jnp.einsum("bsd,dv->bsv", x, self.lm_head[...].astype(dtype)).astype(jnp.float32)
        stacked = jax.tree.map(lambda *a: jnp.concatenate(a), *stats) if stats else None
        ids = jnp.concatenate(expert_ids) if expert_ids else None
        if cache is not None:
            cache = cache.replace(k=new_k, v=new_v, index=cache.index + s)
        return ModelOutput(logits=logits, moe_losses=losses, stats=stacked, expert_ids=ids, cache=cache)

"""A layer-by-layer forward pass over a trained `Transformer`'s own modules, with two extras the
training forward does not need: a KV cache (incremental decoding) and the routing decisions of every
MoE layer (expert-load analyses).

It reuses the model's modules and weights (embedding, RMSNorms, attention projections, dense/MoE FFNs,
LM head; layers scanned per `LayerStack` as in the model) and re-implements only the attention step, to
read and write the cache. Without a cache it computes the model's logits (tests compare it with
`Transformer.__call__`, packed segments included). MoE routing is per token, so decoding one token at a
time routes exactly as the full forward does (dropless dispatch; a capacity dispatch would depend on
the other tokens of the batch).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moe_jax.layers.attention import attention_mask


@struct.dataclass
class KVCache:
    """Keys/values of every layer, per layer stack.

    Attributes:
      k, v: one array per `LayerStack` of the model, [layers_in_stack, B, T, H, Dh].
      index: int32 scalar, positions already written (the next token goes to position `index`).
      offset: int32 [B], left padding of each row: keys before it are masked, and RoPE positions count
        from it (so a left-padded prompt sees the positions it would see alone).
    """

    k: list
    v: list
    index: jax.Array
    offset: jax.Array

    @classmethod
    def init(cls, model, batch: int, max_len: int, offset=None) -> "KVCache":
        cfg = model.cfg
        dtype = jnp.dtype(cfg.dtype)
        shape = lambda n: (n, batch, max_len, cfg.num_heads, cfg.head_dim)
        counts = [stack.count for stack in model.stacks]
        off = jnp.zeros((batch,), jnp.int32) if offset is None else jnp.asarray(offset, jnp.int32)
        return cls(
            k=[jnp.zeros(shape(n), dtype) for n in counts],
            v=[jnp.zeros(shape(n), dtype) for n in counts],
            index=jnp.zeros((), jnp.int32),
            offset=off,
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


@struct.dataclass
class LayerwiseOutput:
    """logits [B, S, V] float32; cache (updated) or None; routing: expert ids [L_moe, B, S, k] and their
    mask [L_moe, B, S, k] (False for a dropped choice) when captured, else None."""

    logits: jax.Array
    cache: KVCache | None
    expert_ids: jax.Array | None
    expert_mask: jax.Array | None


def _attention(attn, x, positions, mask, ck, cv, start):
    """The model's attention (`moe_jax.layers.attention.Attention`) with an optional cache.

    x [B, S, d]; positions [B, S]; mask [B|1, 1, S, S|T]; ck/cv [B, T, H, Dh] or None; start: where the
    S new keys/values are written. Returns (out [B, S, d], ck, cv).
    """
    dt = x.dtype
    q, k, v = attn.qkv(x, positions)
    if ck is not None:
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, start, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, start, 0, 0))
        k, v = ck.astype(dt), cv.astype(dt)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=attn.cfg.attention_impl)
    return attn.output(out), ck, cv


def layerwise_forward(
    model,
    tokens: jax.Array,
    *,
    cache: KVCache | None = None,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    capture_routing: bool = False,
) -> LayerwiseOutput:
    """Logits of `model` (a `moe_jax.model.transformer.Transformer`) for tokens [B, S].

    Without `cache`: the plain forward (positions default 0..S-1; segment_ids [B, S] for packed rows).
    With `cache`: the S tokens continue the cached sequence at positions cache.index.. (rows left-padded
    by cache.offset); returns the updated cache. `capture_routing` also returns the routed expert ids.
    """
    cfg = model.cfg
    b, s = tokens.shape
    dtype = jnp.dtype(cfg.dtype)
    x = jnp.take(model.embed[...], tokens, axis=0).astype(dtype)
    start = None
    if cache is None:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        mask = attention_mask(segment_ids, s)
    else:
        if positions is not None or segment_ids is not None:
            raise ValueError("with a cache, positions come from cache.index/offset and segments are not supported")
        start = cache.index
        abs_q = start + jnp.arange(s, dtype=jnp.int32)  # [S]
        positions = abs_q[None, :] - cache.offset[:, None]  # [B, S]
        key = jnp.arange(cache.max_len, dtype=jnp.int32)
        causal = key[None, None, None, :] <= abs_q[None, None, :, None]
        valid = key[None, None, None, :] >= cache.offset[:, None, None, None]
        self_key = key[None, None, None, :] == abs_q[None, None, :, None]  # pad queries keep one key (no NaN)
        mask = (causal & valid) | self_key  # [B, 1, S, T]
    ids_flat = tokens.reshape(b * s)
    new_k, new_v, expert_ids, expert_mask = [], [], [], []
    for si, stack in enumerate(model.stacks):
        graphdef, state = nnx.split(stack.blocks)
        ck = None if cache is None else cache.k[si]
        cv = None if cache is None else cache.v[si]

        def body(h, xs, graphdef=graphdef, is_moe=stack.is_moe):
            layer_state, lk, lv = xs
            block = nnx.merge(graphdef, layer_state)
            a, lk, lv = _attention(block.attn, block.attn_norm(h), positions, mask, lk, lv, start)
            h = h + a
            u = block.ffn_norm(h)
            ids = sel = None
            if is_moe:
                y, _ = block.ffn(u, tokens, None)
                if capture_routing and block.ffn.router is not None:
                    r = block.ffn.router(u.reshape(b * s, -1), ids_flat, None)
                    ids, sel = r.indices.reshape(b, s, -1), r.mask.reshape(b, s, -1)
            else:
                y = block.ffn(u)
            return h + y, (lk, lv, ids, sel)

        x, (ck, cv, ids, sel) = jax.lax.scan(body, x, (state, ck, cv))
        new_k.append(ck)
        new_v.append(cv)
        if ids is not None:
            expert_ids.append(ids)
            expert_mask.append(sel)
    x = model.final_norm(x)
    logits = jnp.einsum("bsd,dv->bsv", x, model.lm_head[...].astype(dtype)).astype(jnp.float32)
    new_cache = None if cache is None else dataclasses.replace(cache, k=new_k, v=new_v, index=cache.index + s)
    return LayerwiseOutput(
        logits=logits,
        cache=new_cache,
        expert_ids=jnp.concatenate(expert_ids) if expert_ids else None,
        expert_mask=jnp.concatenate(expert_mask) if expert_mask else None,
    )

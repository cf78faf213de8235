"""Causal multi-head self-attention with RoPE (no biases, as DeepSeek's models), with an optional KV
cache for incremental decoding (`Attention.with_cache`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moe_jax.config import ModelConfig
from moe_jax.layers.rope import apply_rope, rope_frequencies


def attention_mask(segment_ids: jax.Array | None, seq_len: int) -> jax.Array:
    """[B or 1, 1, S, S] bool: causal, and within one packed segment when segment_ids [B, S] is given."""
    causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))[None, None]
    if segment_ids is None:
        return causal
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return causal & same


@struct.dataclass
class AttentionCache:
    """Keys and values of one attention layer, for decoding a sequence a few tokens at a time.

    Attributes:
      k, v: [B, T, H, Dh] (T: the cache length), RoPE already applied to k.
      index: int32 scalar, positions already written: the next S tokens go to index .. index + S - 1.
      offset: int32 [B], left padding of each row: keys before it are masked, and RoPE positions count
        from it (so a left-padded prompt sees the positions it would see alone).
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array
    offset: jax.Array

    def positions(self, s: int) -> jax.Array:
        """[B, S] RoPE positions of the next S tokens of every row."""
        return (self.index + jnp.arange(s, dtype=jnp.int32))[None, :] - self.offset[:, None]

    def mask(self, s: int) -> jax.Array:
        """[B, 1, S, T] bool: the next S queries see the written keys of their row up to themselves."""
        query = self.index + jnp.arange(s, dtype=jnp.int32)  # [S] cache slots of the new tokens
        key = jnp.arange(self.k.shape[1], dtype=jnp.int32)
        causal = key[None, None, None, :] <= query[None, None, :, None]
        valid = key[None, None, None, :] >= self.offset[:, None, None, None]
        own = key[None, None, None, :] == query[None, None, :, None]  # padding queries keep one key (no NaN)
        return (causal & valid) | own

    def write(self, k: jax.Array, v: jax.Array) -> AttentionCache:
        """The cache with k, v [B, S, H, Dh] written at `index`, and index advanced by S."""
        at = (0, self.index, 0, 0)
        return self.replace(
            k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at),
            v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at),
            index=self.index + k.shape[1],
        )


class Attention(nnx.Module):
    """q/k/v projections [d, H, Dh], output [H, Dh, d]; softmax in float32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, dh, std, pd = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.init_std, cfg.param_dtype

        def proj(shape, axes):
            return nnx.Param(std * jax.random.normal(rngs.params(), shape, pd), axes=axes)

        self.wq = proj((d, h, dh), ("embed", "heads", "head_dim"))
        self.wk = proj((d, h, dh), ("embed", "heads", "head_dim"))
        self.wv = proj((d, h, dh), ("embed", "heads", "head_dim"))
        self.wo = proj((h, dh, d), ("heads", "head_dim", "embed"))

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Projections with RoPE applied to q and k: x [B, S, d], positions [B, S] -> 3 x [B, S, H, Dh]."""
        dt = x.dtype
        q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(dt))
        k = jnp.einsum("bsd,dhk->bshk", x, self.wk[...].astype(dt))
        v = jnp.einsum("bsd,dhk->bshk", x, self.wv[...].astype(dt))
        cos, sin = rope_frequencies(positions, self.cfg.head_dim, self.cfg.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, attended: jax.Array) -> jax.Array:
        """[B, S, H, Dh] -> [B, S, d]."""
        return jnp.einsum("bshk,hkd->bsd", attended, self.wo[...].astype(attended.dtype))

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """x [B, S, d], positions [B, S], segment_ids [B, S] or None -> [B, S, d]."""
        q, k, v = self.qkv(x, positions)
        mask = attention_mask(segment_ids, x.shape[1])
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.cfg.attention_impl)
        return self.output(out)

    def with_cache(self, x: jax.Array, cache: AttentionCache) -> tuple[jax.Array, AttentionCache]:
        """The next S tokens x [B, S, d] of the cached sequences -> ([B, S, d], the cache with them written).

        Positions come from the cache (`AttentionCache.positions`); queries attend to every cached key of
        their row up to themselves."""
        s = x.shape[1]
        q, k, v = self.qkv(x, cache.positions(s))
        mask = cache.mask(s)
        cache = cache.write(k, v)
        keys, values = cache.k.astype(x.dtype), cache.v.astype(x.dtype)
        out = jax.nn.dot_product_attention(q, keys, values, mask=mask, implementation=self.cfg.attention_impl)
        return self.output(out), cache

"""Causal multi-head self-attention with RoPE (no biases, as DeepSeek's models)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.layers.rope import apply_rope, rope_frequencies


def attention_mask(segment_ids: jax.Array | None, seq_len: int) -> jax.Array:
    """[B or 1, 1, S, S] bool: causal, and within one packed segment when segment_ids [B, S] is given."""
    causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))[None, None]
    if segment_ids is None:
        return causal
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return causal & same


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

"""Balance losses of paper §3.3 and the router z-loss, as pure functions.

Shapes: B sequences, S tokens per sequence, E routed experts (N'), k activated routed experts (K').
All functions return the *unweighted* loss; the MoE layer multiplies by alpha_1 / alpha_2.

Expert-level (Eq 12-14), per sequence of length T = S:
    L = sum_i f_i P_i,   f_i = N'/(K' T) * #{t : token t selects expert i},   P_i = (1/T) sum_t s_{i,t}
Uniform routing gives f_i = 1 and L = 1. `scope="sequence"` averages L over the batch (the paper and
DeepSeek's `seq_aux=True`); `scope="global"` computes f and P over all B*S tokens at once.

Device-level (Eq 15-17) over D equal groups of experts:
    L = sum_g f'_g P'_g,   f'_g = mean_{i in g} f_i,   P'_g = sum_{i in g} P_i
f_i carries no gradient (it counts); gradients flow through P_i.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def expert_fraction(indices: jax.Array, mask: jax.Array, num_experts: int, scope: str = "sequence") -> jax.Array:
    """f_i of Eq 13: N'/(K' T) times the number of tokens choosing expert i.

    Args:
      indices: [B, S, k] expert ids.
      mask: [B, S, k] active assignments (inactive ones are not counted).
      num_experts: N'.
      scope: "sequence" -> [B, E] per sequence; "global" -> [1, E] over the whole batch.

    Returns:
      [B, E] or [1, E] float32, without gradient.
    """
    b, s, k = indices.shape
    onehot = jax.nn.one_hot(indices, num_experts, dtype=jnp.float32) * mask[..., None].astype(jnp.float32)
    counts = onehot.sum(axis=(1, 2))  # [B, E]
    tokens = s
    if scope == "global":
        counts, tokens = counts.sum(axis=0, keepdims=True), b * s
    elif scope != "sequence":
        raise ValueError(f"unknown balance scope {scope!r}")
    return jax.lax.stop_gradient(counts * num_experts / (k * tokens))


def expert_probability(probs: jax.Array, scope: str = "sequence") -> jax.Array:
    """P_i of Eq 14: mean router score per expert. probs [B, S, E] -> [B, E] (or [1, E] global)."""
    p = probs.astype(jnp.float32).mean(axis=1)
    return p.mean(axis=0, keepdims=True) if scope == "global" else p


def expert_balance_loss(probs: jax.Array, indices: jax.Array, mask: jax.Array, scope: str = "sequence") -> jax.Array:
    """Expert-level balance loss sum_i f_i P_i (Eq 12), averaged over sequences for scope="sequence".

    Args:
      probs: [B, S, E] softmax scores over routed experts.
      indices: [B, S, k] selected experts.
      mask: [B, S, k] active assignments.
      scope: "sequence" or "global".

    Returns:
      scalar float32 (1.0 for perfectly uniform routing).
    """
    f = expert_fraction(indices, mask, probs.shape[-1], scope)
    p = expert_probability(probs, scope)
    return jnp.mean(jnp.sum(f * p, axis=-1))


def device_balance_loss(
    probs: jax.Array, indices: jax.Array, mask: jax.Array, num_groups: int, scope: str = "sequence"
) -> jax.Array:
    """Device-level balance loss sum_g f'_g P'_g (Eq 15-17) over `num_groups` equal expert groups.

    Group g holds experts [g*E/D, (g+1)*E/D), the experts a device owns under expert parallelism.

    Args:
      probs: [B, S, E]; indices, mask: [B, S, k]; num_groups: D (must divide E); scope as above.

    Returns:
      scalar float32 (1.0 for perfectly uniform routing).
    """
    e = probs.shape[-1]
    if e % num_groups:
        raise ValueError(f"device balance loss: {num_groups} groups do not divide {e} experts")
    f = expert_fraction(indices, mask, e, scope)
    p = expert_probability(probs, scope)
    f_group = f.reshape(f.shape[0], num_groups, e // num_groups).mean(-1)
    p_group = p.reshape(p.shape[0], num_groups, e // num_groups).sum(-1)
    return jnp.mean(jnp.sum(f_group * p_group, axis=-1))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2. logits [..., E] -> scalar."""
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.square(z))

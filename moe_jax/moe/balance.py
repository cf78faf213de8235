"""Balance losses of paper §3.3 and the router z-loss, as pure functions.

Shapes: B sequences, S tokens per sequence, E routed experts (N'), k activated routed experts (K').
All functions return the *unweighted* loss; the MoE layer multiplies by alpha_1 / alpha_2 / alpha_3.

Expert-level (Eq 12-14), per sequence of length T = S:
    L = sum_i f_i P_i,   f_i = N'/(K' T) * #{t : token t selects expert i},   P_i = (1/T) sum_t s_{i,t}
Uniform routing gives f_i = 1 and L = 1. `scope="sequence"` averages L over the batch (the paper and
DeepSeek's `seq_aux=True`); `scope="global"` computes f and P over all B*S tokens at once.

Device-level (Eq 15-17) over D equal groups of experts:
    L = sum_g f'_g P'_g,   f'_g = mean_{i in g} f_i,   P'_g = sum_{i in g} P_i
f_i carries no gradient (it counts); gradients flow through P_i.

Communication (DeepSeek-V2, arXiv:2405.04434 §2.1.4, Eq 29-31), for group-limited routing over D
groups (devices) of which a token may use M:
    L = sum_i f''_i P''_i,   f''_i = D/(M T) * #{t : token t is sent to group i},   P''_i = sum_{j in i} P_j
Uniform routing (each token on exactly M groups, spread evenly) gives f''_i = 1, P''_i = 1/D and L = 1.
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
    _, s, k = indices.shape
    onehot = jax.nn.one_hot(indices, num_experts, dtype=jnp.float32) * mask[..., None].astype(jnp.float32)
    counts = onehot.sum(axis=(1, 2))  # [B, E]
    return _scoped_fraction(counts, s, num_experts, k, scope)


def _scoped_fraction(counts: jax.Array, seq_len: int, num: int, per_token: int, scope: str) -> jax.Array:
    """counts [B, X] over B sequences of `seq_len` tokens -> num/(per_token T) * counts, without gradient.

    T is a sequence's tokens for scope="sequence" ([B, X]), the batch's for "global" (counts summed, [1, X]):
    Eq 13's N'/(K' T) for experts, V2 Eq 30's D/(M T) for groups.
    """
    tokens = seq_len
    if scope == "global":
        counts, tokens = counts.sum(axis=0, keepdims=True), counts.shape[0] * seq_len
    elif scope != "sequence":
        raise ValueError(f"unknown balance scope {scope!r}")
    return jax.lax.stop_gradient(counts * num / (per_token * tokens))


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


def group_fraction(
    indices: jax.Array, mask: jax.Array, num_experts: int, num_groups: int, topk_groups: int, scope: str = "sequence"
) -> jax.Array:
    """f''_i of V2 Eq 30: D/(M T) times the number of tokens sent to group (device) i.

    A token is sent to group i when at least one of its active assignments is an expert of group i
    (experts [i*E/D, (i+1)*E/D)); two experts on one device count once.

    Args:
      indices, mask: [B, S, k]; num_experts: E; num_groups: D (divides E); topk_groups: M; scope as above.

    Returns:
      [B, D] (or [1, D] for scope="global") float32, without gradient.
    """
    s = indices.shape[1]
    if num_experts % num_groups:
        raise ValueError(f"communication balance loss: {num_groups} groups do not divide {num_experts} experts")
    group = indices // (num_experts // num_groups)
    onehot = jax.nn.one_hot(group, num_groups, dtype=jnp.float32) * mask[..., None].astype(jnp.float32)
    counts = onehot.max(axis=2).sum(axis=1)  # [B, D]: tokens that reach each group
    return _scoped_fraction(counts, s, num_groups, topk_groups, scope)


def communication_balance_loss(
    probs: jax.Array, indices: jax.Array, mask: jax.Array, num_groups: int, topk_groups: int, scope: str = "sequence"
) -> jax.Array:
    """DeepSeek-V2's communication balance loss sum_i f''_i P''_i (arXiv:2405.04434 Eq 29-31).

    It balances what each device receives under device-limited routing: f''_i is the share of tokens
    sent to device i (normalised by the M devices a token may use, `group_fraction`), P''_i the summed
    mean score of its experts.

    Args:
      probs: [B, S, E] router scores; indices, mask: [B, S, k]; num_groups: D (must divide E);
      topk_groups: M; scope: "sequence" (averaged over sequences) or "global".

    Returns:
      scalar float32 (1.0 for perfectly uniform routing).
    """
    e = probs.shape[-1]
    f = group_fraction(indices, mask, e, num_groups, topk_groups, scope)
    p = expert_probability(probs, scope)
    p_group = p.reshape(p.shape[0], num_groups, e // num_groups).sum(-1)
    return jnp.mean(jnp.sum(f * p_group, axis=-1))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2. logits [..., E] -> scalar."""
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.square(z))

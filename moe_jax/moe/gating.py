"""Gating maths: which experts each token goes to, and with what gate value (paper Eq 3-5, 9-11).

Besides the paper's softmax gates, `sigmoid_topk` gives DeepSeek-V3's sigmoid gates
(arXiv:2412.19437 §2.1.2, Eq 13-15), with `biased_topk` and `update_selection_bias` its
auxiliary-loss-free balancing (a per-expert bias for the selection only, Eq 16);
`group_limited_topk` restricts either score to the top-M of G expert groups before the top-k:
DeepSeek-V2's device-limited routing (arXiv:2405.04434 §2.1.3) and DeepSeek-V3's node-limited
routing (arXiv:2412.19437 §2.1.2); and `expert_choice` is the expert-choice routing of Zhou et al.
2022 (arXiv:2202.09368), where each expert picks its tokens.

Pure functions over token-major arrays returning a `Routing`; `moe_jax.moe.router` wraps them in NNX
modules that own the router weights or the hash table. Shapes: T tokens, d hidden size, E routed
experts, k experts per token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moe_jax.config import GROUP_SCORES


@struct.dataclass
class Routing:
    """Per-token expert assignment.

    Attributes:
      indices: [T, k] int32 routed expert ids, best first.
      weights: [T, k] float32 gate values g_{i,t}; 0 where `mask` is False.
      mask: [T, k] bool, True where the assignment is active. GShard's random policy can drop a
        second choice; hash routing and greedy top-k keep all.
      probs: [T, E] float32 router scores s_{i,t} (softmax over routed experts; for sigmoid gates the
        sigmoid scores normalised over the E experts, DeepSeek-V3 Eq 19), or None for routers
        without scores (hash). Balance losses need them.
      logits: [T, E] float32 router logits, or None (z-loss needs them).
      max_active: a static upper bound on the active assignments (True entries of `mask`), or None
        (no bound below T*k). Expert choice sets it to E*C*G, far below its T*E columns, so the
        dropless dispatch computes only that many rows. Pytree metadata, not a leaf: it is part of
        the jit cache key and survives jit, vmap and tree maps unchanged.
      max_per_expert: a static upper bound on any one expert's active assignments, or None. Expert
        choice sets it to C*G (each expert takes C tokens of each of the G groups), so expert
        parallelism's ring scheme computes at most E_l*C*G rows on a device holding E_l experts.
        Metadata like `max_active`.
    """

    indices: jax.Array
    weights: jax.Array
    mask: jax.Array
    probs: jax.Array | None = None
    logits: jax.Array | None = None
    max_active: int | None = struct.field(pytree_node=False, default=None)
    max_per_expert: int | None = struct.field(pytree_node=False, default=None)


def router_logits(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Router logits u_t^T e_i in float32: x [T, d], kernel [d, E] -> [T, E]."""
    return jnp.einsum("td,de->te", x.astype(jnp.float32), kernel.astype(jnp.float32))


def softmax_topk(
    logits: jax.Array,
    k: int,
    *,
    renormalize: bool = False,
    second_expert_policy: str = "greedy",
    rng: jax.Array | None = None,
    disable_top: int = 0,
) -> Routing:
    """Learned softmax routing with top-k selection (paper Eq 4-5 / 10-11).

    The gate of a selected expert is its softmax probability over all E routed experts, without
    renormalisation unless `renormalize` (paper: none; DeepSeekMoE 16B: `norm_topk_prob=false`).

    Args:
      logits: [T, E] float32 router logits.
      k: experts per token (Switch: 1, GShard: 2, DeepSeekMoE 2B: 7).
      renormalize: divide the k selected gates by their sum.
      second_expert_policy: "greedy" keeps all k choices. "random" is GShard's policy: choice j >= 2
        is kept with probability min(1, 2 * g_j / (g_1 + g_j)); needs `rng`. A dropped choice gets
        mask False and weight 0.
      rng: PRNG key for the random policy; without one (e.g. at evaluation) the policy is greedy.
      disable_top: inference-time analysis of paper §4.5 / Fig 4: per token, the `disable_top`
        routed experts with the highest probability are excluded (their scores set to -inf for the
        selection) and the top-k are taken from the remaining ones. The gates stay the original
        softmax probabilities (over all E experts) of the chosen experts, and `probs` is unchanged.
        0 (the default) changes nothing. Needs disable_top + k <= E.

    Returns:
      Routing with indices/weights/mask [T, k], probs/logits [T, E].
    """
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    if disable_top:
        if disable_top + k > probs.shape[-1]:
            raise ValueError(f"disable_top={disable_top} + k={k} exceeds the {probs.shape[-1]} routed experts")
        _, top = jax.lax.top_k(probs, disable_top)
        rows = jnp.arange(probs.shape[0])[:, None]
        _, indices = jax.lax.top_k(probs.at[rows, top].set(-jnp.inf), k)
        gates = jnp.take_along_axis(probs, indices, axis=-1)
    else:
        gates, indices = jax.lax.top_k(probs, k)
    mask = jnp.ones(indices.shape, dtype=bool)
    if second_expert_policy == "random" and k > 1 and rng is not None:
        keep_prob = jnp.minimum(1.0, 2.0 * gates[:, 1:] / (gates[:, :1] + gates[:, 1:]))
        keep = jax.random.uniform(rng, keep_prob.shape) < keep_prob
        mask = mask.at[:, 1:].set(keep)
    elif second_expert_policy not in ("greedy", "random"):
        raise ValueError(f"unknown second_expert_policy {second_expert_policy!r}")
    gates = jnp.where(mask, gates, 0.0)
    if renormalize:
        gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-20)
    return Routing(indices=indices.astype(jnp.int32), weights=gates, mask=mask, probs=probs, logits=logits)


def _positive(total: jax.Array) -> jax.Array:
    """A sum of sigmoid scores, kept off 0 where every score underflowed (logits below about -88)."""
    return jnp.maximum(total, jnp.finfo(jnp.float32).tiny)


def sigmoid_topk(logits: jax.Array, k: int, *, renormalize: bool = True) -> Routing:
    """DeepSeek-V3's sigmoid gating (arXiv:2412.19437 §2.1.2, Eq 13-15), without its selection bias (Eq 16).

        s_{i,t}  = sigmoid(u_t^T e_i)                                      (Eq 15)
        g'_{i,t} = s_{i,t} if s_{i,t} in TopK({s_{j,t} | 1 <= j <= E}, k) else 0      (Eq 14)
        g_{i,t}  = g'_{i,t} / sum_j g'_{j,t}                               (Eq 13, `renormalize`)

    Unlike softmax, the sigmoid scores do not sum to 1, so V3 renormalises the k selected ones.
    The routed scaling factor of V3's released configuration (`routed_scaling_factor`) multiplies the
    routed output in the MoE layer, not these gates. For balance losses, `probs` holds the scores
    normalised over all E experts, s'_{i,t} = s_{i,t} / sum_j s_{j,t} (V3 Eq 19), so the expert-level
    loss of arXiv:2401.06066 (Eq 12-14) with those scores is V3's sequence-wise balance loss (Eq 17-20).

    Args:
      logits: [T, E] float32 router logits u_t^T e_i.
      k: experts per token (V3: 8 of 256).
      renormalize: divide the k selected gates by their sum (V3: yes; off gives g'_{i,t}).

    Returns:
      Routing with indices/weights/mask [T, k], probs (s'_{i,t}) and logits [T, E].
    """
    logits = logits.astype(jnp.float32)
    scores = jax.nn.sigmoid(logits)
    gates, indices = jax.lax.top_k(scores, k)
    if renormalize:
        gates = gates / _positive(jnp.sum(gates, axis=-1, keepdims=True))
    probs = scores / _positive(jnp.sum(scores, axis=-1, keepdims=True))
    mask = jnp.ones(indices.shape, dtype=bool)
    return Routing(indices=indices.astype(jnp.int32), weights=gates, mask=mask, probs=probs, logits=logits)


def expert_choice_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes from a group of T tokens: C = min(T, ceil(capacity_factor * T * k / E)), >= 1."""
    return min(num_tokens, max(1, math.ceil(capacity_factor * num_tokens * k / num_experts)))


def expert_choice(logits: jax.Array, k: int, *, capacity_factor: float = 1.0, num_groups: int = 1) -> Routing:
    """Expert-choice routing (Zhou et al. 2022, arXiv:2202.09368 §3.1): each expert takes its top-C tokens.

    The T tokens are split into G = `num_groups` contiguous groups of T_g = T / G tokens (G = B: one per
    sequence; G = 1: the whole batch), and in each group g, for every routed expert i:

        S_{t,i}  = Softmax_i(u_t^T e_i)                         scores, softmax over the E experts per token
        C        = min(T_g, ceil(capacity_factor * T_g * k / E))   tokens per expert (paper: k = n c / e)
        I_{g,i}  = TopK({S_{t,i} | t in g}, C)                   the C tokens of g with the highest score
        g_{i,t}  = S_{t,i} if t in I_{g,i} else 0                 the gate: the raw score, no renormalisation

    and the layer computes sum_i g_{i,t} FFN_i(u_t). Every expert processes exactly C tokens per group
    (balanced by construction: no balance loss), so on average E C / T_g ~ capacity_factor * k experts
    per token, and a token gets anywhere from 0 (the routed part of its output is then 0) to E experts.
    Equal scores are broken towards the earlier token (`jax.lax.top_k`).

    Causal leakage: whether expert i takes token t depends on the scores of every token of t's group,
    including the tokens after t. In a decoder LM trained on next-token prediction, token t's output
    (hence the prediction of token t+1) can thus see the future of its sequence (and, with G = 1, other
    sequences of the batch); the model may learn to exploit it, and one cannot route a token before the
    rest of its group exists (no incremental decoding). docs/routing.md discusses it.

    The result is a `Routing` with k = E columns, so every dispatch runs it unchanged: for each token
    the E experts ordered chosen-first, then by score (best first); `mask` is True for the experts that
    chose the token, `weights` their scores (0 elsewhere). No narrower token-major form holds every case,
    since a token may be chosen by all E experts. Exactly E C G of the T E assignments are active, C G
    per expert, which `max_active` and `max_per_expert` record, so the dropless dispatch (and expert
    parallelism's ring scheme) computes those rows only.

    Args:
      logits: [T, E] float32 router logits u_t^T e_i.
      k: the average number of experts per token the capacity is sized for (`MoEConfig.top_k`).
      capacity_factor: `MoEConfig.expert_choice_capacity_factor`; the paper's c is capacity_factor * k.
      num_groups: G, how many contiguous groups the selection runs over; must divide T.

    Returns:
      Routing with indices/weights/mask [T, E], probs (S) and logits [T, E], max_active = E C G,
      max_per_expert = C G.
    """
    logits = logits.astype(jnp.float32)
    t, e = logits.shape
    if num_groups < 1 or t % num_groups:
        raise ValueError(f"expert choice: {num_groups} selection groups do not divide the {t} tokens")
    probs = jax.nn.softmax(logits, axis=-1)
    tg = t // num_groups
    cap = expert_choice_capacity(tg, k, e, capacity_factor)
    by_expert = jax.lax.stop_gradient(probs).reshape(num_groups, tg, e).transpose(0, 2, 1)  # [G, E, T_g]
    _, chosen = jax.lax.top_k(by_expert, cap)  # [G, E, C] token positions within the group
    rows = jnp.arange(num_groups)[:, None, None], jnp.arange(e)[None, :, None]
    picked = jnp.zeros((num_groups, e, tg), bool).at[rows[0], rows[1], chosen].set(True)
    picked = picked.transpose(0, 2, 1).reshape(t, e)  # [T, E]: expert i chose token t
    # Chosen experts first, each part best first (scores lie in [0, 1]: shifting the unchosen by -2 sorts them last).
    score = jax.lax.stop_gradient(probs)
    _, indices = jax.lax.top_k(jnp.where(picked, score, score - 2.0), e)
    mask = jnp.take_along_axis(picked, indices, axis=-1)
    weights = jnp.where(mask, jnp.take_along_axis(probs, indices, axis=-1), 0.0)
    return Routing(
        indices=indices.astype(jnp.int32),
        weights=weights,
        mask=mask,
        probs=probs,
        logits=logits,
        max_active=e * cap * num_groups,
        max_per_expert=cap * num_groups,
    )


def group_scores(scores: jax.Array, num_groups: int, group_score: str = "max") -> jax.Array:
    """The score a_{g,t} of each of G equal groups of consecutive experts. scores [T, E] -> [T, G].

        "max":      a_{g,t} = max_{i in g} s_{i,t}                  (DeepSeek-V2 §2.1.3)
        "top2_sum": a_{g,t} = sum of the two largest s_{i,t}, i in g  (DeepSeek-V3 §2.1.2: the highest
                    K_r/M = 8/4 = 2 scores; its released `n_group`/`topk_group` code sums the top 2)
    Group g holds experts [g*E/G, (g+1)*E/G): the ones device g owns under expert parallelism.
    """
    t, e = scores.shape
    if num_groups < 1 or e % num_groups:
        raise ValueError(f"group-limited routing: {num_groups} groups must divide the {e} routed experts")
    grouped = scores.reshape(t, num_groups, e // num_groups)
    if group_score == "max":
        return grouped.max(axis=-1)
    if group_score == "top2_sum":
        if e // num_groups < 2:
            raise ValueError(
                f"group_score='top2_sum' needs >= 2 experts per group ({e} experts in {num_groups} groups): "
                f"use group_score='max' or fewer groups"
            )
        return jax.lax.top_k(grouped, 2)[0].sum(axis=-1)
    raise ValueError(f"group_score={group_score!r} is not one of {GROUP_SCORES}")


def group_limited_mask(scores: jax.Array, num_groups: int, topk_groups: int, group_score: str = "max") -> jax.Array:
    """[T, E] bool: True for the experts in each token's top-M groups, G_t = TopK({a_{g,t}}, M).

    scores [T, E] are the selection scores (see `group_scores`); M = `topk_groups` <= G = `num_groups`.
    """
    t, e = scores.shape
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"group-limited routing: topk_groups={topk_groups} must be in [1, num_groups={num_groups}]")
    _, top = jax.lax.top_k(group_scores(scores, num_groups, group_score), topk_groups)  # [T, M]
    kept = jnp.zeros((t, num_groups), bool).at[jnp.arange(t)[:, None], top].set(True)
    return jnp.repeat(kept, e // num_groups, axis=1)


def group_limited_topk(
    logits: jax.Array,
    k: int,
    *,
    num_groups: int,
    topk_groups: int,
    group_score: str = "max",
    score: str = "softmax",
    renormalize: bool = False,
    bias: jax.Array | None = None,
) -> Routing:
    """Group-limited top-k routing: DeepSeek-V2's device-limited routing (arXiv:2405.04434 §2.1.3) and
    DeepSeek-V3's node-limited routing (arXiv:2412.19437 §2.1.2).

    The E routed experts form G groups of E/G consecutive experts (group g = the experts device g
    holds under expert parallelism). Each token first keeps the M groups with the highest group
    score, then takes its top-k experts among the experts of those groups only:

        s_{i,t}  = Softmax_i(u_t^T e_i) over all E experts (V2 Eq 11-12), or sigmoid(u_t^T e_i) (V3 Eq 15)
        c_{i,t}  = s_{i,t} + b_i          selection score; b_i is V3's selection bias (Eq 16), 0 without
        a_{g,t}  = max_{i in g} c_{i,t}   ("max", V2)  or  sum of the top 2 c_{i,t} in g  ("top2_sum", V3)
        G_t      = TopK({a_{g,t} | 1 <= g <= G}, M)
        c~_{i,t} = c_{i,t} if group(i) in G_t else -inf
        g'_{i,t} = s_{i,t} if c~_{i,t} in TopK({c~_{j,t}}, k) else 0
        g_{i,t}  = g'_{i,t} / sum_j g'_{j,t}                          (`renormalize`: V3 yes, V2 no)

    The gates are the unmasked scores of the selected experts: V2's softmax stays over all E experts
    (the mask only restricts the selection), so with M = G this is `softmax_topk` / `sigmoid_topk`.
    Every token's experts then live on at most M groups (devices, when G is the expert-parallel size).
    `probs` is as in those functions (softmax scores, or sigmoid scores normalised over E).

    Args:
      logits: [T, E] float32 router logits.
      k: experts per token (V2: 6 of 160; V3: 8 of 256); needs k <= M * E/G.
      num_groups: G (V2: D = 8 devices; V3: `n_group` = 8 nodes); must divide E.
      topk_groups: M (V2: 3; V3: `topk_group` = 4), 1 <= M <= G.
      group_score: "max" or "top2_sum" (see `group_scores`).
      score: "softmax" or "sigmoid".
      renormalize: divide the k selected gates by their sum.
      bias: optional [E] float32 selection bias b_i, added for the group and top-k selection only.

    Returns:
      Routing with indices/weights/mask [T, k], probs/logits [T, E].
    """
    logits = logits.astype(jnp.float32)
    e = logits.shape[-1]
    if num_groups >= 1 and e % num_groups == 0 and k > topk_groups * (e // num_groups):
        raise ValueError(
            f"group-limited routing: top_k={k} exceeds the {topk_groups * (e // num_groups)} experts of "
            f"topk_groups={topk_groups} groups of {e // num_groups}: raise topk_groups or lower top_k"
        )
    if score == "softmax":
        scores = probs = jax.nn.softmax(logits, axis=-1)
    elif score == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        probs = scores / _positive(jnp.sum(scores, axis=-1, keepdims=True))
    else:
        raise ValueError(f"score={score!r} is not 'softmax' or 'sigmoid'")
    select = scores if bias is None else scores + bias.astype(jnp.float32)
    keep = group_limited_mask(select, num_groups, topk_groups, group_score)
    _, indices = jax.lax.top_k(jnp.where(keep, select, -jnp.inf), k)
    gates = jnp.take_along_axis(scores, indices, axis=-1)
    if renormalize:
        total = jnp.sum(gates, axis=-1, keepdims=True)
        gates = gates / (total + 1e-20 if score == "softmax" else _positive(total))
    mask = jnp.ones(indices.shape, dtype=bool)
    return Routing(indices=indices.astype(jnp.int32), weights=gates, mask=mask, probs=probs, logits=logits)


def biased_topk(
    logits: jax.Array, bias: jax.Array, k: int, *, score: str = "sigmoid", renormalize: bool = True
) -> Routing:
    """DeepSeek-V3's auxiliary-loss-free balancing (arXiv:2412.19437 §2.1.2, Eq 16): the top-k of the scores
    plus a per-expert bias b_i chooses the experts; the gates are the un-biased scores.

        s_{i,t}  = sigmoid(u_t^T e_i)          (score="sigmoid", Eq 15; "softmax": over the E experts, Eq 11)
        g'_{i,t} = s_{i,t} if s_{i,t} + b_i in TopK({s_{j,t} + b_j | 1 <= j <= E}, k) else 0       (Eq 16)
        g_{i,t}  = g'_{i,t} / sum_j g'_{j,t}                                    (Eq 13, `renormalize`)

    The bias decides where a token goes, never how much an expert's output weighs, and gets no gradient.
    `probs` and `logits` are those of the un-biased router (`sigmoid_topk` / `softmax_topk`), so balance
    losses and the z-loss do not see the bias. With b = 0 the routing equals `sigmoid_topk` (or greedy
    `softmax_topk`) bitwise. The bias moves outside the gradient: `update_selection_bias`.

    Args:
      logits: [T, E] float32 router logits u_t^T e_i.
      bias: [E] float32 selection bias b_i.
      k: experts per token.
      score: "sigmoid" (V3) or "softmax".
      renormalize: divide the k selected gates by their sum (V3: yes).

    Returns:
      Routing with indices/weights/mask [T, k], probs/logits [T, E].
    """
    logits = logits.astype(jnp.float32)
    if score == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        probs = scores / _positive(jnp.sum(scores, axis=-1, keepdims=True))
    elif score == "softmax":
        scores = probs = jax.nn.softmax(logits, axis=-1)
    else:
        raise ValueError(f"biased_topk: score={score!r} is not 'sigmoid' or 'softmax'")
    _, indices = jax.lax.top_k(scores + jax.lax.stop_gradient(bias.astype(jnp.float32)), k)
    gates = jnp.take_along_axis(scores, indices, axis=-1)
    if renormalize:  # each score function's own guard against a zero sum, as in its un-biased routing
        total = jnp.sum(gates, axis=-1, keepdims=True)
        gates = gates / (_positive(total) if score == "sigmoid" else total + 1e-20)
    mask = jnp.ones(indices.shape, dtype=bool)
    return Routing(indices=indices.astype(jnp.int32), weights=gates, mask=mask, probs=probs, logits=logits)


def selection_load(expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """The load c_i of every expert: how many active (token, choice) pairs selected it.

    Args:
      expert_ids: [..., T, k] int expert ids (-1: an inactive choice, not counted).
      num_experts: E.

    Returns:
      [..., E] int32 counts (exact: integer sums, the same on any mesh and in any order).
    """
    ids = jnp.where(expert_ids < 0, num_experts, expert_ids).astype(jnp.int32)
    ids = ids.reshape(-1, ids.shape[-2] * ids.shape[-1])
    counts = jax.vmap(lambda row: jnp.bincount(row, length=num_experts + 1)[:num_experts])(ids)
    return counts.astype(jnp.int32).reshape(*expert_ids.shape[:-2], num_experts)


def update_selection_bias(bias: jax.Array, load: jax.Array, speed: float) -> jax.Array:
    """DeepSeek-V3's bias update after a step (arXiv:2412.19437 §2.1.2): an overloaded expert's bias drops
    by gamma, an underloaded one's rises by gamma, one exactly at the mean load keeps it.

        b_i <- b_i + gamma * sign(mean_j c_j - c_i)

    The sign is computed in integers, with no rounding: mean_j c_j = q + r/E (q, r = divmod(sum_j c_j, E)),
    so c_i > q is above the mean, c_i < q or (c_i = q and r > 0) below it, and c_i = q with r = 0 equal.

    Args:
      bias: [..., E] float32 b_i.
      load: [..., E] int counts c_i (`selection_load`).
      speed: gamma (V3: 0.001).

    Returns:
      [..., E] float32, the updated bias.
    """
    load = load.astype(jnp.int32)
    total = jnp.sum(load, axis=-1, keepdims=True)
    q, r = total // load.shape[-1], total % load.shape[-1]
    sign = jnp.where(load > q, -1.0, jnp.where((load < q) | ((load == q) & (r > 0)), 1.0, 0.0))
    return bias.astype(jnp.float32) + jnp.float32(speed) * sign.astype(jnp.float32)


def hash_route(token_ids: jax.Array, table: jax.Array) -> Routing:
    """Hash routing (Roller et al. 2021): token id -> fixed expert, gate 1, no scores.

    Args:
      token_ids: [T] int token ids of the *input* tokens (the ids reach every layer explicitly).
      table: [vocab] int32 expert id per token id.

    Returns:
      Routing with k = 1, weight 1, probs/logits None (so no balance loss applies).
    """
    indices = jnp.take(table, token_ids.astype(jnp.int32), axis=0)[:, None].astype(jnp.int32)
    return Routing(indices=indices, weights=jnp.ones(indices.shape, jnp.float32), mask=jnp.ones(indices.shape, bool))


def random_hash_table(vocab_size: int, num_experts: int, seed: int) -> np.ndarray:
    """A uniform random token -> expert map [vocab] (int32), deterministic in `seed`."""
    return np.random.default_rng(seed).integers(0, num_experts, size=vocab_size, dtype=np.int32)


def balanced_hash_table(frequencies: np.ndarray, num_experts: int, seed: int) -> np.ndarray:
    """A frequency-balanced token -> expert map [vocab] (int32).

    Greedy longest-processing-time bin packing: tokens in decreasing frequency each go to the expert
    with the least total frequency so far; ties between equal frequencies are broken by a seeded
    shuffle so the table is deterministic in `seed` but not ordered by token id. Every expert's load
    is at most mean + max single-token frequency.
    """
    frequencies = np.asarray(frequencies, dtype=np.float64)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(frequencies.shape[0])
    order = shuffled[np.argsort(-frequencies[shuffled], kind="stable")]
    loads = np.zeros(num_experts, dtype=np.float64)
    table = np.zeros(frequencies.shape[0], dtype=np.int32)
    for token in order:
        expert = int(np.argmin(loads))
        table[token] = expert
        loads[expert] += frequencies[token]
    return table

"""The dropless dispatch of expert-choice routing computes only its E*C*G active rows (issue 20):
`Routing.max_active` against the T*E-row path (max_active=None) and the per-expert reference loop,
outputs, counts and gradients for both selection scopes; token-choice routings carry no bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_close, max_rel_err

from moe_jax.moe import gating as R
from moe_jax.moe.dispatch.base import ExpertParams
from moe_jax.moe.dispatch.dropless import dropless_dispatch
from moe_jax.moe.dispatch.reference import reference_dispatch

D, F = 16, 8
PATHS = {
    "bounded": dropless_dispatch,
    "full": lambda x, r, ex: dropless_dispatch(x, r.replace(max_active=None), ex),  # the k = E form
    "reference": reference_dispatch,
}

# 8 tokens, 4 experts, k = 1: C = 2 per expert. Tokens 1-4 each score 0.95 for one expert; the
# uniform tokens (0, 5, 6, 7) tie at 1/4 everywhere and ties go to the earlier token, so every expert
# takes its peaked token and token 0: token 0 gets all 4 experts, tokens 5-7 none.
PEAKED = np.zeros((8, 4), np.float32)
PEAKED[np.arange(1, 5), np.arange(4)] = 4.0
# The second sequence of the per-sequence case: the same rows reordered (token 9 gets all experts).
SECOND = PEAKED[[1, 0, 2, 3, 5, 4, 6, 7]]


def _experts(seed, e):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return ExpertParams(wi=0.3 * jax.random.normal(k1, (e, D, 2, F)), wo=0.3 * jax.random.normal(k2, (e, F, D)))


def _outputs(path, x, logits, experts, k, groups):
    """(loss, DispatchOutput) and the gradients w.r.t. x, the logits and the expert weights."""

    def loss(x, logits, experts):
        out = PATHS[path](x, R.expert_choice(logits, k, num_groups=groups), experts)
        return jnp.sum(jnp.sin(out.y)), out  # non-linear, so every gradient entry matters

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, logits, experts)


def _assert_paths_agree(x, logits, experts, k, groups):
    (_, out), grads = _outputs("bounded", x, logits, experts, k, groups)
    for other in ("full", "reference"):
        (_, want), want_grads = _outputs(other, x, logits, experts, k, groups)
        assert max_rel_err(out.y, want.y) <= 1e-5, other
        np.testing.assert_array_equal(out.tokens_per_expert, want.tokens_per_expert)
        np.testing.assert_array_equal(out.dropped, want.dropped)
        assert_tree_close(grads, want_grads, 1e-5)
    return out


def test_expert_choice_bounds_its_active_assignments():
    logits = jax.random.normal(jax.random.key(0), (24, 8))
    for groups in (1, 2, 3):
        r = R.expert_choice(logits, 2, num_groups=groups)
        cap = R.expert_choice_capacity(24 // groups, 2, 8, 1.0)
        assert r.max_active == 8 * cap * groups == int(r.mask.sum())
    # Pytree metadata, not a leaf: it survives jit and tree maps, and the leaves are the five arrays.
    assert len(jax.tree.leaves(r)) == 5
    assert jax.jit(lambda r: r)(r).max_active == r.max_active
    assert jax.tree.map(lambda a: a, r).max_active == r.max_active


@pytest.mark.parametrize("groups", [1, 2], ids=["batch", "sequence"])
def test_token_chosen_by_all_and_by_none(groups):
    logits = jnp.asarray(np.concatenate([PEAKED, SECOND][:groups]))
    x = jax.random.normal(jax.random.key(1), (8 * groups, D))
    r = R.expert_choice(logits, 1, num_groups=groups)
    per_token = np.asarray(r.mask.sum(-1))
    assert per_token[0] == 4 and per_token[5:8].sum() == 0
    if groups == 2:
        assert per_token[9] == 4 and per_token[[12, 14, 15]].sum() == 0
    out = _assert_paths_agree(x, logits, _experts(2, 4), 1, groups)
    assert np.all(np.asarray(out.y)[5:8] == 0.0)  # an unrouted token's routed output is exactly 0


@pytest.mark.parametrize("groups", [1, 4], ids=["batch", "sequence"])
def test_bounded_path_matches_the_full_path_and_the_loop(groups):
    # Through the router kernel: the gradient reaches it through the chosen scores.
    keys = jax.random.split(jax.random.key(groups), 3)
    x, kernel, experts = jax.random.normal(keys[0], (32, D)), jax.random.normal(keys[1], (D, 15)), _experts(3, 15)
    results = {}
    for path in PATHS:

        def loss(x, kernel, experts, path=path):
            out = PATHS[path](x, R.expert_choice(R.router_logits(x, kernel), 3, num_groups=groups), experts)
            return jnp.sum(jnp.sin(out.y)), out.y

        results[path] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, kernel, experts)
    (_, y), grads = results["bounded"]
    for other in ("full", "reference"):
        (_, want), want_grads = results[other]
        assert max_rel_err(y, want) <= 1e-5, other
        assert_tree_close(grads, want_grads, 1e-5)
    assert float(jnp.abs(grads[1]).max()) > 0.0


def test_a_loose_bound_computes_the_same():
    # A bound above the active count takes inactive rows too: outside every expert's group, they add 0.
    logits = jax.random.normal(jax.random.key(4), (16, 4))
    x, experts = jax.random.normal(jax.random.key(5), (16, D)), _experts(6, 4)
    r = R.expert_choice(logits, 1)
    loose = dropless_dispatch(x, r.replace(max_active=r.max_active + 5), experts).y
    assert max_rel_err(loose, dropless_dispatch(x, r, experts).y) <= 1e-6


def test_token_choice_routings_carry_no_bound():
    logits = jax.random.normal(jax.random.key(7), (12, 8))
    routings = [
        R.softmax_topk(logits, 2),
        R.sigmoid_topk(logits, 2),
        R.group_limited_topk(logits, 2, num_groups=4, topk_groups=2),
        R.biased_topk(logits, jnp.zeros(8), 2),
        R.hash_route(jnp.arange(12), jnp.arange(12, dtype=jnp.int32) % 8),
    ]
    assert all(r.max_active is None for r in routings)  # so the dropless dispatch runs its T*k-row path

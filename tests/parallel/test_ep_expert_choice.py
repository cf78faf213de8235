"""Issue 20: expert-choice routing (arXiv:2202.09368) on 8 CPU devices gives the loss, logits and every
parameter gradient of one device (float32, 1e-5 relative), for both selection scopes.

The router runs under GSPMD on the global arrays (moe_jax.moe.dispatch.expert_parallel), so "batch"
selects over the global (micro-)batch whatever the mesh; "sequence" selects within each sequence, which
never crosses a device. Either way the result must not depend on the mesh."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from ep_testlib import mesh, model_config, run, tokens
from helpers import max_rel_err

TOL = 1e-5


def _cfg(scope: str):
    cfg = model_config("switch", router="expert_choice", top_k=2, expert_choice_scope=scope)
    return cfg.replace(moe=dataclasses.replace(cfg.moe, num_shared_experts=1))


@functools.lru_cache(maxsize=None)
def single_device(scope: str):
    return run(_cfg(scope), tokens())


@pytest.mark.slow
@pytest.mark.parametrize(
    "scope, spec",
    [("sequence", "data:2,expert:4"), ("sequence", "fsdp:2,expert:2,tensor:2"), ("batch", "data:2,expert:4")],
)
def test_expert_choice_matches_single_device(scope, spec):
    loss0, out0, grads0 = single_device(scope)
    loss, out, grads = run(_cfg(scope), tokens(), mesh(spec))
    errors = {
        "loss": max_rel_err(loss, loss0),
        "logits": max_rel_err(out.logits, out0.logits),
        "tokens_per_expert": max_rel_err(out.stats.tokens_per_expert, out0.stats.tokens_per_expert),
        "unrouted_fraction": abs(float(out.stats.unrouted_fraction.sum() - out0.stats.unrouted_fraction.sum())),
    }
    flat0 = dict(jax.tree_util.tree_flatten_with_path(grads0)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        errors["grad" + jax.tree_util.keystr(path)] = max_rel_err(g, flat0[path])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, {k: v for k, v in errors.items() if v > TOL}
    np.testing.assert_array_equal(out.expert_ids, out0.expert_ids)  # the same tokens chose the same experts
    assert np.isfinite(float(loss))

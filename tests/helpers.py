"""Shared test utilities (imported as `helpers`; pytest puts tests/ on sys.path via rootdir conftest)."""

import jax
import numpy as np

# The tiny token cache of the `train_cache` fixture (tests/conftest.py).
TRAIN_VOCAB = 320
TRAIN_SEQ = 64


def max_rel_err(a, b) -> float:
    """max |a - b| / max |b| (a scale-aware relative error that tolerates entries near zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def assert_tree_close(actual, expected, tol: float = 1e-5):
    """Every leaf of `actual` equals the matching leaf of `expected` within `tol` relative error."""
    flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_e = jax.tree.leaves(expected)
    assert len(flat_a) == len(flat_e)
    for (path, a), e in zip(flat_a, flat_e):
        assert np.shape(a) == np.shape(e), (jax.tree_util.keystr(path), np.shape(a), np.shape(e))
        err = max_rel_err(a, e)
        assert err <= tol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e} > {tol:.0e}"

"""Fixtures of the export tests: a DeepSeekMoE proxy workdir with a dense first layer and its export."""

from __future__ import annotations

from pathlib import Path

import pytest
from export_fixtures import DEEPSEEK, make_workdir


@pytest.fixture(scope="module")
def ds_workdir(tmp_path_factory, train_cache) -> Path:
    return make_workdir(tmp_path_factory.mktemp("ds") / "wd", DEEPSEEK, data_cache=train_cache)


@pytest.fixture(scope="module")
def ds_export(ds_workdir, tmp_path_factory):
    """float32 export of ds_workdir in ~20 KB shards (so there are many)."""
    from moe_jax.export.hf import export_hf

    out = tmp_path_factory.mktemp("ds_hf") / "hf"
    return export_hf(ds_workdir, out, shard_size=20_000, progress=False)

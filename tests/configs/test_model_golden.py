"""Every gin model resolves to the same `ModelConfig` and parameter counts as the golden file
`model_golden.json`, generated from the code before the models were rewritten in the paper's
(N, K, m, K_s, F) parametrisation (arXiv:2401.06066 §3.1-§3.2): the rewrite changes no model.

Regenerate (only when a model is meant to change) with
    python tests/configs/test_model_golden.py --write
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from closed_form import closed_form_counts

from moe_jax.config import ModelConfig
from moe_jax.configs import gin_utils

GOLDEN = Path(__file__).with_name("model_golden.json")


def model_record(name: str) -> dict:
    """The resolved config of gin model `name` and its parameter counts."""
    cfg = gin_utils.model_config_from_gin([gin_utils.model_gin_path(name)])
    return {"config": dataclasses.asdict(cfg), "counts": closed_form_counts(cfg)}


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_golden_lists_every_model(golden):
    assert sorted(golden) == gin_utils.list_models()


def _subset(record: dict, like: dict) -> dict:
    """`record` restricted to the keys of `like` (a field added to the configs later, with a default
    that leaves the old models unchanged, does not invalidate the golden)."""
    return {k: _subset(record[k], v) if isinstance(v, dict) else record.get(k) for k, v in like.items()}


@pytest.mark.parametrize("name", gin_utils.list_models())
def test_model_matches_golden(name, golden):
    assert _subset(model_record(name), golden[name]) == golden[name]


def _write() -> None:
    """Write the golden file; each closed-form count is checked against the counted abstract model."""
    from moe_jax.model.params import count_params

    records = {}
    for name in gin_utils.list_models():
        rec = records[name] = model_record(name)
        counted = count_params(_config(rec), 1)
        got = {k: getattr(counted, k) for k in rec["counts"]}
        if got != rec["counts"]:
            raise AssertionError(f"{name}: closed form {rec['counts']} != counted {got}")
        print(name, rec["counts"])
    GOLDEN.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")


def _config(rec: dict) -> ModelConfig:
    from moe_jax.config import MoEConfig

    fields = dict(rec["config"])
    fields["moe"] = None if fields["moe"] is None else MoEConfig(**fields["moe"])
    return ModelConfig(**fields)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    _write()

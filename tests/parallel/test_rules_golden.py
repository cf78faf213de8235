"""Issue 4, item 3: golden logical -> mesh sharding of every parameter, so rule drift shows up as a diff.

How the goldens are produced (see docs/parallelism.md, "Golden sharding files"):
- deepseekmoe_2b: gin/models/deepseekmoe_2b.gin (1 shared + 63 routed experts of width 853). 63 is
  odd and so is 853, so neither the expert axis nor the tensor axis can split the 2B experts; the
  paper ran 2B on one GPU and used expert parallelism only at 145B. The golden mesh is therefore
  data=2 x fsdp=4 x expert=1 x tensor=1 (8 devices): d_model 1280 splits 4 ways over fsdp.
- deepseekmoe_16b: gin/models/deepseekmoe_16b.gin (64 routed experts) on expert=4 x tensor=2
  (8 devices), pinning how routed experts split over the expert axis at a real size.
Each entry records the logical axes, the rule's mesh axes per dimension (`spec`) and the per-device
block (`shard_shape`). Regenerate after an intended rule change with
    MOE_JAX_UPDATE_GOLDEN=1 pytest tests/parallel/test_rules_golden.py
and review the diff.
"""

import json
import os
from pathlib import Path

import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from moe_jax.model.transformer import Transformer
from moe_jax.parallel import LOGICAL_RULES, MESH_AXES, abstract_state, sharding_table, validate

GOLDEN_DIR = Path(__file__).parent / "golden"

CASES = {
    "deepseekmoe_2b": {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1},
    "deepseekmoe_16b": {"data": 1, "fsdp": 1, "expert": 4, "tensor": 2},
}


def _config(name):
    from moe_jax.configs.gin_utils import model_config_from_gin

    return model_config_from_gin([f"models/{name}.gin"])


def golden_document(name: str) -> dict:
    cfg = _config(name)
    sizes = CASES[name]
    mesh = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)
    state = abstract_state(lambda: Transformer(cfg, nnx.Rngs(0)))
    validate(cfg, mesh, global_batch=64, state=state, num_devices=8)
    moe = cfg.moe
    return {
        "model": {
            "gin": f"gin/models/{name}.gin",
            "num_layers": cfg.num_layers,
            "d_model": cfg.d_model,
            "num_heads": cfg.num_heads,
            "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size,
            "num_experts": moe.num_experts,
            "num_shared_experts": moe.num_shared_experts,
            "expert_dim": moe.expert_dim,
            "top_k": moe.top_k,
            "first_k_dense": cfg.first_k_dense,
        },
        "mesh": sizes,
        "rules": {k: v if v is None or isinstance(v, str) else list(v) for k, v in LOGICAL_RULES.items()},
        "params": sharding_table(state, mesh),
    }


def dump(document: dict) -> str:
    """JSON with one line per parameter (and per rule), so a drift is a one-line diff."""

    def block(items: dict) -> str:
        lines = [f"    {json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(items.items())]
        return "{\n" + ",\n".join(lines) + "\n  }"

    parts = [
        f"  {json.dumps(key)}: "
        + (block(document[key]) if key in ("params", "rules") else json.dumps(document[key], sort_keys=True))
        for key in sorted(document)
    ]
    return "{\n" + ",\n".join(parts) + "\n}\n"


@pytest.mark.parametrize("name", list(CASES))
def test_sharding_matches_golden(name):
    document = golden_document(name)
    path = GOLDEN_DIR / f"{name}_sharding.json"
    text = dump(document)
    assert json.loads(text) == document
    if os.environ.get("MOE_JAX_UPDATE_GOLDEN"):
        path.write_text(text)
    golden = json.loads(path.read_text())
    assert golden["rules"] == document["rules"], "the logical -> mesh rules changed"
    assert sorted(golden["params"]) == sorted(document["params"]), "the set of parameters changed"
    for param, entry in document["params"].items():
        assert entry == golden["params"][param], f"{param}: sharding drifted from the golden file"
    assert golden == document


def test_2b_routed_experts_are_whole_on_every_device_and_16b_split_four_ways():
    two_b = json.loads((GOLDEN_DIR / "deepseekmoe_2b_sharding.json").read_text())["params"]
    wi = two_b["stacks/0/blocks/ffn/wi"]
    assert wi["shape"] == [9, 63, 1280, 2, 853] and wi["shard_shape"] == [9, 63, 320, 2, 853]
    sixteen = json.loads((GOLDEN_DIR / "deepseekmoe_16b_sharding.json").read_text())["params"]
    wi = sixteen["stacks/1/blocks/ffn/wi"]
    assert wi["spec"] == [None, ["expert"], ["fsdp"], None, ["tensor"]]
    assert wi["shard_shape"] == [27, 16, 2048, 2, 704]

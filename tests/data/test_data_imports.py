"""The training loader must not pull TensorFlow or seqio onto the import path (checked in a fresh process)."""

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import moe_jax.data
from moe_jax.data.loader import TokenLoader
import moe_jax.data.cli, moe_jax.data.paths, moe_jax.data.packing
loader = TokenLoader(sys.argv[1], split="train", batch_size=2, seed=0)
batch = next(loader)
loader.set_state(loader.get_state())
HEAVY = ("tensorflow", "seqio", "tensorflow_text", "tensorflow_datasets")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print(json.dumps({"heavy": heavy, "shape": list(batch["decoder_target_tokens"].shape)}))
"""


@pytest.mark.subprocess
def test_loader_does_not_import_tensorflow_or_seqio(tiny_data):
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_data["cache"])], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert out["shape"] == [2, 64]

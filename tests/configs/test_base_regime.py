"""The CPU regime "base" (gin/sizes/base.gin, gin/runs/proxy_base.gin): every proxy member parses, keeps
its embedding + LM head at most 25% of its activated parameters, and trains 10M tokens."""

from pathlib import Path

import pytest

from moe_jax.config import ModelConfig
from moe_jax.configs.gin_utils import parse_gin
from moe_jax.model.params import count_params

PROXY = Path(__file__).resolve().parents[2] / "gin" / "models" / "proxy"
BASE_MODELS = sorted(p.stem for p in PROXY.glob("*_base.gin"))


def test_every_tiny_proxy_has_a_base_twin():
    tiny = {p.stem[: -len("_tiny")] for p in PROXY.glob("*_tiny.gin")}
    assert tiny <= {m[: -len("_base")] for m in BASE_MODELS}


@pytest.mark.parametrize("model", BASE_MODELS)
def test_embedding_share_at_most_a_quarter(model):
    parse_gin([f"models/proxy/{model}.gin", "runs/proxy_base.gin"], modules=("moe_jax.train.config",))
    cfg = ModelConfig()
    counts = count_params(cfg, 256)
    assert cfg.vocab_size == 1024 and cfg.num_layers == 4 and cfg.init_std == pytest.approx(0.019)
    assert 2 * cfg.vocab_size * cfg.d_model / counts.activated <= 0.25


def test_run_trains_ten_million_tokens():
    parse_gin(["models/proxy/dense_base.gin", "runs/proxy_base.gin"], modules=("moe_jax.train.config",))
    from moe_jax.train.config import TrainConfig

    cfg = TrainConfig()
    assert cfg.steps * cfg.batch_size * cfg.seq_len >= 10_000_000
    assert cfg.learning_rate == 2e-3 and cfg.warmup_steps == round(0.08 * cfg.steps)

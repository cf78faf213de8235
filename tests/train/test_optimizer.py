"""The paper's schedules (linear warmup, x0.316 at 80% and 90%, or constant) and the decay mask."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.model.transformer import Transformer
from moe_jax.train.config import TrainConfig
from moe_jax.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask


def test_step_decay_schedule_golden():
    cfg = TrainConfig(steps=1000, warmup_steps=100, learning_rate=1.0, schedule="step_decay")
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(50)) == pytest.approx(0.5)
    assert float(lr(100)) == pytest.approx(1.0)
    assert float(lr(799)) == pytest.approx(1.0)
    assert float(lr(800)) == pytest.approx(0.316)
    assert float(lr(899)) == pytest.approx(0.316)
    assert float(lr(900)) == pytest.approx(0.316**2)
    assert float(lr(999)) == pytest.approx(0.316**2)


def test_paper_2b_schedule_boundaries():
    lr = learning_rate_schedule(TrainConfig(steps=25000, warmup_steps=2000, learning_rate=1.08e-3))
    assert float(lr(2000)) == pytest.approx(1.08e-3)
    assert float(lr(19999)) == pytest.approx(1.08e-3)
    assert float(lr(20000)) == pytest.approx(1.08e-3 * 0.316)
    assert float(lr(22500)) == pytest.approx(1.08e-3 * 0.316**2)


def test_constant_schedule_of_the_145b_run():
    lr = learning_rate_schedule(TrainConfig(steps=13000, warmup_steps=2000, learning_rate=3e-4, schedule="constant"))
    assert float(lr(1000)) == pytest.approx(1.5e-4)
    assert float(lr(12999)) == pytest.approx(3e-4)


@pytest.mark.slow
def test_weight_decay_skips_norms_only():
    cfg = ModelConfig(
        vocab_size=32,
        d_model=16,
        num_layers=2,
        num_heads=2,
        head_dim=8,
        ffn_dim=16,
        moe=MoEConfig(num_experts=4, expert_dim=8),
    )
    params = nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
    mask = weight_decay_mask(params)
    flat = {"/".join(map(str, k)): bool(v.get_value()) for k, v in nnx.to_flat_state(mask)}
    assert not flat["final_norm/scale"] and not flat["stacks/0/blocks/attn_norm/scale"]
    assert flat["embed"] and flat["lm_head"] and flat["stacks/0/blocks/ffn/wi"]
    assert flat["stacks/0/blocks/ffn/router/kernel"]
    # An AdamW step with zero gradients changes decayed weights and leaves norm scales alone.
    tx = make_optimizer(TrainConfig(steps=10, warmup_steps=0, learning_rate=0.1, weight_decay=0.5))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    up = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(updates)}
    assert float(jnp.abs(up["final_norm/scale"]).max()) == 0.0
    assert float(jnp.abs(up["lm_head"]).max()) > 0.0


def test_bad_train_configs_fail_early():
    with pytest.raises(ValueError, match="schedule='cosine'"):
        TrainConfig(schedule="cosine")
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        TrainConfig(batch_size=16, grad_accum_steps=3)
    with pytest.raises(ValueError, match="warmup_steps=30"):
        TrainConfig(steps=20, warmup_steps=30)

"""End-to-end training on a tiny cache: the loss falls, every metric is written, accumulation agrees."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import TRAIN_VOCAB, assert_tree_close, tiny_model, tiny_train

from moe_jax.model.transformer import Transformer
from moe_jax.parallel import MeshConfig
from moe_jax.train.loop import NonFiniteLossError, train
from moe_jax.train.metrics import read_metrics
from moe_jax.train.step import TrainState, make_train_step


@pytest.mark.slow
def test_training_lowers_the_loss_and_writes_every_metric(train_cache, tmp_path):
    result = train(tmp_path, tiny_model(), tiny_train(train_cache), MeshConfig(data=-1), progress=False)
    records = read_metrics(tmp_path)
    steps = [r for r in records if "ce" in r]
    assert [r["step"] for r in steps] == [5, 10, 15, 20, 25, 30]
    assert steps[-1]["ce"] < steps[0]["ce"] - 0.3, (steps[0]["ce"], steps[-1]["ce"])
    for key in (
        "loss",
        "ce",
        "expert_balance",
        "device_balance",
        "z_loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "mfu",
        "moe/layer0/max_load",
        "moe/layer1/max_load",
        "moe/layer0/dropped_fraction",
        "moe/layer1/router_entropy",
        "moe/mean_router_entropy_norm",
        "moe/layer0/topk_mass",
        "moe/layer1/load_cv",
        "moe/mean_dead_experts",
        "moe/layer0/routed_norm",
        "moe/layer0/shared_norm",
    ):
        assert key in steps[-1], key
    assert 0.0 < steps[-1]["moe/mean_router_entropy_norm"] <= 1.0 and steps[-1]["moe/layer0/shared_norm"] > 0.0
    heldout = [r for r in records if "heldout/loss" in r]
    assert [r["step"] for r in heldout] == [15, 30]
    # The share of top-k choices of a fixed held-out batch that changed since the previous evaluation
    # (the first compares with the routing at initialisation).
    assert 0.0 <= heldout[0]["moe/mean_topk_changed"] <= 1.0 and "moe/layer1/topk_changed" in heldout[0]
    assert (tmp_path / "routing_probe.npy").exists()
    assert result.heldout_loss == pytest.approx(heldout[-1]["heldout/loss"])
    assert np.isfinite(heldout[-1]["heldout/bits_per_byte"])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["15", "30"]
    written = json.loads((tmp_path / "result.json").read_text())
    meta = json.loads((train_cache / "meta.json").read_text())
    assert written["heldout_bits_per_byte"] == pytest.approx(heldout[-1]["heldout/bits_per_byte"])
    assert written["step"] == 30 and written["data"] == {
        "cache": meta["name"],
        "vocab_sha256": meta["vocab_sha256"],
        "corpus_fingerprint": meta["corpus_fingerprint"],
    }


@pytest.mark.slow
def test_tensorboard_events_hold_the_metrics(train_cache, tmp_path):
    train(tmp_path, tiny_model(), tiny_train(train_cache, steps=5, eval_every=0), MeshConfig(data=-1), progress=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "ce",
        "loss",
        "expert_balance",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "mfu",
        "moe/layer0/max_load",
        "heldout/loss",
    } <= tags


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(train_cache, tmp_path):
    cfg = tiny_train(train_cache, steps=40, checkpoint_every=5, eval_every=0)
    train(tmp_path, tiny_model(), cfg.__class__(**{**cfg.__dict__, "steps": 5}), MeshConfig(data=-1), progress=False)
    huge = cfg.__class__(**{**cfg.__dict__, "learning_rate": 1e12, "warmup_steps": 0})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step \d+.*last good checkpoint .*checkpoints/5"):
        train(tmp_path, tiny_model(), huge, MeshConfig(data=-1), progress=False)
    # The checkpoint is intact: a sane run resumes from it.
    ok = train(
        tmp_path, tiny_model(), cfg.__class__(**{**cfg.__dict__, "steps": 8}), MeshConfig(data=-1), progress=False
    )
    assert ok.step == 8 and np.isfinite(ok.train_loss)


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch():
    cfg = tiny_model(expert_balance_alpha=0.0)
    graphdef, params, rest = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param, ...)
    # Plain SGD, so the parameter change is the gradient itself (Adam's first step is ~sign(g) and
    # would amplify round-off in near-zero gradient entries).
    tx, sched = optax.sgd(1.0), optax.constant_schedule(1.0)
    toks = jax.random.randint(jax.random.key(0), (8, 16), 0, TRAIN_VOCAB)
    batch = {
        "decoder_input_tokens": toks,
        "decoder_target_tokens": jnp.roll(toks, -1, 1),
        "decoder_loss_weights": jnp.ones_like(toks),
        "decoder_segment_ids": jnp.ones_like(toks),
        "decoder_positions": jnp.broadcast_to(jnp.arange(16), (8, 16)),
    }
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    s1, m1 = jax.jit(make_train_step(graphdef, rest, tx, sched, 1))(state, batch, jax.random.key(1))
    s2, m2 = jax.jit(make_train_step(graphdef, rest, tx, sched, 4))(state, batch, jax.random.key(1))
    assert float(m1["ce"]) == pytest.approx(float(m2["ce"]), rel=1e-5)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-4)
    assert_tree_close(s2.params, s1.params, 1e-5)


def test_data_seed_sets_the_batch_order_apart_from_the_initialisation(train_cache):
    """`TrainConfig.data_seed` (None: `seed`) alone decides the order of the training batches: seed 1 with
    data_seed 0 reads seed 0's batches; the parameter initialisation still follows `seed`."""
    from moe_jax.sweep.reuse import resolved
    from moe_jax.train.loop import _Data

    model = tiny_model()

    def first_batches(**kw):
        loader = _Data.open(model, tiny_train(train_cache, **kw)).loader
        return [np.asarray(next(loader)["decoder_target_tokens"]) for _ in range(3)]

    same_order = first_batches(seed=1, data_seed=0)
    for a, b in zip(same_order, first_batches(seed=0)):
        np.testing.assert_array_equal(a, b)
    assert any((a != b).any() for a, b in zip(same_order, first_batches(seed=1)))
    assert tiny_train(train_cache, seed=1, data_seed=0).data_order_seed == 0
    # A run whose data_seed is unset is the same training as one that sets it to its seed (--reuse).
    from moe_jax.configs.gin_utils import model_gin_path

    base = (str(model_gin_path("gshard_tiny")), "runs/proxy_cpu.gin")
    assert resolved(base, ("TrainConfig.seed=1",)) == resolved(base, ("TrainConfig.seed=1", "TrainConfig.data_seed=1"))
    assert resolved(base, ("TrainConfig.seed=1",)) != resolved(base, ("TrainConfig.seed=1", "TrainConfig.data_seed=0"))

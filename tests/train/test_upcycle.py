"""Sparse upcycling: a tiny dense model trained a few steps, upcycled into a fine-grained MoE whose initial
function equals the dense one (init="exact"), then trained on; the plain copy's slices; the errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TRAIN_SEQ, TRAIN_VOCAB, tiny_trunk_gin

from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.train.upcycle import UpcycleError, expert_slices, granularity, upcycle, upcycled_ffn

TRUNK = tiny_trunk_gin()
RUN = [
    f"SEQ_LEN={TRAIN_SEQ}",
    "BATCH_SIZE=8",
    "TRAIN_STEPS=4",
    "WARMUP_STEPS=1",
    "LEARNING_RATE=3e-3",
    "TrainConfig.log_every=2",
    "TrainConfig.eval_every=4",
    "TrainConfig.eval_batches=1",
    "TrainConfig.checkpoint_every=4",
    "TrainConfig.async_checkpointing=False",
    "TrainConfig.peak_flops_per_device=1e10",
]
# N=4 experts of width F=64 with top-2, m=2: K_s=2 shared experts of width 32 cover the FFN; 6 routed, top-2.
MOE_EXACT = TRUNK + RUN + ["BASE_EXPERTS=4", "BASE_TOP_K=2", "GRANULARITY=2", "NUM_SHARED=2"]
MODULES = ("moe_jax.train.config", "moe_jax.parallel.mesh")


def _cfg(ffn_dim=64, **kw) -> ModelConfig:
    moe = kw.pop("moe", None)
    base = dict(vocab_size=TRAIN_VOCAB, d_model=32, num_layers=2, num_heads=2, head_dim=16, ffn_dim=ffn_dim)
    return ModelConfig(**{**base, **kw}, moe=moe)


@pytest.fixture(scope="module")
def dense_workdir(train_cache, tmp_path_factory):
    import gin
    from moe_jax.config import ModelConfig
    from moe_jax.configs.gin_utils import parse_gin
    from moe_jax.parallel import MeshConfig
    from moe_jax.train.config import TrainConfig
    from moe_jax.train.loop import train

    wd = tmp_path_factory.mktemp("dense")
    bindings = TRUNK + RUN + [f"TrainConfig.data_cache='{train_cache}'"]
    parse_gin(["architectures/dense.gin", "runs/proxy_cpu.gin"], bindings, modules=MODULES)
    train(wd, ModelConfig(), TrainConfig(), MeshConfig(data=-1), progress=False, gin_config=gin.config_str())
    return wd


@pytest.mark.slow
def test_exact_upcycle_keeps_the_dense_function_and_trains_on(dense_workdir, train_cache, tmp_path):
    from moe_jax.train.cli import main as train_main
    from moe_jax.train.restore import load_trained

    wd = tmp_path / "moe"
    bindings = MOE_EXACT + [f"TrainConfig.data_cache='{train_cache}'"]
    result = upcycle(dense_workdir, wd, ["architectures/moe.gin", "runs/proxy_cpu.gin"], bindings, init="exact")
    assert (result.dense_step, result.granularity) == (4, 2)
    dense, moe = load_trained(dense_workdir), load_trained(wd)
    assert moe.step == 0 and moe.model_cfg.moe.num_experts == 6 and moe.model_cfg.moe.num_shared_experts == 2
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, TRAIN_VOCAB, (4, TRAIN_SEQ)))
    want = np.asarray(dense.model()(tokens).logits)
    got = np.asarray(moe.model()(tokens).logits)
    # The same function in float32; only the order of the sums differs (zero routed output added).
    print("exact upcycle: max |logit difference|", np.abs(got - want).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # `moe-jax train --workdir=DIR` continues from the upcycled step 0 with DIR/config.gin.
    assert train_main([f"--workdir={wd}", "--no_progress"]) == 0
    assert load_trained(wd).step == 4


@pytest.mark.slow
def test_plain_copy_with_renormalised_gates_keeps_the_dense_function(dense_workdir, train_cache, tmp_path):
    """GShard-style copies (m = 1, K_s = 0) with top-k gates renormalised to sum to 1, dropless."""
    from moe_jax.train.restore import load_trained

    wd = tmp_path / "gshard"
    bindings = TRUNK + RUN + ["BASE_EXPERTS=4", "BASE_TOP_K=2", "MoEConfig.renormalize_topk=True"]
    upcycle(
        dense_workdir,
        wd,
        ["architectures/moe.gin", "runs/proxy_cpu.gin"],
        bindings + [f"TrainConfig.data_cache='{train_cache}'"],
    )
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, TRAIN_VOCAB, (4, TRAIN_SEQ)))
    want = np.asarray(load_trained(dense_workdir).model()(tokens).logits)
    got = np.asarray(load_trained(wd).model()(tokens).logits)
    print("copy upcycle (renormalised gates): max |logit difference|", np.abs(got - want).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_copy_init_gives_each_expert_its_slice():
    rng = np.random.default_rng(0)
    wi, wo = rng.normal(size=(8, 2, 12)), rng.normal(size=(12, 8))
    moe_cfg = _cfg(ffn_dim=12, moe=MoEConfig(num_experts=5, num_shared_experts=1, expert_dim=4, top_k=2))
    fresh = {"router": {"kernel": np.ones((8, 5))}, "wi": None, "wo": None}
    out = upcycled_ffn({"wi": wi, "wo": wo}, fresh, moe_cfg, 3, "copy")
    assert out["router"] is fresh["router"]
    np.testing.assert_array_equal(out["shared"]["wi"], wi[..., 0:4])
    for i, j in enumerate([1, 2, 0, 1, 2]):  # routed expert i is segment expert 1 + i, slice (1 + i) mod 3
        np.testing.assert_array_equal(out["wi"][i], wi[..., 4 * j : 4 * j + 4])
        np.testing.assert_array_equal(out["wo"][i], wo[4 * j : 4 * j + 4])
    # The m slices of one copy sum to the dense SwiGLU exactly (separable over hidden units).
    from moe_jax.layers.mlp import swiglu

    x = rng.normal(size=(3, 8))
    swi, swo = expert_slices(wi, wo, 3, 0, 3)
    total = sum(swiglu(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b)) for a, b in zip(swi, swo))
    np.testing.assert_allclose(total, swiglu(jnp.asarray(x), jnp.asarray(wi), jnp.asarray(wo)), rtol=1e-5, atol=1e-5)


def test_exact_init_zeroes_the_routed_output():
    rng = np.random.default_rng(1)
    wi, wo = rng.normal(size=(8, 2, 12)), rng.normal(size=(12, 8))
    moe_cfg = _cfg(ffn_dim=12, moe=MoEConfig(num_experts=4, num_shared_experts=3, expert_dim=4, top_k=2))
    out = upcycled_ffn({"wi": wi, "wo": wo}, {}, moe_cfg, 3, "exact")
    np.testing.assert_array_equal(out["shared"]["wi"], wi)
    np.testing.assert_array_equal(out["shared"]["wo"], wo)
    assert not out["wo"].any() and out["wi"].any()


@pytest.mark.parametrize(
    "dense, moe, init, match",
    [
        (
            _cfg(),
            _cfg(moe=MoEConfig(expert_dim=24, top_k=2)),
            "copy",
            "f=24 times the granularity m must equal .* F=64",
        ),
        (_cfg(), _cfg(d_model=48, moe=MoEConfig(expert_dim=32)), "copy", "d_model: dense 32, MoE 48"),
        (_cfg(), _cfg(num_layers=3, moe=MoEConfig(expert_dim=32)), "copy", "num_layers"),
        (_cfg(), _cfg(vocab_size=512, moe=MoEConfig(expert_dim=32)), "copy", "vocab_size"),
        (_cfg(), _cfg(), "copy", "the target model is dense"),
        (_cfg(moe=MoEConfig(expert_dim=32)), _cfg(moe=MoEConfig(expert_dim=32)), "copy", "starts from a dense"),
        (_cfg(), _cfg(moe=MoEConfig(expert_dim=16, num_shared_experts=1)), "exact", "set NUM_SHARED=4"),
        (_cfg(), _cfg(ffn_dim=32, first_k_dense=1, moe=MoEConfig(expert_dim=32)), "copy", "set FFN_DIM=64"),
        (_cfg(), _cfg(moe=MoEConfig(expert_dim=32)), "best", "not one of"),
    ],
)
def test_mismatches_are_refused_with_the_fix(dense, moe, init, match):
    with pytest.raises(UpcycleError, match=match):
        granularity(dense, moe, init)


def test_granularity_of_matching_models():
    assert granularity(_cfg(), _cfg(moe=MoEConfig(expert_dim=16, num_shared_experts=4)), "exact") == 4
    assert granularity(_cfg(), _cfg(moe=MoEConfig(expert_dim=64)), "copy") == 1


def test_a_workdir_with_checkpoints_is_refused_before_anything_is_read(tmp_path):
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(UpcycleError, match="already has checkpoints .*nothing was written"):
        upcycle(tmp_path / "no_such_dense", tmp_path, ["architectures/moe.gin"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_cli_reports_errors(tmp_path, capsys):
    from moe_jax.cli import main

    (tmp_path / "checkpoints" / "0").mkdir(parents=True)
    assert main(["upcycle", "--from=nowhere", f"--workdir={tmp_path}", "--model=deepseekmoe_tiny"]) == 1
    assert "already has checkpoints" in capsys.readouterr().err
    assert main(["upcycle", "--from=nowhere", f"--workdir={tmp_path}"]) == 2

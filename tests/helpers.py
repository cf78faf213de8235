"""Shared test utilities (imported as `helpers`; pytest puts tests/ on sys.path via rootdir conftest)."""

import os
import sys

import jax
import numpy as np

# The tiny token cache of the `train_cache` fixture (tests/conftest.py).
TRAIN_VOCAB = 320
TRAIN_SEQ = 64


def cli_env(devices: int = 1, **env) -> dict[str, str]:
    """This process's environment for a `python -m moe_jax.cli` subprocess on `devices` fake CPU devices;
    `env` adds or overrides variables."""
    xla = f"--xla_force_host_platform_device_count={devices}"
    return {**os.environ, "XLA_FLAGS": xla, "JAX_PLATFORMS": "cpu", **env}


def tiny_train_cmd(workdir, *flags) -> list[str]:
    """`moe-jax train` (as `python -m moe_jax.cli`) of deepseekmoe_tiny with runs/proxy_cpu.gin into
    `workdir`, then `flags`; run it with cwd at the repository root (the gin paths are relative)."""
    return [
        sys.executable,
        "-m",
        "moe_jax.cli",
        "train",
        "--model=deepseekmoe_tiny",
        "--gin_file=runs/proxy_cpu.gin",
        f"--workdir={workdir}",
        *flags,
    ]


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


def one_layer_model(moe, ffn_dim: int = 32, **kw):
    """One layer (MoE `moe`) over d_model 16, vocab 64, 2 heads of 8: the model the layer tests share;
    `kw` sets further ModelConfig fields (e.g. init_std)."""
    from moe_jax.config import ModelConfig

    return ModelConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2, head_dim=8, ffn_dim=ffn_dim, moe=moe, **kw)


def tiny_model(shared: int = 1, **moe):
    """The 2-layer DeepSeekMoE-shaped model the training tests share (`shared` + 8 - `shared` routed
    experts of width 32, top-2)."""
    from moe_jax.config import ModelConfig, MoEConfig

    return ModelConfig(
        vocab_size=TRAIN_VOCAB,
        d_model=32,
        num_layers=2,
        num_heads=2,
        head_dim=16,
        ffn_dim=64,
        init_std=0.02,
        moe=MoEConfig.fine_grained(4, 1, 2, shared, 32, **moe),
    )


def tiny_trunk_gin(num_layers: int = 2, first_k_dense: int = 0) -> list[str]:
    """Gin bindings of the trunk the workdir tests share: d 32, 2 heads x 16, dense FFN 64, init std 0.05,
    the vocabulary of the `train_cache` fixture."""
    return [
        f"VOCAB_SIZE={TRAIN_VOCAB}",
        "D_MODEL=32",
        f"NUM_LAYERS={num_layers}",
        "NUM_HEADS=2",
        "HEAD_DIM=16",
        "FFN_DIM=64",
        f"FIRST_K_DENSE={first_k_dense}",
        "INIT_STD=0.05",
    ]


def write_config_gin(path, gin_files, bindings):
    """Parse `gin_files` and `bindings` as `moe-jax train` does, create the workdir `path` and write its
    config.gin; returns (ModelConfig(), TrainConfig()) as bound."""
    import gin
    from moe_jax.config import ModelConfig
    from moe_jax.configs.gin_utils import parse_gin
    from moe_jax.train.config import TrainConfig

    parse_gin(list(gin_files), list(bindings), modules=("moe_jax.train.config", "moe_jax.parallel.mesh"))
    model_cfg, train_cfg = ModelConfig(), TrainConfig()
    path.mkdir(parents=True)
    (path / "config.gin").write_text(gin.config_str())
    return model_cfg, train_cfg


def save_checkpoint(path, train_cfg, params, step: int, router_bias=None):
    """Checkpoint `params` (and a model's selection bias `router_bias`, if it has one) at `step` in the
    workdir `path` with a fresh optimizer state of `train_cfg`, as `moe-jax train` leaves it; returns `path`."""
    import jax.numpy as jnp

    from moe_jax.train.checkpoint import Checkpointer
    from moe_jax.train.optimizer import make_optimizer
    from moe_jax.train.step import TrainState

    opt_state = make_optimizer(train_cfg).init(params)
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state, router_bias=router_bias)
    ckpt = Checkpointer(path, async_save=False)
    ckpt.save(step, state, {})
    ckpt.close()
    return path


def tiny_train(cache, **kw):
    """The training setup the training tests share, on the `train_cache` fixture's cache; `kw` overrides."""
    from moe_jax.train.config import TrainConfig

    base = dict(
        steps=30,
        batch_size=8,
        seq_len=TRAIN_SEQ,
        learning_rate=3e-3,
        warmup_steps=5,
        log_every=5,
        eval_every=15,
        eval_batches=2,
        checkpoint_every=15,
        data_cache=str(cache),
        async_checkpointing=False,
        peak_flops_per_device=1e10,
    )
    base.update(kw)
    return TrainConfig(**base)

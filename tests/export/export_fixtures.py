"""Helpers of the export tests: tiny trained-looking workdirs (config.gin + an orbax checkpoint)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import TRAIN_SEQ, save_checkpoint, tiny_trunk_gin, write_config_gin

STEP = 7
# d 32, 3 layers (layer 0 dense), 2 heads x 16, vocab 320, 1 shared + 7 routed experts of width 16, top-3.
TINY = tiny_trunk_gin(num_layers=3, first_k_dense=1)
DEEPSEEK = TINY + ["NUM_EXPERTS=7", "NUM_SHARED=1", "TOP_K=3", "EXPERT_DIM=16"]
GSHARD = TINY + ["NUM_EXPERTS=4", "NUM_SHARED=0", "TOP_K=2", "EXPERT_DIM=32"]


def make_workdir(
    path: Path,
    bindings,
    arch: str = "architectures/moe.gin",
    seed: int = 0,
    data_cache: Path | None = None,
    mesh: str | None = None,
) -> Path:
    """A workdir as `moe-jax train` leaves it: config.gin + checkpoints/STEP with random parameters
    (norm scales randomised too, so a misplaced norm shows; a selection bias, if the model has one, random
    with std 0.1, enough to change which experts the sigmoid scores pick). With `mesh`
    ("data:2,fsdp:2,expert:2"), the state is sharded by the model's rules before saving, so orbax stores
    each array in chunks."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moe_jax.model.transformer import Transformer
    from moe_jax.moe.router import RouterBias

    extra = [f"TrainConfig.data_cache='{data_cache}'"] if data_cache else []
    model_cfg, train_cfg = write_config_gin(path, [arch, "runs/proxy_cpu.gin"], [*bindings, *extra])
    model = Transformer(model_cfg, nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed + 1)
    bias = None
    if model_cfg.moe is not None and model_cfg.moe.selection_bias:
        bias = jax.tree_util.tree_map(
            lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), nnx.state(model, RouterBias)
        )
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + 0.3 * jnp.asarray(rng.standard_normal(x.shape), x.dtype) if "scale" in jax.tree_util.keystr(p) else x
        ),
        params,
    )
    if mesh:
        from moe_jax.parallel import MeshConfig, build_mesh, state_shardings

        m = build_mesh(MeshConfig.from_string(mesh))
        params = jax.jit(lambda p: p, out_shardings=state_shardings(params, m))(params)
        if bias is not None:
            bias = jax.jit(lambda b: b, out_shardings=state_shardings(bias, m))(bias)
    return save_checkpoint(path, train_cfg, params, STEP, router_bias=bias)


def short_run_flags(train_cache: Path, steps: int, warmup_steps: int) -> list[str]:
    """The `--gin.` flags of a short `moe-jax train` (or `import`) run on the `train_cache` fixture's cache:
    `steps` steps of 8 sequences of TRAIN_SEQ, one evaluation batch."""
    return [
        f"--gin.SEQ_LEN={TRAIN_SEQ}",
        "--gin.BATCH_SIZE=8",
        f"--gin.TRAIN_STEPS={steps}",
        f"--gin.WARMUP_STEPS={warmup_steps}",
        f"--gin.TrainConfig.data_cache='{train_cache}'",
        "--gin.TrainConfig.eval_batches=1",
        "--gin.TrainConfig.peak_flops_per_device=1e10",
    ]


def cli_eval_heldout(workdir: Path, out: Path) -> int:
    """`moe-jax eval` of `workdir`: the held-out loss alone (one batch of 8), the report written to `out`;
    returns the exit code."""
    from moe_jax.cli import main

    return main(
        [
            "eval",
            f"--workdir={workdir}",
            "--tasks=none",
            "--heldout_batches=1",
            "--batch_size=8",
            "--no_progress",
            "--quiet",
            f"--out={out}",
        ]
    )

"""Load a trained model back from a workdir: what evaluation, analysis and export start from.

    trained = load_trained("workdirs/ds_tiny")          # latest checkpoint
    out = trained.model()(tokens)                         # an nnx Transformer with the trained weights

The workdir's `config.gin` (written by `moe-jax train`) says which model it is; gin `bindings` given
here are applied on top (e.g. to change the dispatch or top-k at inference). Arrays are restored onto
`mesh` (default: all local devices, data-parallel), so a checkpoint written on any mesh loads anywhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.train.checkpoint import Checkpointer, CheckpointError
from moe_jax.train.config import TrainConfig


@dataclasses.dataclass
class TrainedModel:
    """A restored model.

    Attributes:
      workdir: where it was trained.
      step: the checkpoint's step.
      model_cfg, train_cfg: the configurations (after `bindings`).
      graphdef, params, rest: the split nnx model (params restored; rest = non-trainable state: hash
        tables, and the restored router bias of a model with DeepSeek-V3's selection bias).
      data_state: the data-loader position saved with the checkpoint.
    """

    workdir: Path
    step: int
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    rest: nnx.State
    data_state: dict

    def model(self) -> nnx.Module:
        """The Transformer with the restored weights (a fresh module sharing the arrays)."""
        return nnx.merge(self.graphdef, self.params, self.rest)


def parse_workdir_config(workdir: str | Path, bindings: Sequence[str] = ()) -> tuple[ModelConfig, TrainConfig]:
    """The model and train configurations of a workdir's `config.gin` (+ `bindings`)."""
    from moe_jax.configs.gin_utils import parse_gin

    path = Path(workdir) / "config.gin"
    if not path.exists():
        raise CheckpointError(f"{path} not found: is {workdir} a `moe-jax train` workdir?")
    parse_gin([path], bindings, modules=("moe_jax.train.config", "moe_jax.parallel.mesh"))
    return ModelConfig(), TrainConfig()


def load_trained(workdir: str | Path, step: int | None = None, bindings: Sequence[str] = (), mesh=None) -> TrainedModel:
    """Restore the parameters of `step` (default: latest) of a `moe-jax train` workdir."""
    from moe_jax.parallel import MeshConfig, build_mesh
    from moe_jax.train.state import build_train_state

    workdir = Path(workdir)
    model_cfg, train_cfg = parse_workdir_config(workdir, bindings)
    ckpt = Checkpointer(workdir, keep=train_cfg.keep_checkpoints, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {ckpt.directory}: train first (`moe-jax train --workdir={workdir}`)")
    built = build_train_state(model_cfg, train_cfg, mesh or build_mesh(MeshConfig()))
    state, data_state = ckpt.restore(step, built.restore_target())
    ckpt.close()
    rest = built.rest()
    if state.router_bias is not None:  # the trained bias chooses the experts, as in training
        rest = nnx.merge_state(rest, state.router_bias)
    return TrainedModel(
        workdir=workdir,
        step=int(step),
        model_cfg=model_cfg,
        train_cfg=train_cfg,
        graphdef=built.graphdef,
        params=state.params,
        rest=rest,
        data_state=data_state,
    )

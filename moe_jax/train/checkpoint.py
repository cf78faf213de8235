"""Orbax checkpoints of the train state and the data-loader position.

Each step directory holds two items: `state` (TrainState: step, params, optimizer state; sharded
arrays, restorable onto any mesh) and `data` (the loader position, JSON). Orbax writes a step to a
temporary directory and renames it when complete, so an interrupted save never touches the previous
checkpoint; unfinished temporaries are ignored on restart.

Fault injection for tests: with MOE_JAX_KILL_DURING_SAVE=<step> the process SIGKILLs itself right after
the save of that step has started (files half written), to show the previous checkpoint survives.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored; the message names the directory and what to do."""


class Checkpointer:
    """A CheckpointManager keeping the last `keep` steps under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = True) -> bool:
        """Start saving `state` and `data_state` as `step` (asynchronously if configured)."""
        started = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                   data=ocp.args.JsonSave(data_state)), force=force)
        if os.environ.get("MOE_JAX_KILL_DURING_SAVE") == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        return started

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs).

        Raises CheckpointError naming the step directory if it is missing or unreadable.
        """
        path = self.directory / str(step)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises many types for a damaged directory
            others = [s for s in self.all_steps() if s != step]
            hint = (f"restore an earlier one with --restore_step={others[-1]} (available: {others}), "
                    if others else "")
            raise CheckpointError(
                f"cannot restore checkpoint {path}: {type(err).__name__}: {err}\n"
                f"It is damaged or was written by an incompatible model configuration. {hint.capitalize()}"
                f"or move it aside; nothing was deleted.") from err
        return restored.state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (concrete or abstract) with `shardings` (a matching tree)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

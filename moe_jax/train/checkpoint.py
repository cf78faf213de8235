"""Orbax checkpoints of the train state and the data-loader position, with checksums.

Each step directory holds two items: `state` (TrainState: step, params, optimizer state; sharded
arrays, restorable onto any mesh) and `data` (the loader position, JSON). Orbax writes a step to a
temporary directory and renames it when complete, so an interrupted save never touches the previous
checkpoint; unfinished temporaries are ignored on restart. Once a save has finished, process 0 adds
`moe_jax_sha256.json` (see `moe_jax.train.integrity`).

Restoring (`restore_verified`) checks, in order: the checksums; the shapes and dtypes of every array
against the model (from orbax's metadata, nothing restored yet: a mismatch is a configuration error
naming each array, and nothing is moved); then restores and checks every value is finite. A latest step
that fails is moved to `checkpoints/corrupt/<step>` and the previous one is tried, with a line saying
so. An explicit `--restore_step` that fails is an error, and nothing is moved.

Fault injection for tests: with MOE_JAX_KILL_DURING_SAVE=<step> the process SIGKILLs itself right after
the save of that step has started (files half written), to show the previous checkpoint survives.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from moe_jax.train import integrity


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored; the message names the directory and what to do."""


class DamagedCheckpointError(CheckpointError):
    """A step whose files or values are damaged (not a configuration mismatch)."""


def short_error(err: BaseException) -> str:
    """The first line of an orbax/tensorstore error, without pybind object reprs."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    text = text.split("See full TensorStore details")[0]
    text = re.sub(r"<(bound method|[^<>]*? object at 0x)[^>]*>?", "", text).strip(" .:")
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Checkpointer:
    """A CheckpointManager keeping the last `keep` steps under `<workdir>/checkpoints`."""

    def __init__(
        self, workdir: str | Path, *, keep: int = 3, async_save: bool = True, log: Callable[[str], None] = print
    ):
        self.directory = Path(workdir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
        )
        self.log = log
        self._is_main = jax.process_index() == 0
        self._pending: list[int] = []  # saved steps whose checksum manifest is not written yet
        self._closed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = True) -> bool:
        """Start saving `state` and `data_state` as `step` (asynchronously if configured)."""
        self._finish_pending()
        try:
            started = self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
                force=force,
            )
        except ocp.checkpoint_manager.StepAlreadyExistsError:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} already exists; nothing was overwritten. "
                f"Restore the latest step (leave out --restore_step) or set later steps aside "
                f"with --discard_later_steps"
            ) from None
        if started:
            self._pending.append(step)
        if os.environ.get("MOE_JAX_KILL_DURING_SAVE") == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        return started

    def _finish_pending(self) -> None:
        """Wait for saves in flight, then write the checksum manifest of each finished step."""
        if not self._pending:
            return
        self.manager.wait_until_finished()
        for step in self._pending:
            step_dir = self.directory / str(step)
            if self._is_main and step_dir.is_dir():
                integrity.write_manifest(step_dir)
        self._pending = []
        _barrier("moe_jax_checkpoint_manifests")

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs), verified:
        raises CheckpointError naming the step and the damaged file or the mismatched arrays."""
        return self._restore_checked(step, abstract_state, explicit=True)

    def restore_verified(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict] | None:
        """Restore `step`, or else the latest intact step, falling back past damaged ones (each moved to
        checkpoints/corrupt/ with a line saying so). None when there is no checkpoint at all."""
        if step is not None:
            return step, *self._restore_checked(step, abstract_state, explicit=True)
        damaged = []
        while (latest := self.latest_step()) is not None:
            try:
                return latest, *self._restore_checked(latest, abstract_state)
            except DamagedCheckpointError as err:
                damaged.append(latest)
                dest = self._set_aside(latest, integrity.CORRUPT_DIR)
                previous = self.latest_step()
                then = (
                    f"restoring the previous step {previous} instead"
                    if previous is not None
                    else "no earlier checkpoint is left"
                )
                self.log(f"checkpoint step {latest} is damaged ({err}); moved it to {dest}; {then}")
        if damaged:
            raise CheckpointError(
                f"no intact checkpoint is left in {self.directory}: damaged steps {damaged} were moved to "
                f"{self.directory / integrity.CORRUPT_DIR}. Run again to train from step 0 (nothing else was changed), "
                f"or copy a good checkpoint into {self.directory}"
            )
        return None

    def _set_aside(self, step: int, kind: str) -> Path:
        step_dir = self.directory / str(step)
        dest = step_dir.parent / kind / step_dir.name
        _barrier(f"moe_jax_set_aside_{kind}_{step}_before")
        if self._is_main:
            dest = integrity.move_aside(step_dir, kind)
        _barrier(f"moe_jax_set_aside_{kind}_{step}_after")
        self.manager.reload()
        return dest

    def discard_later_steps(self, step: int) -> list[Path]:
        """Move every step after `step` to checkpoints/discarded/ (kept, not deleted)."""
        moved = [self._set_aside(s, integrity.DISCARDED_DIR) for s in self.all_steps() if s > step]
        for dest in moved:
            self.log(f"--discard_later_steps: moved {dest.name} to {dest}")
        return moved

    def _restore_checked(self, step: int, abstract_state: Any, explicit: bool = False) -> tuple[Any, dict]:
        try:
            return self._checked(step, abstract_state)
        except DamagedCheckpointError as err:
            if not explicit:
                raise
            others = [s for s in self.all_steps() if s != step]
            raise CheckpointError(
                f"checkpoint step {step} ({self.directory / str(step)}) is damaged: {err}. Nothing was moved or "
                f"deleted. Restore another step (available: {others}), or let `moe-jax train` (without "
                f"--restore_step) set damaged steps aside and fall back to the latest intact one"
            ) from None

    def _checked(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        step_dir = self.directory / str(step)
        if not step_dir.is_dir():
            raise CheckpointError(f"no checkpoint {step_dir}: available steps {self.all_steps()}")
        problems = integrity.manifest_problems(step_dir)
        if problems:
            raise DamagedCheckpointError(
                "; ".join(f"{step_dir / p}" for p in problems[:5])
                + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            )
        if not integrity.has_manifest(step_dir):
            self.log(
                f"checkpoint step {step} has no checksums (saved before they existed, or the run stopped "
                f"before writing them): restoring it unverified"
            )
        self._check_shapes(step, abstract_state)
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
            )
        except Exception as err:  # orbax/tensorstore raise many types for a damaged directory
            raise DamagedCheckpointError(f"{step_dir}: cannot be read: {short_error(err)}") from None
        bad = integrity.nonfinite_leaves(restored.state)
        if bad:
            raise DamagedCheckpointError(
                f"{step_dir}: non-finite values in "
                + ", ".join(bad[:5])
                + (f" and {len(bad) - 5} more arrays" if len(bad) > 5 else "")
            )
        return restored.state, restored.data

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        """Compare the checkpoint's array metadata with the model's, array by array, before restoring."""
        step_dir = self.directory / str(step)
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception as err:
            raise DamagedCheckpointError(f"{step_dir / 'state'}: unreadable metadata: {short_error(err)}") from None
        if saved is None:
            raise DamagedCheckpointError(f"{step_dir / 'state'}: no array metadata")
        mismatches = integrity.shape_mismatches(saved, abstract_state)
        if mismatches:
            shown = "\n  - ".join(mismatches[:20]) + (
                f"\n  - and {len(mismatches) - 20} more" if len(mismatches) > 20 else ""
            )
            raise CheckpointError(
                f"checkpoint {step_dir} was written by a different model configuration; these arrays do not "
                f"match the model:\n  - {shown}\n"
                f"Train with the configuration the workdir was trained with (its config.gin, unchanged: "
                f"leave out the --gin overrides that change the model), or use a new --workdir. Nothing was written."
            )

    def wait(self) -> None:
        self._finish_pending()
        self.manager.wait_until_finished()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finish_pending()
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (concrete or abstract) with `shardings` (a matching tree)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

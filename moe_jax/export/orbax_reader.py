"""Read single parameter arrays (or blocks of them) of an orbax checkpoint without restoring it.

`moe-jax train` saves `TrainState` with orbax's StandardSave (`moe_jax.train.checkpoint.Checkpointer`):
`<workdir>/checkpoints/<step>/state/` is an OCDBT key-value store (tensorstore) holding one zarr array
per leaf, named by its tree path joined with dots: the parameter `stacks.1.blocks.ffn.wi` is
`params.stacks.1.blocks.ffn.wi.value`. Orbax 0.12 writes zarr v2 by default (zarr3 when asked); the
zarr chunks are the per-device shards of the array at save time (one chunk on a single device).

Opening an array reads only its metadata; `read(path, box)` decodes only the chunks the box covers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorstore as ts


class CheckpointReadError(RuntimeError):
    """The checkpoint or one of its arrays cannot be read; the message names it."""


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """Committed checkpoint steps of a workdir (numeric step directories with a `state` item), sorted."""
    root = Path(workdir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def state_dir(workdir: str | os.PathLike, step: int | None = None) -> tuple[Path, int]:
    """(the `state` item directory of `step` (default: latest), step)."""
    steps = checkpoint_steps(workdir)
    if not steps:
        raise CheckpointReadError(
            f"no checkpoint under {Path(workdir) / 'checkpoints'}: train first "
            f"(`moe-jax train --workdir={workdir} ...`)"
        )
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise CheckpointReadError(
            f"no checkpoint of step {step} in {Path(workdir) / 'checkpoints'} (available: {steps})"
        )
    return Path(workdir).resolve() / "checkpoints" / str(step) / "state", step


class OrbaxParamReader:
    """Parameter arrays (and the selection bias) of one checkpoint's `state` item, opened lazily through
    tensorstore."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).resolve()
        if not (self.directory / "manifest.ocdbt").exists():
            raise CheckpointReadError(
                f"{self.directory} is not an OCDBT checkpoint item (no manifest.ocdbt); "
                f"only orbax's default OCDBT format is supported"
            )
        # No chunk cache: a block's chunks are decoded into the result and freed.
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self._open: dict[str, ts.TensorStore] = {}

    # The `TrainState` items holding model arrays: the parameters, then DeepSeek-V3's selection bias
    # (`TrainState.router_bias`, present only for models with one). Our dotted paths are unique across them.
    ITEMS = ("params", "router_bias")

    @staticmethod
    def array_name(path: str, item: str = "params") -> str:
        """Our dotted path -> orbax's array name ("embed" -> "params.embed.value")."""
        return f"{item}.{path}.value"

    def array(self, path: str) -> ts.TensorStore:
        """The tensorstore of model array `path` (metadata only), a parameter or the selection bias."""
        if path not in self._open:
            errors = []
            for item in self.ITEMS:
                for driver in ("zarr", "zarr3"):
                    spec = {
                        "driver": driver,
                        "kvstore": {
                            "driver": "ocdbt",
                            "base": f"file://{self.directory}/",
                            "path": self.array_name(path, item),
                        },
                    }
                    try:
                        self._open[path] = ts.open(spec, open=True, read=True, context=self._context).result()
                        return self._open[path]
                    except Exception as err:  # tensorstore raises ValueError with a status message
                        errors.append(f"{driver}: {err}")
            raise CheckpointReadError(
                f"parameter {path!r} (array {self.array_name(path)!r}) is not in checkpoint {self.directory}: "
                + "; ".join(e.splitlines()[0][:200] for e in errors[:2])
            )
        return self._open[path]

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array(path).shape)

    def dtype(self, path: str) -> np.dtype:
        return np.dtype(self.array(path).dtype.numpy_dtype)

    def chunk_shape(self, path: str) -> tuple[int, ...]:
        """The stored chunk shape (the unit tensorstore decodes)."""
        arr = self.array(path)
        chunk = arr.chunk_layout.read_chunk.shape
        return tuple(int(c) if c else int(n) for c, n in zip(chunk, arr.shape))

    def read(self, path: str, box: tuple[slice | int, ...] = ()) -> np.ndarray:
        """The values of `array(path)[box]` as a numpy array."""
        arr = self.array(path)
        return np.asarray(arr[box].read().result() if box else arr.read().result())

"""Safetensors files written region by region and read tensor by tensor (bounded memory both ways).

The format (huggingface/safetensors, README "Format"): an 8-byte little-endian header length N, N bytes
of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then
the raw little-endian tensor bytes, contiguous, offsets relative to the end of the header.

Because every name, shape and dtype of a shard is known before any tensor is read, the header is written
first and tensors are then filled region by region through a memory map (`ShardFile`): a shard is never
held in memory. Reading maps the file and copies out one tensor at a time. bfloat16 uses `ml_dtypes` (numpy
has no bfloat16; the
`safetensors` package's numpy backend cannot return it either).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import sys
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F64": np.dtype(np.float64),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
}
CODES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("moe_jax.export.safetensors_io assumes a little-endian host")


class SafetensorsError(ValueError):
    """A file that is not valid safetensors, or a write that does not follow the announced header."""


def dtype_code(dtype) -> str:
    """numpy dtype -> safetensors code ("F32", "BF16", ...)."""
    dtype = np.dtype(dtype)
    if dtype not in CODES:
        raise SafetensorsError(f"dtype {dtype} has no safetensors code here (known: {sorted(DTYPES)})")
    return CODES[dtype]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file.

    Attributes:
      name, dtype, shape: as in the header.
      path: the file.
      offset: absolute byte offset of its data in the file.
      nbytes: its data size.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int


class ShardFile:
    """A safetensors file whose header is written first and whose tensors are then filled region by
    region, in any order (the export reads the checkpoint chunk by chunk, and one chunk may hold parts
    of many tensors in many files).

        shard = ShardFile(path, [("a", "F32", (4, 6)), ...], metadata={"format": "pt"})
        shard.write("a", (slice(0, 2), slice(None)), block)   # block [2, 6] into rows 0..1 of "a"
        shard.close()                                         # renames <path>.partial -> <path>

    The file is created at its final size (sparse); each write maps only the target tensor and unmaps
    it, so memory holds at most the caller's block and one tensor's pages. The caller checks that
    every element was written (`close` cannot tell a hole from zeros).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Iterable[tuple[str, str, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ):
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        offset = 0
        for name, code, shape in specs:
            shape = tuple(int(n) for n in shape)
            if code not in DTYPES:
                raise SafetensorsError(f"{name}: unknown dtype code {code!r}")
            if name in header:
                raise SafetensorsError(f"tensor name {name!r} appears twice")
            nbytes = math.prod(shape) * DTYPES[code].itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.tensors[name] = (DTYPES[code], shape, offset)
            offset += nbytes
        self.data_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._data_start = 8 + len(raw)
        self._partial = self.path.with_name(self.path.name + ".partial")
        with open(self._partial, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(self._data_start + offset)

    def write(
        self, name: str, region: tuple[slice, ...], block: np.ndarray, view_shape: tuple[int, ...] | None = None
    ) -> None:
        """tensor[region] = block, where the tensor is seen with shape `view_shape` (a reshape of its
        shape, e.g. q_proj [H*Dh, d] as [H, Dh, d]; default its own shape)."""
        dtype, shape, offset = self.tensors[name]
        view_shape = shape if view_shape is None else tuple(view_shape)
        if math.prod(view_shape) != math.prod(shape) or np.dtype(block.dtype) != dtype:
            raise SafetensorsError(
                f"{self.path.name}: cannot write {block.dtype} into {name} {dtype} {shape} viewed as {view_shape}"
            )
        if block.size == 0:
            return
        mm = np.memmap(self._partial, dtype=dtype, mode="r+", offset=self._data_start + offset, shape=view_shape)
        mm[region] = block
        del mm  # unmap: the written pages stay in the page cache, not in this process

    def close(self) -> None:
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        """Drop the partial file."""
        self._partial.unlink(missing_ok=True)


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """({name: TensorInfo}, metadata) of a safetensors file; SafetensorsError if it is malformed."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path}: header length {n} is invalid for a file of {size} bytes")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsError(f"{path}: header is not JSON ({err})") from err
    metadata = header.pop("__metadata__", {}) or {}
    infos = {}
    for name, h in header.items():
        try:
            dtype, shape, (begin, end) = DTYPES[h["dtype"]], tuple(h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise SafetensorsError(f"{path}: tensor {name!r} has a bad header entry {h!r}") from err
        if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
            raise SafetensorsError(
                f"{path}: tensor {name!r} data offsets {begin}..{end} do not match shape {shape} "
                f"{h['dtype']} or the file size"
            )
        infos[name] = TensorInfo(
            name=name, dtype=dtype, shape=shape, path=path, offset=8 + n + begin, nbytes=end - begin
        )
    return infos, metadata


def load_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor's data as a fresh array (read through a memory map: only this tensor's pages)."""
    if info.nbytes == 0:
        return np.zeros(info.shape, info.dtype)
    mm = np.memmap(info.path, dtype=info.dtype, mode="r", offset=info.offset, shape=info.shape)
    out = np.array(mm)
    del mm
    return out

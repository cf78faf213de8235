"""Streaming safetensors files: write tensor by tensor, read tensor by tensor.

The format (huggingface/safetensors, README "Format"): an 8-byte little-endian header length N, N bytes
of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then
the raw little-endian tensor bytes, contiguous, offsets relative to the end of the header.

Because every name, shape and dtype of a shard is known before any tensor is read, the header is written
first and each tensor goes to disk as soon as it exists: a shard is never held in memory. Reading maps
the file and copies out one tensor at a time. bfloat16 uses `ml_dtypes` (numpy has no bfloat16; the
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


class StreamingWriter:
    """Write one safetensors file whose tensors are announced up front and then written in order.

        w = StreamingWriter(path, [("a", "F32", (2, 3)), ...], metadata={"format": "pt"})
        w.write("a", array)          # in the announced order, exact dtype and shape
        w.close()                    # renames <path>.partial -> <path>

    Memory: one tensor (the caller's); nothing is buffered.
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._specs = [(name, code, tuple(int(n) for n in shape)) for name, code, shape in specs]
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, code, shape in self._specs:
            if code not in DTYPES:
                raise SafetensorsError(f"{name}: unknown dtype code {code!r}")
            if name in header:
                raise SafetensorsError(f"tensor name {name!r} appears twice")
            nbytes = math.prod(shape) * DTYPES[code].itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.data_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._file = open(self._partial, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        """Append the next announced tensor."""
        if self._next >= len(self._specs):
            raise SafetensorsError(f"{self.path.name}: {name!r} written after all announced tensors")
        want_name, code, shape = self._specs[self._next]
        if name != want_name or array.shape != shape or np.dtype(array.dtype) != DTYPES[code]:
            raise SafetensorsError(f"{self.path.name}: expected {want_name} {code} {shape}, got {name} "
                                   f"{array.dtype} {array.shape}")
        np.ascontiguousarray(array).tofile(self._file)
        self._next += 1

    def close(self) -> None:
        """Finish the file (every announced tensor must have been written)."""
        if self._next != len(self._specs):
            missing = [s[0] for s in self._specs[self._next:]]
            self.abort()
            raise SafetensorsError(f"{self.path.name}: closed before writing {missing[:5]}...")
        self._file.close()
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        """Drop the partial file."""
        if not self._file.closed:
            self._file.close()
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
            raise SafetensorsError(f"{path}: tensor {name!r} data offsets {begin}..{end} do not match shape {shape} "
                                   f"{h['dtype']} or the file size")
        infos[name] = TensorInfo(name=name, dtype=dtype, shape=shape, path=path, offset=8 + n + begin,
                                 nbytes=end - begin)
    return infos, metadata


def load_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor's data as a fresh array (read through a memory map: only this tensor's pages)."""
    if info.nbytes == 0:
        return np.zeros(info.shape, info.dtype)
    mm = np.memmap(info.path, dtype=info.dtype, mode="r", offset=info.offset, shape=info.shape)
    out = np.array(mm)
    del mm
    return out

"""Tensorstore (zarr v3) arrays for the token cache. Imports numpy and tensorstore only.

2-D arrays [rows, seq_len] are sharded: one shard file holds `ROWS_PER_SHARD` rows, each row its own
inner chunk (zstd level 1), so a host reads exactly the rows it needs with one small range read each.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

ROWS_PER_SHARD = 4096
_ZSTD = {"name": "zstd", "configuration": {"level": 1}}
_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}


def _spec(path: Path, shape: tuple[int, ...] | None = None, dtype: str | None = None) -> dict:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    if shape is None:
        return spec
    if len(shape) == 2:
        shard = [max(1, min(ROWS_PER_SHARD, shape[0])), shape[1]]
        codecs = [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [1, shape[1]],
                    "codecs": [_BYTES, _ZSTD],
                    "index_codecs": [_BYTES, {"name": "crc32c"}],
                },
            }
        ]
    else:
        shard = [max(1, min(1 << 16, shape[0]))]
        codecs = [_BYTES, _ZSTD]
    spec["metadata"] = {
        "shape": list(shape),
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shard}},
        "codecs": codecs,
    }
    return spec


def write_array(path: Path, array: np.ndarray) -> None:
    import tensorstore as ts

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    arr = ts.open(_spec(path, array.shape, np.dtype(array.dtype).name), create=True).result()
    if array.size:
        arr.write(array).result()


def open_array(path: Path):
    import tensorstore as ts

    return ts.open(_spec(Path(path)), open=True, read=True).result()


def read_array(path: Path) -> np.ndarray:
    return open_array(path).read().result()

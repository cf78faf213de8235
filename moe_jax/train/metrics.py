"""Training metrics: TensorBoard event files, JSON lines, a console progress bar; FLOPs and MFU."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def measure_peak_flops(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one device on a large square matmul in `dtype` (median of `repeats` after warm-up)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / float(np.median(times))


def scalar_metrics(metrics: Mapping[str, np.ndarray], moe_layers: list[int]) -> dict[str, float]:
    """Flatten step metrics to scalars: per-layer MoE statistics become moe/layer{l}/{name}."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        value = np.asarray(value)
        if key == "tokens_per_expert":
            continue
        if value.ndim == 0:
            out[key] = float(value)
        else:  # [L_moe] per-layer statistics
            for layer, v in zip(moe_layers, value):
                out[f"moe/layer{layer}/{key}"] = float(v)
            out[f"moe/mean_{key}"] = float(value.mean())
    return out


class MetricsWriter:
    """Writes scalar records to `<workdir>/metrics.jsonl` and TensorBoard events `<workdir>/tb/`."""

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(Path(workdir) / "tb"))

    def write(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, np.ndarray] = ()) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
        for key, value in scalars.items():
            self._tb.add_scalar(key, float(value), int(step))
        for key, value in dict(histograms).items():
            self._tb.add_histogram(key, np.asarray(value), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    """All records of `<workdir>/metrics.jsonl` (empty if there is none)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

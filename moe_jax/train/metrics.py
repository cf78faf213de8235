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
    """FLOP/s of one device on a large square matmul in `dtype`: the best of `repeats` after warm-up
    (other work on the machine only ever slows a repeat down, so the best is the steadiest estimate)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.min(times))


def machine_key(dtype) -> str:
    """What the matmul peak depends on: backend, device kind, processor and usable cores, dtype."""
    import os
    import platform

    cpu = ""
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    dev = jax.devices()[0]
    return (
        f"{jax.default_backend()}|{dev.device_kind}|{cpu or platform.machine()}|{cores} cores|{jnp.dtype(dtype).name}"
    )


def cpu_busy(interval: float = 0.5) -> str:
    """Why a CPU matmul-peak measurement now would be low ("cores 0-1 93% busy with other work"), or "" when
    it would not. Always "" on accelerators.

    The measurement runs on this process's usable cores (`os.sched_getaffinity`), so those must be idle:
    their busy share is read from /proc/stat over `interval` seconds while this process sleeps, and above
    25% they are busy. (The 1-minute load average, the fallback where /proc/stat is missing, cannot tell:
    a 2-core measurement beside two training processes sees load 2.0 on 2 cores, and once kept 17 GFLOP/s
    against a quiet peak of 80.)
    """
    import os

    if jax.default_backend() != "cpu":
        return ""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    before = _proc_stat_times()
    if before is None:
        if not hasattr(os, "getloadavg"):
            return ""
        load, n = os.getloadavg()[0], os.cpu_count() or 1
        return f"load {load:.1f} on {n} cores" if load > n else ""
    time.sleep(interval)
    after = _proc_stat_times() or {}
    busy, total = 0, 0
    for c in cores:
        if c in before and c in after:
            (b0, t0), (b1, t1) = before[c], after[c]
            busy, total = busy + b1 - b0, total + t1 - t0
    share = busy / total if total else 0.0
    names = f"{cores[0]}-{cores[-1]}" if cores == list(range(cores[0], cores[-1] + 1)) else ",".join(map(str, cores))
    return f"cores {names} {share:.0%} busy with other work" if share > 0.25 else ""


def _proc_stat_times() -> dict[int, tuple[int, int]] | None:
    """Core -> (busy, total) jiffies since boot, from /proc/stat (idle and iowait count as not busy), or None
    where it cannot be read."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(v) for v in fields[:8]]
            out[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return out or None


def machine_peak_flops(dtype=jnp.float32, cache: str | Path | None = None) -> tuple[float, str]:
    """The matmul peak used for MFU, fixed per machine so that runs are comparable: measured once (the
    best of 20 repeats of a 2048^3 matmul) and kept in `cache` (default
    $XDG_CACHE_HOME/moe_jax/peak_flops.json) under `machine_key(dtype)`. The best repeat survives short
    interruptions but not a machine that stays busy, so a CPU measurement taken while other work keeps this
    process's cores busy (`cpu_busy`) is used for this run only and not kept. Returns
    (FLOP/s, a note)."""
    import os

    path = Path(cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moe_jax" / "peak_flops.json")
    key = machine_key(dtype)
    table = {}
    if path.exists():
        try:
            table = json.loads(path.read_text())
        except ValueError:
            table = {}
    if key in table:
        entry = table[key]
        return float(
            entry["flops"]
        ), f"matmul peak {entry['flops'] / 1e9:.1f} GFLOP/s ({path}, measured {entry['date']})"
    busy = cpu_busy()
    flops = measure_peak_flops(dtype, repeats=20)
    if busy:
        return flops, f"matmul peak {flops / 1e9:.1f} GFLOP/s (measured now on a busy machine, {busy}: not kept)"
    table[key] = {"flops": flops, "date": time.strftime("%Y-%m-%d")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=2) + "\n")
        tmp.replace(path)
    except OSError:
        pass
    return flops, f"matmul peak {flops / 1e9:.1f} GFLOP/s (measured now, kept in {path})"


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
        record = json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n"
        with self.path.open("a+b") as f:
            f.seek(0, 2)
            if f.tell() and (f.seek(-1, 2), f.read(1))[1] != b"\n":
                record = "\n" + record  # a process killed mid-line left it unterminated: never extend it
            f.write(record.encode())
        for key, value in scalars.items():
            self._tb.add_scalar(key, float(value), int(step))
        for key, value in dict(histograms).items():
            self._tb.add_histogram(key, np.asarray(value), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    """All records of `<workdir>/metrics.jsonl` (empty if there is none).

    A torn line (cut before its closing brace: a live run is writing it, or a run was killed mid-line,
    which `MetricsWriter` never extends) is skipped; a whole line that does not parse is an error naming
    the file and line."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if line.rstrip().endswith("}"):
                raise ValueError(f"{path}, line {i + 1}: not a JSON record; fix or delete that line") from None
    return out


def topk_changed(previous: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Share of routing choices that changed: [L, T, k] expert ids (-1 = inactive) of one fixed batch at
    two evaluations -> [L], the fraction of `current`'s active choices that were not among the same
    token's choices in `previous` (0 = the router's top-k is frozen, about 1 - k/E = random)."""
    active = current >= 0
    kept = (current[..., :, None] == previous[..., None, :]).any(-1) & active
    return 1.0 - kept.sum(axis=(1, 2)) / np.maximum(active.sum(axis=(1, 2)), 1)


class RoutingChanges:
    """Tracks how the routing of one fixed held-out batch moves between evaluations.

    `update(params)` runs `probe(params, batch)` (-> [L_moe, T, k] expert ids, see
    `moe_jax.train.step.make_routing_probe`) and returns {"moe/layer{l}/topk_changed": share, ...,
    "moe/mean_topk_changed": mean} against the previous call (empty on the first). The last ids are
    kept in `<workdir>/routing_probe.npy`, so a resumed run compares with the evaluation before it.
    """

    def __init__(self, workdir: str | Path, probe, batch, moe_layers: list[int], enabled: bool = True):
        self.path, self.probe, self.batch, self.layers = Path(workdir) / "routing_probe.npy", probe, batch, moe_layers
        self.enabled = enabled
        self.previous = np.load(self.path) if self.path.exists() else None

    def update(self, params) -> dict[str, float]:
        if not self.layers:
            return {}
        ids = self.probe(params, self.batch)
        if ids is None:
            return {}
        ids = np.asarray(jax.device_get(ids))
        out: dict[str, float] = {}
        if self.previous is not None and self.previous.shape == ids.shape:
            changed = topk_changed(self.previous, ids)
            out = {f"moe/layer{l}/topk_changed": float(c) for l, c in zip(self.layers, changed)}
            out["moe/mean_topk_changed"] = float(changed.mean())
        self.previous = ids
        if self.enabled:
            np.save(self.path, ids)
        return out

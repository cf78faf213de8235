"""Router diagnostics: hand-computed goldens for the statistics and the top-k change share, the
per-machine matmul peak cache, and the diagnostics reaching metrics.jsonl in a real run."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe.stats import routing_stats
from moe_jax.train import metrics as M


def test_routing_stats_goldens():
    probs = jnp.asarray([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
    indices = jnp.asarray([[0, 1], [3, 2]])
    mask = jnp.asarray([[True, True], [True, False]])
    counts = jnp.asarray([1, 1, 0, 1])
    routed = jnp.asarray([[3.0, 4.0], [0.0, 0.0]])
    st = routing_stats(counts, jnp.zeros((2, 2), bool), mask, probs, indices, routed_out=routed)
    h0 = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))
    h1 = np.log(4.0)
    np.testing.assert_allclose(st.router_entropy, (h0 + h1) / 2, rtol=1e-6)
    np.testing.assert_allclose(st.router_entropy_norm, (h0 + h1) / 2 / np.log(4.0), rtol=1e-6)
    np.testing.assert_allclose(st.topk_mass, ((0.5 + 0.25) + 0.25) / 2, rtol=1e-6)  # masked choice excluded
    np.testing.assert_allclose(st.load_cv, np.std([1, 1, 0, 1]) / 0.75, rtol=1e-6)
    assert float(st.dead_experts) == 1.0
    np.testing.assert_allclose(st.routed_norm, 2.5, rtol=1e-6)  # (5 + 0) / 2
    assert float(st.shared_norm) == 0.0


def test_uniform_router_values():
    e, k, t = 16, 2, 64
    probs = jnp.full((t, e), 1.0 / e)
    indices = jnp.tile(jnp.arange(k), (t, 1))
    st = routing_stats(jnp.full((e,), t * k / e), jnp.zeros((t, k), bool), jnp.ones((t, k), bool), probs, indices)
    np.testing.assert_allclose(st.router_entropy_norm, 1.0, rtol=1e-6)
    np.testing.assert_allclose(st.topk_mass, k / e, rtol=1e-6)
    assert float(st.load_cv) == 0.0 and float(st.dead_experts) == 0.0


def test_topk_changed_golden():
    prev = np.array([[[0, 1], [2, 3]], [[0, 1], [0, 1]]])
    cur = np.array([[[1, 0], [2, 4]], [[2, -1], [3, 4]]])
    # layer 0: token 0 same set, token 1 one of two changed -> 1/4; layer 1: 3 active, all new -> 1
    np.testing.assert_allclose(M.topk_changed(prev, cur), [0.25, 1.0])


def test_machine_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(M, "measure_peak_flops", lambda dtype, repeats=5: calls.append(repeats) or 1e11)
    monkeypatch.setattr(M, "cpu_busy", lambda: "")
    path = tmp_path / "peak.json"
    flops, note = M.machine_peak_flops(jnp.float32, cache=path)
    assert flops == 1e11 and "measured now" in note and calls == [20]
    flops2, note2 = M.machine_peak_flops(jnp.float32, cache=path)
    assert flops2 == 1e11 and "measured 20" in note2 and calls == [20]  # read back, not measured again
    assert M.machine_key(jnp.float32) in json.loads(path.read_text())


def test_cpu_busy_reads_the_usable_cores_share_from_proc_stat(monkeypatch):
    """Hand-made /proc/stat snapshots: over the interval cores 0 and 1 spent 90 and 70 of 100 jiffies busy
    (user + system; idle and iowait are not busy) -> 80% busy; 10 and 20 of 100 -> 15%, not busy. Cores
    this process may not use (2) do not count; without /proc/stat the 1-minute load average decides."""
    import os

    def snapshots(*shares):
        seq = iter([{0: (0, 0), 1: (0, 0), 2: (0, 0)}, {**{c: (b, 100) for c, b in enumerate(shares)}, 2: (0, 100)}])
        return lambda: next(seq)

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(M, "_proc_stat_times", snapshots(90, 70))
    assert M.cpu_busy(interval=0) == "cores 0-1 80% busy with other work"
    monkeypatch.setattr(M, "_proc_stat_times", snapshots(10, 20))
    assert M.cpu_busy(interval=0) == ""
    monkeypatch.setattr(M, "_proc_stat_times", lambda: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 0.0, 0.0))
    assert M.cpu_busy() == f"load 99.0 on {os.cpu_count()} cores"
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.0, 0.0))
    assert M.cpu_busy() == ""


def test_proc_stat_times_golden(monkeypatch, tmp_path):
    """The per-core lines of /proc/stat: busy = all ticks but idle (4th) and iowait (5th); the aggregate
    `cpu` line is skipped."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 1 2 3 40 5 6 7 8 0 0\ncpu1 10 0 0 90 0 0 0 0 0 0\nintr 5\n")
    real_path = M.Path
    monkeypatch.setattr(M, "Path", lambda p: stat if p == "/proc/stat" else real_path(p))
    assert M._proc_stat_times() == {0: (27, 72), 1: (10, 100)}


def test_a_peak_measured_on_a_busy_machine_is_used_but_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "measure_peak_flops", lambda dtype, repeats=5: 3e10)
    monkeypatch.setattr(M, "cpu_busy", lambda: "cores 0-1 93% busy with other work")
    path = tmp_path / "peak.json"
    flops, note = M.machine_peak_flops(jnp.float32, cache=path)
    assert flops == 3e10 and "busy machine, cores 0-1 93% busy with other work: not kept" in note
    assert not path.exists()


def test_metrics_survive_a_run_killed_mid_line(tmp_path):
    """A torn last line (killed mid-write, or a live run's line being written) is skipped by the reader
    and never extended by the writer; a whole line that does not parse is a named error."""
    writer = M.MetricsWriter(tmp_path, enabled=True)
    writer.write(1, {"loss": 2.0})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "loss": 1.')  # the process died here
    assert M.read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
    writer.write(2, {"loss": 1.5})  # the resumed run
    writer.close()
    assert M.read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[1] == '{"step": 2, "loss": 1.' and json.loads(lines[2]) == {"step": 2, "loss": 1.5}
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2,, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="line 2: not a JSON record"):
        M.read_metrics(tmp_path)

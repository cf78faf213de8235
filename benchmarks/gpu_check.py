"""The GPU check (issue 21): one prepared script for one H100/H200 that finishes within its time
budget (default 450 s, under 8 minutes) and prints markdown to paste into benchmarks/RESULTS.md.

    python benchmarks/gpu_check.py              # on the GPU: JAX_PLATFORMS unset or cuda
    python benchmarks/gpu_check.py --dry_run    # on CPU: tiny shapes, every code path, ~1-2 minutes

Sections, in order (each has a share of the budget; see SECTION_SHARE):
  tests     the GPU-only tests (`pytest -k on_gpu` in tests/moe/test_gmm*.py, skipped on CPU), run
            first in a child process that does not preallocate GPU memory;
  versions  jax, jaxlib, the CUDA plugin, CUDA runtime and cuDNN versions, the device, and whether
            the installed packages match constraints.txt;
  peak      a bfloat16 square matmul's FLOP/s measured now: the peak every MFU divides by;
  layers    the MoE layer table (benchmarks/moe_layer.py: DeepSeekMoE 2B layer, GShard, Switch, Hash,
            each forward+backward vs the dense FFN of equal activated compute), bfloat16, 32K tokens,
            for each grouped-matmul backend usable here (gmm.GPU_PREFERENCE, then the Mosaic kernels
            with the chunked weight gradient), and which one "auto" picks;
  train     the 2B DeepSeekMoE and Dense training step (gin/models/{deepseekmoe,dense}_2b.gin, bfloat16
            compute, benchmarks/train_step.py): tokens/s, MFU, peak memory.
A section gets its share of the time left among the sections still to run; it stops between its
items when the next one would not fit in what is left (judged by the last item of the same backend,
else the slowest so far; in the last section, train, while any time is left) and says what it
skipped; an alarm at the overall budget stops whatever runs then (between Python calls) and the
script still prints what it has.

--dry_run: CPU, d=64, 512 tokens, the 2B models shrunk to one tiny layer; the layer table and the
training step also run "mosaic_gpu_emulated", the Mosaic wrapper on `kernels_mosaic.emulated_kernels()`.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTION_SHARE = {"tests": 0.22, "versions": 0.02, "peak": 0.04, "layers": 0.42, "train": 0.30}
GPU_TESTS = ["tests/moe/test_gmm.py", "tests/moe/test_gmm_mosaic.py"]
LAYERS = ("deepseekmoe", "gshard", "switch", "hash")
PACKAGES = (
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "jax-cuda12-pjrt",
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
)
EMULATED = "mosaic_gpu_emulated"


class Deadline(BaseException):
    """The overall budget ran out (raised by SIGALRM; a BaseException so that the per-item
    `except Exception` handlers let it through)."""


class Budget:
    """Seconds left overall and in the current section; `fits(item_s)`: may another item start.

    A section gets its share of what is left when it starts, among the sections still to run, so
    time one section leaves unused goes to the later ones."""

    def __init__(self, total_s: float):
        self.t0, self.total = time.monotonic(), total_s
        self.section_end = self.t0 + total_s

    def start(self, name: str, pending: list[str] | None = None) -> None:
        """Start section `name`; `pending`: it and the sections after it (default: all of them)."""
        now = time.monotonic()
        pending = pending or list(SECTION_SHARE)
        shares = sum(SECTION_SHARE[s] for s in pending)
        share = SECTION_SHARE[name] / shares if shares > 0 else 0.0
        self.section_end = now + share * max(self.t0 + self.total - now, 0.0)

    def left(self) -> float:
        return self.section_end - time.monotonic()

    def fits(self, item_s: float) -> bool:
        return self.left() > item_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry_run", action="store_true", help="CPU, tiny shapes, every code path (~1-2 minutes)")
    p.add_argument("--budget_s", type=float, default=None, help="overall time budget (default 450; dry run 300)")
    p.add_argument("--sections", nargs="+", default=list(SECTION_SHARE), choices=list(SECTION_SHARE))
    p.add_argument("--tokens", type=int, default=None, help="tokens of the layer table (default 32768; dry 512)")
    p.add_argument("--d", type=int, default=None, help="hidden size of the layer table (default 1280; dry 64)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per layer step (default 5; dry 2)")
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="gmm backends of the layer table (default: every usable one of gmm.GPU_PREFERENCE)",
    )
    p.add_argument("--train_gmm", default=None, help="gmm backend of the training step (default auto)")
    p.add_argument("--batch", type=int, default=None, help="sequences per training step (default 16; dry 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; dry 64)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 5; dry 2)")
    a = p.parse_args(argv)
    dry = a.dry_run
    defaults = dict(
        budget_s=(300 if dry else 450),
        tokens=(512 if dry else 32768),
        d=(64 if dry else 1280),
        repeats=(2 if dry else 5),
        batch=(2 if dry else 16),
        seq=(64 if dry else 2048),
        steps=(2 if dry else 5),
        train_gmm=(EMULATED if dry else "auto"),
    )
    for name, value in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    if a.tokens < 1 or a.batch < 1 or a.seq < 2 or a.repeats < 1 or a.steps < 1 or a.budget_s <= 0:
        p.error("--tokens, --batch, --repeats, --steps must be >= 1, --seq >= 2, --budget_s > 0")
    return a


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


def section_tests(a, budget: Budget, state: dict) -> None:
    """pytest -k on_gpu in a child process (JAX_PLATFORMS=cuda, or cpu for the dry run: all skipped)."""
    env = dict(
        os.environ,
        XLA_PYTHON_CLIENT_PREALLOCATE="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    env["JAX_PLATFORMS"] = "cpu" if a.dry_run else (os.environ.get("JAX_PLATFORMS") or "cuda")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-n",
        "0",
        "-rfEs",
        "--tb=line",
        "-p",
        "no:cacheprovider",
        "-k",
        "on_gpu",
        *GPU_TESTS,
    ]
    print(f"`JAX_PLATFORMS={env['JAX_PLATFORMS']} python -m {' '.join(cmd[2:])}`\n", flush=True)
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(budget.left(), 1.0))
    except subprocess.TimeoutExpired:
        print(f"**tests stopped after {time.monotonic() - t0:.0f} s (the section's budget)**")
        return
    lines = (r.stdout + r.stderr).strip().splitlines()
    print("```\n" + "\n".join(lines[-30:]) + "\n```")
    print(f"pytest exit status {r.returncode} ({time.monotonic() - t0:.0f} s)")
    state["tests_rc"] = r.returncode


def _cuda_versions() -> dict[str, str]:
    try:
        from jax._src.lib import cuda_versions
    except ImportError:
        return {}
    out = {}
    for what, fn in (
        ("CUDA runtime", "cuda_runtime_get_version"),
        ("cuDNN", "cudnn_get_version"),
        ("cuBLAS", "cublas_get_version"),
        ("cuSOLVER", "cusolver_get_version"),
    ):
        try:
            v = int(getattr(cuda_versions, fn)())
        except Exception:  # noqa: BLE001 (a version the plugin does not report)
            continue
        out[what] = f"{v // 1000}.{v % 1000 // 10}" if what == "CUDA runtime" else str(v)
    return out


def installed_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def constraints_diff(path: Path = ROOT / "constraints.txt") -> list[str] | None:
    """Installed packages whose version differs from their pin in constraints.txt ("name==version");
    None when the file is missing."""
    if not path.exists():
        return None
    diffs = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" not in line:
            continue
        name, pin = (x.strip() for x in line.split("==", 1))
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if have != pin:
            diffs.append(f"{name} {have} (pinned {pin})")
    return diffs


def section_versions(a, budget: Budget, state: dict) -> None:
    import jax

    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    print(
        f"device: **{dev.device_kind}**"
        + (f" (compute capability {cc})" if cc else "")
        + f", {jax.device_count()} device(s), platform {dev.platform}"
    )
    print("packages: " + ", ".join(f"{k} {v}" for k, v in installed_versions().items()))
    cuda = _cuda_versions()
    print("CUDA: " + (", ".join(f"{k} {v}" for k, v in cuda.items()) if cuda else "none (no CUDA plugin)"))
    diffs = constraints_diff()
    print(
        "constraints.txt: "
        + (
            "missing"
            if diffs is None
            else "DIFFERS: " + ", ".join(diffs)
            if diffs
            else "every pinned package that is installed has its pinned version"
        )
    )


def section_peak(a, budget: Budget, state: dict) -> None:
    from benchmarks.moe_layer import matmul_peak

    state["peak"] = matmul_peak("bfloat16", n=512 if a.dry_run else None)
    print(
        f"bfloat16 matmul peak, measured now: **{state['peak'] / 1e12:.1f} TFLOP/s** "
        f"({'512' if a.dry_run else '8192'}^3, best of 5)"
    )


def layer_backends(a) -> list[str]:
    """--backends, else every usable GPU kernel in preference order (dry run: chunked + emulated Mosaic)."""
    from moe_jax.moe.dispatch import gmm as G

    if a.backends:
        return list(a.backends)
    if a.dry_run:
        return ["chunked", EMULATED]
    usable = [name for name in G.GPU_PREFERENCE if G.gmm_usable(name)]
    return usable + (["mosaic_gpu_chunked_dw"] if "mosaic_gpu" in usable else [])  # measured last


def _select(backend: str) -> str:
    """prepare_gmm(backend), and the Triton-lowering flag (process-wide) on only for its own backend."""
    import jax

    from moe_jax.moe.dispatch import gmm as G
    from moe_jax.moe.dispatch import kernels_gpu

    if hasattr(jax.config, kernels_gpu.FLAG):
        jax.config.update(kernels_gpu.FLAG, False)
    return G.prepare_gmm(backend)


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:240]}"


def section_layers(a, budget: Budget, state: dict) -> None:
    from benchmarks import moe_layer as ML
    from moe_jax.moe.dispatch import gmm as G

    backends = layer_backends(a)
    print(
        f"gmm `auto` on this device: **{G.resolve_gmm('auto')}** (GPU preference {', '.join(G.GPU_PREFERENCE)}; "
        f"usable: {', '.join(n for n in G.GPU_PREFERENCE if G.gmm_usable(n)) or 'none'}). "
        f"d={a.d}, {a.tokens} tokens, bfloat16, {a.repeats} timed repeats; MFU vs the measured peak.",
        flush=True,
    )
    cfgs, rows, notes, took = ML.layer_configs(a.d), {b: [] for b in backends}, [], {}
    try:
        for name in a.layers:
            for b in backends:
                if not budget.fits(took.get(b, max(took.values(), default=0.0))):
                    notes.append(f"skipped {name} with `{b}` (section budget: {budget.left():.0f} s left)")
                    continue
                t0 = time.monotonic()
                try:
                    rows[b] += ML.measure_many({name: cfgs[name]}, a.d, a.tokens, a.repeats, "bfloat16", _select(b))
                    r = rows[b][-1]
                    print(f"  {name} / {b}: MoE/dense {r.ratio:.3f}", file=sys.stderr, flush=True)
                except Exception as err:  # noqa: BLE001 (one backend failing must not stop the others)
                    notes.append(f"{name} with `{b}` failed: {_first_line(err)}")
                took[b] = time.monotonic() - t0
    finally:
        for b in backends:
            print(f"\n#### gmm backend `{b}`\n")
            ML.print_table(rows[b], state.get("peak")) if rows[b] else print("(no rows)")
        for note in notes:
            print(f"- {note}")


def _tiny(cfg):
    """The dry run's stand-in for a 2B model: one layer, d=64 (same kinds of layers and experts)."""
    cfg = cfg.replace(d_model=64, num_layers=1, num_heads=2, head_dim=32, ffn_dim=128, vocab_size=512)
    return cfg.replace_moe(expert_dim=32) if cfg.moe is not None else cfg


def train_configs(a) -> dict:
    """The paper's 2B DeepSeekMoE and Dense (gin/models/*_2b.gin) in bfloat16 compute, MoE on --train_gmm."""
    import gin
    from moe_jax.configs.gin_utils import model_config_from_gin

    cfgs = {}
    for name in ("deepseekmoe", "dense"):
        try:
            cfg = model_config_from_gin([f"models/{name}_2b.gin"]).replace(dtype="bfloat16")
        finally:
            gin.clear_config()
        cfg = _tiny(cfg) if a.dry_run else cfg
        cfgs[f"{name}_2b"] = cfg.replace_moe(gmm_backend=a.train_gmm) if cfg.moe is not None else cfg
    return cfgs


def section_train(a, budget: Budget, state: dict) -> None:
    import jax

    from benchmarks import train_step as TS

    cfgs = train_configs(a)
    gmm = _select(a.train_gmm)
    print(
        f"gmm `{a.train_gmm}` = **{gmm}** | batch {a.batch} x seq {a.seq} = {a.batch * a.seq} tokens/step | "
        f"bfloat16 compute, float32 params, AdamW | {a.steps} timed steps each",
        flush=True,
    )
    # The last section: a model starts while time is left (the dense one needs far less than the MoE
    # one measured first); the overall alarm stops one that overruns, and the table keeps the others.
    runs, notes = {}, []
    try:
        for name, cfg in cfgs.items():
            if not budget.fits(0.0):
                notes.append(f"skipped {name} (section budget: {budget.left():.0f} s left)")
                continue
            t0 = time.monotonic()
            try:
                r = TS.measure_models({name: cfg}, a.batch, a.seq, a.steps)[name]
                r.pop("state"), r.pop("step")  # free the model before the next
                runs[name] = r
            except Exception as err:  # noqa: BLE001
                notes.append(f"{name} failed: {_first_line(err)}")
            print(f"  {name}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        if runs:
            TS.print_models(runs, a.batch, a.seq, state.get("peak") or float("nan"))
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            print(f"\ndevice peak bytes in use (whole process so far): {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
        for note in notes:
            print(f"- {note}")


SECTIONS = {
    "tests": ("GPU-only tests", section_tests),
    "versions": ("Versions", section_versions),
    "peak": ("Matmul peak", section_peak),
    "layers": ("MoE layer vs dense FFN (forward + backward)", section_layers),
    "train": ("2B training step", section_train),
}


def _on_alarm(signum, frame):
    raise Deadline()


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"
    if a.dry_run or EMULATED in (a.backends or []) or a.train_gmm == EMULATED:
        from moe_jax.moe.dispatch import gmm as G
        from moe_jax.moe.dispatch import kernels_mosaic as KM

        G.register_gmm(EMULATED)(functools.partial(KM.mosaic_gmm, kernels=KM.emulated_kernels()))
    budget = Budget(a.budget_s)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, a.budget_s)
    print(
        f"## GPU check{' (dry run on CPU)' if a.dry_run else ''}: `python benchmarks/gpu_check.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`",
        flush=True,
    )
    done, state = [], {}
    try:
        order = [s for s in SECTION_SHARE if s in a.sections]
        for i, name in enumerate(order):
            budget.start(name, order[i:])
            print(f"\n### {SECTIONS[name][0]}\n", flush=True)
            SECTIONS[name][1](a, budget, state)
            done.append(name)
    except Deadline:
        print(
            f"\n**stopped at the overall budget ({a.budget_s:.0f} s)**; not finished: "
            f"{', '.join(s for s in a.sections if s not in done)}"
        )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    from benchmarks.moe_layer import environment

    print(f"\ngpu_check: {budget.elapsed():.0f} s (budget {a.budget_s:.0f} s) | {environment()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

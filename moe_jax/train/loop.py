"""The training loop: build, restore, step, log, evaluate, checkpoint; stop cleanly on NaN or Ctrl-C.

Order of work (every check that can fail runs before anything is compiled):
  1. mesh from MeshConfig; sizes validated against the model and batch;
  2. data loaders opened (a missing/empty cache or a too-long sequence fails here);
  3. abstract train state and its shardings (`moe_jax.train.state`, shared with `moe-jax plan`,
     `load_trained` and `moe-jax import`); the latest checkpoint (if any) verified (checksums, shapes,
     finite values; damaged steps set aside) and restored onto them, otherwise parameters initialised
     directly in their shardings; only now are config.gin and metrics.jsonl touched (moe_jax.train.workdir);
  4. steps; metrics every `log_every`; held-out loss every `eval_every`; checkpoints every
     `checkpoint_every` (async) and at the end, on Ctrl-C/SIGTERM, never after a non-finite step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from tqdm import tqdm

from moe_jax.config import ModelConfig
from moe_jax.data.errors import DataError
from moe_jax.data.loader import TokenLoader
from moe_jax.data.paths import default_cache
from moe_jax.model.params import count_params
from moe_jax.parallel import MeshConfig, ShardingError, build_mesh, describe, shard_batch, validate
from moe_jax.train.alerts import DropWatch
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.config import TrainConfig
from moe_jax.train.heldout import heldout_pass
from moe_jax.train.metrics import MetricsWriter, RoutingChanges, machine_peak_flops, read_metrics, scalar_metrics
from moe_jax.train.state import ShardedTrainState, build_train_state
from moe_jax.train.step import TrainState, make_eval_step, make_routing_probe
from moe_jax.train.validate import validate_run
from moe_jax.train.workdir import check_restore_step, start_run


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class TrainResult:
    """What a finished (or stopped) run reports; also written to `<workdir>/result.json`."""

    workdir: str
    step: int
    train_loss: float
    heldout_loss: float | None
    tokens_per_second: float
    mfu: float
    stopped: str  # "done", "interrupted"
    heldout_bits_per_byte: float | None = None
    data: dict = dataclasses.field(default_factory=dict)  # the token cache trained on: see `data_identity`


def data_identity(meta: dict) -> dict:
    """What identifies a token cache's contents: losses of runs on caches with different identities
    are not comparable (Debian's package versions move, so a later `moe-jax data build` can differ)."""
    return {
        "cache": meta.get("name"),
        "corpus_fingerprint": meta.get("corpus_fingerprint"),
        "vocab_sha256": meta.get("vocab_sha256"),
    }


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (a second Ctrl-C aborts)."""

    def __init__(self):
        self.reason: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        print(f"\n{self.reason} received: saving a checkpoint and stopping (press again to abort)", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _heldout_check(loss: float | None, step: int, ckpt: Checkpointer, writer: MetricsWriter) -> None:
    """A non-finite held-out loss ends the run with an error (exit status 1 from the CLI)."""
    if loss is None or math.isfinite(loss):
        return
    ckpt.close()
    writer.close()
    raise NonFiniteLossError(
        f"held-out loss is {loss} at step {step}, although every parameter is finite: evaluation overflows "
        f"(try ModelConfig.dtype='float32') or the held-out data is broken (rebuild the cache with "
        f"`moe-jax data build --force_cache`). Checkpoints in {ckpt.directory} are kept; no result.json was written."
    )


def _build_mesh(mesh_cfg: MeshConfig | None):
    try:
        return build_mesh(mesh_cfg or MeshConfig())
    except ValueError as err:
        raise ShardingError(f"{err}: change --mesh (or MeshConfig) to use exactly the available devices") from err


@dataclasses.dataclass
class _Data:
    """The token cache of a run, its training loader and a factory for held-out loaders."""

    cache: Path
    loader: TokenLoader
    cfg: TrainConfig

    @classmethod
    def open(cls, model_cfg: ModelConfig, cfg: TrainConfig) -> _Data:
        """Open the training split (a missing/empty cache or a too-long sequence fails here)."""
        cache = default_cache(cfg, model_cfg.vocab_size)
        loader = TokenLoader(
            cache,
            "train",
            cfg.batch_size,
            cfg.seq_len,
            seed=cfg.data_order_seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        cache_vocab = int(loader.meta["vocab"]["size"])
        if cache_vocab != model_cfg.vocab_size:
            raise DataError(
                f"the model's vocab_size={model_cfg.vocab_size} differs from the token cache's {cache_vocab} "
                f"({cache}): set --gin.VOCAB_SIZE={cache_vocab} or build a cache with "
                f"`moe-jax data build --vocab_size {model_cfg.vocab_size}`"
            )
        return cls(cache, loader, cfg)

    def heldout(self, sample: bool) -> TokenLoader:
        """The held-out split: a fixed random sample of rows across every source for periodic
        evaluation (`sample`), the whole split in order for the final one."""
        cfg = self.cfg
        return TokenLoader(
            self.cache,
            cfg.heldout_split,
            cfg.batch_size,
            cfg.seq_len,
            seed=0,
            repeat=False,
            shuffle=sample,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )


def _restore_or_init(
    built: ShardedTrainState, workdir: Path, restore_step: int | None, discard_later_steps: bool, data: _Data
) -> tuple[Checkpointer, TrainState, int | None]:
    """The latest (or `restore_step`) checkpoint, verified and restored onto the state's shardings, else
    parameters initialised in their shardings. Returns (checkpointer, state, restored step or None)."""
    cfg = built.train_cfg
    is_main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(
        workdir,
        keep=cfg.keep_checkpoints,
        async_save=cfg.async_checkpointing,
        log=lambda line: print(line, flush=True) if is_main else None,
    )
    try:  # verified: checksums, shapes against the model, finite values; damaged latest steps set aside
        restored = ckpt.restore_verified(built.restore_target(), restore_step)
        if restored is not None and discard_later_steps:
            ckpt.discard_later_steps(restored[0])
    except BaseException:
        ckpt.close()
        raise
    if restored is None:
        return ckpt, built.init(), None
    step0, state, data_state = restored
    if data_state:  # an imported checkpoint has no data position: start the data from the beginning
        data.loader.set_state(data_state)
    print(f"restored checkpoint {ckpt.directory / str(step0)} (step {int(state.step)})", flush=True)
    return ckpt, state, step0


@dataclasses.dataclass
class _Steps:
    """The compiled functions of a run: the train step, the eval step, the routing probe."""

    train: Callable
    eval: Callable
    probe: Callable

    @classmethod
    def build(cls, built: ShardedTrainState, rest) -> _Steps:
        replicated = built.replicated  # totals and probe ids visible to every process
        return cls(
            train=built.jit_train_step(rest),
            eval=jax.jit(make_eval_step(built.graphdef, rest), out_shardings=replicated),
            probe=jax.jit(make_routing_probe(built.graphdef, rest), out_shardings=replicated),
        )


class _Log:
    """Metrics rows, the progress bar (or plain log lines), throughput and MFU, drop alerts."""

    def __init__(self, workdir: Path, model_cfg: ModelConfig, cfg: TrainConfig):
        self.model_cfg, self.cfg, self.is_main = model_cfg, cfg, jax.process_index() == 0
        self.counts = count_params(model_cfg, cfg.seq_len)
        self.flops_per_token = self.counts.flops / cfg.seq_len
        if cfg.peak_flops_per_device:
            self.peak, self.peak_note = cfg.peak_flops_per_device, "matmul peak from TrainConfig.peak_flops_per_device"
        else:
            self.peak, self.peak_note = machine_peak_flops(jnp.dtype(model_cfg.dtype))
        self.moe_layers = [l for l in range(model_cfg.num_layers) if model_cfg.is_moe_layer(l)]
        self.writer = MetricsWriter(workdir, enabled=self.is_main)
        self.train_loss, self.tokens_per_s, self.mfu = float("nan"), 0.0, 0.0

    def open(self, mesh, cache: Path, start: int, progress: bool) -> None:
        """Print the run's banner, then start the progress bar at `start`."""
        cfg, counts = self.cfg, self.counts
        if self.is_main:
            print(
                f"mesh {describe(mesh)}; {counts.total / 1e6:.2f}M parameters ({counts.activated / 1e6:.2f}M "
                f"activated); {cfg.batch_size} x {cfg.seq_len} tokens per step; data {cache}; MFU against the "
                f"{self.peak_note}",
                flush=True,
            )
        self.window_t, self.window_steps = time.perf_counter(), 0
        # A live bar on a terminal; plain log lines (steps, loss, tokens/s, MFU, ETA) otherwise.
        self.bar = tqdm(
            total=cfg.steps,
            initial=start,
            disable=not (progress and self.is_main and sys.stderr.isatty()),
            unit="step",
            dynamic_ncols=True,
        )
        self.drops = DropWatch(self.model_cfg, log=self.bar.write if self.is_main else lambda line: None)

    def step(self, step: int, metrics: dict, epoch: int) -> None:
        """Count one step; every `log_every` steps (and the last) write the metrics row and report."""
        cfg = self.cfg
        self.window_steps += 1
        self.bar.update(1)
        if not (step % cfg.log_every == 0 or step == cfg.steps):
            return
        host = jax.device_get(metrics)
        elapsed = time.perf_counter() - self.window_t
        self.tokens_per_s = self.window_steps * cfg.batch_size * cfg.seq_len / elapsed
        self.mfu = self.tokens_per_s * self.flops_per_token / (self.peak * jax.device_count())
        self.window_t, self.window_steps = time.perf_counter(), 0
        scalars = scalar_metrics({k: v for k, v in host.items() if k not in ("finite",)}, self.moe_layers)
        scalars.update(tokens_per_second=self.tokens_per_s, mfu=self.mfu, epoch=epoch)
        hist = (
            {f"moe/layer{l}/tokens_per_expert": row for l, row in zip(self.moe_layers, host["tokens_per_expert"])}
            if "tokens_per_expert" in host
            else {}
        )
        self.writer.write(step, scalars, hist)
        self.drops.update(step, scalars)
        self.train_loss = scalars["ce"]
        self.bar.set_postfix(loss=f"{self.train_loss:.4f}", tok_s=f"{self.tokens_per_s:,.0f}", refresh=False)
        if self.bar.disable and self.is_main:
            eta = (cfg.steps - step) * (cfg.batch_size * cfg.seq_len) / max(self.tokens_per_s, 1e-9)
            print(
                f"step {step}/{cfg.steps}  loss {self.train_loss:.4f}  {self.tokens_per_s:,.0f} tok/s  "
                f"MFU {self.mfu:.1%}  ETA {eta:.0f}s",
                flush=True,
            )

    def last_logged(self, workdir: Path) -> None:
        """No step ran now (the run had finished): report its last logged step instead."""
        if not math.isnan(self.train_loss):
            return
        logged = [r for r in read_metrics(workdir) if "ce" in r]
        if logged:
            self.train_loss, self.tokens_per_s, self.mfu = (logged[-1][k] for k in ("ce", "tokens_per_second", "mfu"))


def _non_finite(metrics: dict, step: int, last_good: int | None, ckpt: Checkpointer, writer: MetricsWriter):
    """Close the checkpointer and the metrics and raise NonFiniteLossError for `step` (0-based)."""
    ckpt.close()
    where = (
        f"the last good checkpoint is {ckpt.directory / str(last_good)} (step {last_good}); "
        f"it is intact and the run resumes from it"
        if last_good is not None
        else "no checkpoint was written yet"
    )
    writer.close()
    what = "loss" if not math.isfinite(float(metrics["loss"])) else "parameters or optimizer state"
    raise NonFiniteLossError(
        f"non-finite {what} at step {step + 1} (loss={float(metrics['loss'])}, "
        f"grad_norm={float(metrics['grad_norm'])}): stopping; {where}. Lower "
        f"TrainConfig.learning_rate or check the data."
    )


@dataclasses.dataclass
class _Run:
    """What the step loop works with: the compiled steps, the data, the checkpointer and the log."""

    cfg: TrainConfig
    mesh: Any
    steps: _Steps
    data: _Data
    ckpt: Checkpointer
    log: _Log
    routing_changes: RoutingChanges
    heldout_loss: float | None = None
    heldout_bpb: float | None = None

    def evaluate(self, state: TrainState, step: int, *, final: bool) -> None:
        """Held-out loss (a fixed sample every `eval_every` steps, the whole split at the end), written to
        the metrics with the routing changes (periodic only); a non-finite value ends the run with an error."""
        max_batches = 0 if final else self.cfg.eval_batches
        variables = state.variables()  # the parameters, and the router bias of a model with one
        ho = heldout_pass(self.steps.eval, variables, self.data.heldout(not final), self.mesh, max_batches)
        self.heldout_loss, self.heldout_bpb = ho.loss, ho.bits_per_byte
        changes = {} if final else self.routing_changes.update(variables)
        self.log.writer.write(step, {"heldout/loss": ho.loss, "heldout/bits_per_byte": ho.bits_per_byte, **changes})
        _heldout_check(ho.loss, step, self.ckpt, self.log.writer)
        if not final and self.log.is_main:
            self.log.bar.write(f"step {step}: held-out loss {ho.loss:.4f} ({ho.bits_per_byte:.3f} bits/byte)")

    def steps_until_done(self, state: TrainState, start: int, last_good: int | None) -> tuple[TrainState, str]:
        """Train from `start` to `cfg.steps` (or a stop signal); returns the state and "done"/"interrupted"."""
        cfg, ckpt = self.cfg, self.ckpt
        base_key = jax.random.key(cfg.seed)
        with _StopFlag() as stop, jax.set_mesh(self.mesh):
            step = start
            while step < cfg.steps:
                batch = shard_batch(next(self.data.loader), self.mesh)
                state, metrics = self.steps.train(state, batch, jax.random.fold_in(base_key, step))
                if not bool(metrics["finite"]):
                    _non_finite(metrics, step, last_good, ckpt, self.log.writer)
                step += 1
                self.log.step(step, metrics, self.data.loader.epoch)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    self.evaluate(state, step, final=False)
                if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop.reason:
                    ckpt.save(step, state, self.data.loader.get_state())
                    last_good = step
                if stop.reason:
                    return state, "interrupted"
        return state, "done"


def _routing_changes(workdir: Path, steps: _Steps, data: _Data, mesh, log: _Log, state, start: int):
    """The routing of one fixed held-out batch, compared between evaluations (recorded at step 0)."""
    with jax.set_mesh(mesh):
        changes = RoutingChanges(
            workdir, steps.probe, shard_batch(next(data.heldout(True)), mesh), log.moe_layers, enabled=log.is_main
        )
        if start == 0 and log.moe_layers:
            changes.update(state.variables())  # the routing at initialisation
    return changes


def train(
    workdir: str | Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    mesh_cfg: MeshConfig | None = None,
    *,
    restore_step: int | None = None,
    progress: bool = True,
    gin_config: str | None = None,
    discard_later_steps: bool = False,
) -> TrainResult:
    """Train `model_cfg` as `cfg` says, in `workdir` (resuming from its latest checkpoint).

    Nothing is written to `workdir` before the configuration, the mesh, the data and the checkpoint to
    restore are checked; `gin_config` then becomes `workdir/config.gin` (a different previous one is kept).
    `restore_step` with later checkpoints present is refused unless `discard_later_steps` sets them aside.
    """
    workdir = Path(workdir)
    # 1. Mesh and sizes (before any compile).
    mesh = _build_mesh(mesh_cfg)
    validate_run(model_cfg, cfg, mesh)
    check_restore_step(workdir, restore_step, discard_later_steps)
    built = build_train_state(model_cfg, cfg, mesh, global_batch=cfg.batch_size)
    if cfg.grad_accum_steps > 1:
        validate(model_cfg, mesh, cfg.batch_size // cfg.grad_accum_steps)  # micro-batches split over the mesh too
    # 2. Data.
    data = _Data.open(model_cfg, cfg)
    # 3. State: restored onto its shardings, or initialised in them.
    rest = built.rest()
    ckpt, state, step0 = _restore_or_init(built, workdir, restore_step, discard_later_steps, data)
    start = int(state.step)
    if jax.process_index() == 0:  # the run starts: metrics rows it will repeat go (backed up), config.gin is written
        start_run(workdir, start, finished=start >= cfg.steps, gin_config=gin_config)
    # 4. Compiled steps, 5. logging.
    steps = _Steps.build(built, rest)
    log = _Log(workdir, model_cfg, cfg)
    run = _Run(cfg, mesh, steps, data, ckpt, log, _routing_changes(workdir, steps, data, mesh, log, state, start))
    log.open(mesh, data.cache, start, progress)
    state, stopped = run.steps_until_done(state, start, start if step0 is not None else None)
    log.bar.close()
    ckpt.close()
    # 6. The final held-out evaluation (whole split), 7. the report.
    if stopped == "done":
        with jax.set_mesh(mesh):
            run.evaluate(state, int(state.step), final=True)
    log.writer.close()
    log.last_logged(workdir)
    return _report(workdir, int(state.step), run, stopped)


def _report(workdir: Path, step: int, run: _Run, stopped: str) -> TrainResult:
    """The run's `TrainResult`, also written to `<workdir>/result.json` (by the main process)."""
    log = run.log
    result = TrainResult(
        workdir=str(workdir),
        step=step,
        train_loss=log.train_loss,
        heldout_loss=run.heldout_loss,
        tokens_per_second=log.tokens_per_s,
        mfu=log.mfu,
        stopped=stopped,
        data=data_identity(run.data.loader.meta),
        heldout_bits_per_byte=run.heldout_bpb,
    )
    if log.is_main:
        (workdir / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")
    return result

"""The training loop: build, restore, step, log, evaluate, checkpoint; stop cleanly on NaN or Ctrl-C.

Order of work (every check that can fail runs before anything is compiled):
  1. mesh from MeshConfig; sizes validated against the model and batch;
  2. data loaders opened (a missing/empty cache or a too-long sequence fails here);
  3. abstract train state and its shardings; the latest checkpoint (if any) verified (checksums, shapes,
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

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from moe_jax.config import ModelConfig
from moe_jax.configs.params import count_params
from moe_jax.data import paths as data_paths
from moe_jax.data.errors import DataError
from moe_jax.data.loader import TokenLoader
from moe_jax.evaluate.heldout import heldout_pass
from moe_jax.model.transformer import Transformer
from moe_jax.parallel import MeshConfig, ShardingError, build_mesh, describe, shard_batch, validate
from moe_jax.parallel.rules import batch_sharding, state_shardings, tree_shardings_like
from moe_jax.train.alerts import DropWatch
from moe_jax.train.checkpoint import Checkpointer, abstract_like
from moe_jax.train.config import TrainConfig
from moe_jax.train.metrics import MetricsWriter, RoutingChanges, machine_peak_flops, read_metrics, scalar_metrics
from moe_jax.train.optimizer import learning_rate_schedule, make_optimizer
from moe_jax.train.step import TrainState, make_eval_step, make_routing_probe, make_train_step
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


def default_cache(cfg: TrainConfig, vocab_size: int) -> Path:
    """The cache `moe-jax data build` writes for this vocabulary (any sequence length >= seq_len)."""
    if cfg.data_cache:
        return Path(cfg.data_cache)
    root = data_paths.data_dir()
    built = {}
    for p in (root / "cache").glob(f"default_v{vocab_size}_s*"):
        length = p.name.rsplit("_s", 1)[1]
        if length.isdigit() and (p / "meta.json").exists():
            built[int(length)] = p
    usable = [built[n] for n in sorted(built) if n % cfg.seq_len == 0]
    if usable:
        return usable[0]
    return data_paths.cache_dir(root, vocab_size=vocab_size)  # the loader's error names the fix


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
    is_main = jax.process_index() == 0

    # 1. Mesh and sizes (before any compile).
    try:
        mesh = build_mesh(mesh_cfg or MeshConfig())
    except ValueError as err:
        raise ShardingError(f"{err}: change --mesh (or MeshConfig) to use exactly the available devices") from err
    validate_run(model_cfg, cfg, mesh)
    check_restore_step(workdir, restore_step, discard_later_steps)
    make_model = lambda: Transformer(model_cfg, nnx.Rngs(cfg.seed))
    abstract_model = nnx.eval_shape(make_model)
    graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
    validate(model_cfg, mesh, cfg.batch_size, state=nnx.state(abstract_model))
    if cfg.grad_accum_steps > 1:
        validate(model_cfg, mesh, cfg.batch_size // cfg.grad_accum_steps)  # micro-batches split over the mesh too

    # 2. Data.
    cache = default_cache(cfg, model_cfg.vocab_size)
    loader = TokenLoader(
        cache,
        "train",
        cfg.batch_size,
        cfg.seq_len,
        seed=cfg.seed,
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

    def heldout_loader(sample: bool):
        """The held-out split: a fixed random sample of rows across every source for periodic
        evaluation (`sample`), the whole split in order for the final one."""
        return TokenLoader(
            cache,
            cfg.heldout_split,
            cfg.batch_size,
            cfg.seq_len,
            seed=0,
            repeat=False,
            shuffle=sample,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    # 3. State: shardings, then restore or initialise.
    tx = make_optimizer(cfg)
    schedule = learning_rate_schedule(cfg)
    param_sh = state_shardings(abstract_params, mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = tree_shardings_like(abstract_opt, abstract_params, param_sh, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh)
    # Non-parameter state (hash-routing tables): built under jit straight into its shardings.
    rest = jax.jit(
        lambda: nnx.split(make_model(), nnx.Param, ...)[2], out_shardings=state_shardings(abstract_rest, mesh)
    )()

    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(
        workdir,
        keep=cfg.keep_checkpoints,
        async_save=cfg.async_checkpointing,
        log=lambda line: print(line, flush=True) if is_main else None,
    )
    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt
    )
    try:  # verified: checksums, shapes against the model, finite values; damaged latest steps set aside
        restored = ckpt.restore_verified(abstract_like(abstract_state, state_sh), restore_step)
        if restored is not None and discard_later_steps:
            ckpt.discard_later_steps(restored[0])
    except BaseException:
        ckpt.close()
        raise
    step0 = None if restored is None else restored[0]
    if restored is not None:
        _, state, data_state = restored
        if data_state:  # an imported checkpoint has no data position: start the data from the beginning
            loader.set_state(data_state)
        print(f"restored checkpoint {ckpt.directory / str(step0)} (step {int(state.step)})", flush=True)
    else:

        def init():
            params = nnx.state(make_model(), nnx.Param)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

        state = jax.jit(init, out_shardings=state_sh)()
    start = int(state.step)
    if is_main:  # the run starts: metrics rows it will repeat go (backed up), config.gin is written
        start_run(workdir, start, finished=start >= cfg.steps, gin_config=gin_config)

    # 4. Steps.
    train_step = jax.jit(
        make_train_step(graphdef, rest, tx, schedule, cfg.grad_accum_steps),
        in_shardings=(state_sh, batch_sharding(mesh), replicated),
        out_shardings=(state_sh, None),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(make_eval_step(graphdef, rest), out_shardings=replicated)  # totals visible to every process
    counts = count_params(model_cfg, cfg.seq_len)
    flops_per_token = counts.flops / cfg.seq_len
    if cfg.peak_flops_per_device:
        peak, peak_note = cfg.peak_flops_per_device, "matmul peak from TrainConfig.peak_flops_per_device"
    else:
        peak, peak_note = machine_peak_flops(jnp.dtype(model_cfg.dtype))
    moe_layers = [l for l in range(model_cfg.num_layers) if model_cfg.is_moe_layer(l)]
    writer = MetricsWriter(workdir, enabled=is_main)
    probe = jax.jit(make_routing_probe(graphdef, rest), out_shardings=replicated)
    with jax.set_mesh(mesh):
        routing_changes = RoutingChanges(
            workdir, probe, shard_batch(next(heldout_loader(True)), mesh), moe_layers, enabled=is_main
        )
        if start == 0 and moe_layers:
            routing_changes.update(state.params)  # the routing at initialisation
    if is_main:
        print(
            f"mesh {describe(mesh)}; {counts.total / 1e6:.2f}M parameters ({counts.activated / 1e6:.2f}M "
            f"activated); {cfg.batch_size} x {cfg.seq_len} tokens per step; data {cache}; MFU against the "
            f"{peak_note}",
            flush=True,
        )

    base_key = jax.random.key(cfg.seed)
    last_good = start if step0 is not None else None
    train_loss = float("nan")
    ho_loss = ho_bpb = None
    tokens_per_s = mfu = 0.0
    window_t, window_steps = time.perf_counter(), 0
    # A live bar on a terminal; plain log lines (steps, loss, tokens/s, MFU, ETA) otherwise.
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        disable=not (progress and is_main and sys.stderr.isatty()),
        unit="step",
        dynamic_ncols=True,
    )
    drops = DropWatch(model_cfg, log=bar.write if is_main else lambda line: None)
    stopped = "done"
    with _StopFlag() as stop, jax.set_mesh(mesh):
        step = start
        while step < cfg.steps:
            batch = shard_batch(next(loader), mesh)
            state, metrics = train_step(state, batch, jax.random.fold_in(base_key, step))
            if not bool(metrics["finite"]):
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
            step += 1
            window_steps += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                host = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_t
                tokens_per_s = window_steps * cfg.batch_size * cfg.seq_len / elapsed
                mfu = tokens_per_s * flops_per_token / (peak * jax.device_count())
                window_t, window_steps = time.perf_counter(), 0
                scalars = scalar_metrics({k: v for k, v in host.items() if k not in ("finite",)}, moe_layers)
                scalars.update(tokens_per_second=tokens_per_s, mfu=mfu, epoch=loader.epoch)
                hist = (
                    {f"moe/layer{l}/tokens_per_expert": row for l, row in zip(moe_layers, host["tokens_per_expert"])}
                    if "tokens_per_expert" in host
                    else {}
                )
                writer.write(step, scalars, hist)
                drops.update(step, scalars)
                train_loss = scalars["ce"]
                bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                if bar.disable and is_main:
                    eta = (cfg.steps - step) * (cfg.batch_size * cfg.seq_len) / max(tokens_per_s, 1e-9)
                    print(
                        f"step {step}/{cfg.steps}  loss {train_loss:.4f}  {tokens_per_s:,.0f} tok/s  "
                        f"MFU {mfu:.1%}  ETA {eta:.0f}s",
                        flush=True,
                    )
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                ho = heldout_pass(eval_step, state.params, heldout_loader(True), mesh, cfg.eval_batches)
                ho_loss, ho_bpb = ho.loss, ho.bits_per_byte
                writer.write(
                    step,
                    {"heldout/loss": ho_loss, "heldout/bits_per_byte": ho_bpb, **routing_changes.update(state.params)},
                )
                _heldout_check(ho_loss, step, ckpt, writer)
                if is_main:
                    bar.write(f"step {step}: held-out loss {ho_loss:.4f} ({ho_bpb:.3f} bits/byte)")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop.reason:
                ckpt.save(step, state, loader.get_state())
                last_good = step
            if stop.reason:
                stopped = "interrupted"
                break
    bar.close()
    ckpt.close()
    if stopped == "done":
        with jax.set_mesh(mesh):
            ho = heldout_pass(eval_step, state.params, heldout_loader(False), mesh)
            ho_loss, ho_bpb = ho.loss, ho.bits_per_byte
        writer.write(int(state.step), {"heldout/loss": ho_loss, "heldout/bits_per_byte": ho_bpb})
        _heldout_check(ho_loss, int(state.step), ckpt, writer)
    writer.close()
    if math.isnan(train_loss):  # no step ran now (the run had finished): report its last logged step
        logged = [r for r in read_metrics(workdir) if "ce" in r]
        if logged:
            train_loss, tokens_per_s, mfu = logged[-1]["ce"], logged[-1]["tokens_per_second"], logged[-1]["mfu"]
    result = TrainResult(
        workdir=str(workdir),
        step=int(state.step),
        train_loss=train_loss,
        heldout_loss=ho_loss,
        tokens_per_second=tokens_per_s,
        mfu=mfu,
        stopped=stopped,
        data=data_identity(loader.meta),
        heldout_bits_per_byte=ho_bpb,
    )
    if is_main:
        (workdir / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")
    return result

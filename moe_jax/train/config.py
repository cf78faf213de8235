"""`TrainConfig`: what a training run does (paper §4: optimizer, schedule, batch, checkpoints, logging).

Gin binds it from the run files (`gin/runs/*.gin` via `gin/runs/trainer.gin`'s macros); the command
line overrides any field: `--gin.TrainConfig.steps=100` or the macro `--gin.TRAIN_STEPS=100`.
"""

from __future__ import annotations

import dataclasses

import gin

SCHEDULES = ("step_decay", "constant")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run.

    Attributes:
      steps: optimizer steps.
      batch_size: global batch in sequences (over all processes and devices).
      seq_len: tokens per sequence.
      learning_rate: peak learning rate (2B: 1.08e-3, 16B: 4.2e-4, 145B: 3.0e-4).
      warmup_steps: linear warmup from 0 to the peak (paper: 2000).
      schedule: "step_decay" (x decay_factor at each of decay_boundaries, as fractions of `steps`;
        paper 2B/16B) or "constant" after warmup (paper 145B).
      decay_boundaries: fractions of `steps` where the learning rate is multiplied by decay_factor.
      decay_factor: the step-decay multiplier (paper: 0.316).
      weight_decay: AdamW decoupled weight decay (paper: 0.1).
      decay_norms: also decay RMSNorm scales (off: norms are excluded, as are biases, of which the
        model has none).
      beta1, beta2, adam_eps: AdamW moments (paper: 0.9, 0.95; eps unstated, 1e-8).
      grad_clip: global gradient-norm clipping (paper: 1.0); 0 disables.
      grad_accum_steps: split each batch into this many micro-batches and accumulate gradients.
      seed: seed of parameter initialisation, stochastic routing and (unless data_seed is set) data order.
      data_seed: seed of the training data order alone; None = `seed`. Setting it apart from `seed`
        separates a run-to-run spread into what the initialisation and what the order of the batches
        contribute (e.g. two initialisations trained on the same batches); `data_order_seed` is the one used.
      data_cache: directory of the token cache (`moe-jax data build`); "" = the default cache.
      heldout_split: the cache split used for periodic held-out evaluation.
      log_every: steps between metric records (TensorBoard, metrics.jsonl, console).
      eval_every: steps between held-out evaluations; 0 = only at the end.
      eval_batches: held-out batches per periodic evaluation (a fixed random sample of rows over every
        source); 0 = the whole split. The final evaluation always reads the whole held-out split.
      checkpoint_every: steps between checkpoints.
      keep_checkpoints: how many recent checkpoints to keep.
      async_checkpointing: write checkpoints in the background (orbax).
      peak_flops_per_device: FLOP/s used for model-FLOPs utilisation; 0 = the machine's matmul peak in
        the compute dtype, measured once per machine and usable core count and then read from a cache
        (`moe_jax.train.metrics.machine_peak_flops`), so that the MFU of runs on one machine compare.
    """

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 256
    learning_rate: float = 1.08e-3
    warmup_steps: int = 30
    schedule: str = "step_decay"
    decay_boundaries: tuple = (0.8, 0.9)
    decay_factor: float = 0.316
    weight_decay: float = 0.1
    decay_norms: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    seed: int = 0
    data_seed: int | None = None
    data_cache: str = ""
    heldout_split: str = "heldout"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 16
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    peak_flops_per_device: float = 0.0

    @property
    def data_order_seed(self) -> int:
        """The seed of the training data order: `data_seed`, else `seed`."""
        return self.seed if self.data_seed is None else self.data_seed

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule={self.schedule!r} is not one of {SCHEDULES}")
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum_steps",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"TrainConfig.batch_size={self.batch_size} does not divide into "
                f"grad_accum_steps={self.grad_accum_steps} micro-batches"
            )
        if not self.learning_rate > 0:
            raise ValueError(
                f"TrainConfig.learning_rate={self.learning_rate} must be > 0 (a negative rate climbs the "
                f"loss): set --gin.LEARNING_RATE to a positive value such as 1e-3"
            )
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps} must be in [0, steps={self.steps}]")

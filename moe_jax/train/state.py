"""The sharded train state: the one recipe for the model + optimizer state and their shardings.

    built = build_train_state(model_cfg, train_cfg, mesh, global_batch=train_cfg.batch_size)
    state = built.init()                       # or ckpt.restore(step, built.restore_target())
    step = built.jit_train_step(built.rest())  # the trainer's compiled step

`moe-jax train` (`moe_jax.train.loop`), `load_trained` (`moe_jax.train.restore`), `moe-jax plan`
(`moe_jax.train.plan`), `moe-jax import` (`moe_jax.export.hf.import_hf`) and `moe-jax upcycle`
(`moe_jax.train.upcycle`) all build their state here,
so the step `plan` compiles is the step the trainer runs, and a checkpoint written by one loads in all.
Nothing is allocated until `init`, `rest` or `from_params` is called: the rest is abstract
(`jax.ShapeDtypeStruct`) and cheap for any model size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax.config import ModelConfig
from moe_jax.model.transformer import Transformer
from moe_jax.moe.router import RouterBias
from moe_jax.parallel import validate
from moe_jax.parallel.rules import batch_sharding, state_shardings, tree_shardings_like
from moe_jax.train.checkpoint import abstract_like
from moe_jax.train.config import TrainConfig
from moe_jax.train.optimizer import learning_rate_schedule, make_optimizer
from moe_jax.train.step import TrainState, make_train_step

BATCH_FEATURES = (
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
    "decoder_segment_ids",
    "decoder_positions",
)


@dataclasses.dataclass(frozen=True, eq=False)
class ShardedTrainState:
    """The abstract train state of one model on one mesh, with the shardings every array gets.

    Attributes:
      model_cfg, train_cfg: what it was built from (`train_cfg` gives the seed and the optimizer).
      mesh: the device mesh the shardings refer to.
      graphdef: the model's nnx graph (structure without arrays).
      abstract: `TrainState` of `jax.ShapeDtypeStruct` (step, params, opt_state, and router_bias for a
        model with DeepSeek-V3's selection bias, else None).
      shardings: `TrainState` of `NamedSharding`, the same structure (step replicated, parameters and the
        router bias by the logical-axis rules of `moe_jax.parallel.rules`, optimizer state like the
        parameter it tracks).
      abstract_rest: the fixed non-parameter state (hash-routing tables), abstract; the router bias,
        which training moves, is in the `TrainState` instead.
      model_state: the whole abstract model state (what `moe_jax.parallel.validate` checks).
      tx: the optimizer (`moe_jax.train.optimizer.make_optimizer(train_cfg)`).
    """

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    mesh: Any
    graphdef: nnx.GraphDef
    abstract: TrainState
    shardings: TrainState
    abstract_rest: nnx.State
    model_state: nnx.State
    tx: optax.GradientTransformation

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def make_model(self) -> Transformer:
        """A freshly initialised model (seeded by `train_cfg.seed`); call under jit for sharded arrays."""
        return Transformer(self.model_cfg, nnx.Rngs(self.train_cfg.seed))

    def init(self) -> TrainState:
        """Step 0: parameters initialised directly in their shardings, optimizer state from them."""

        def init():
            _, params, bias, _ = nnx.split(self.make_model(), nnx.Param, RouterBias, ...)
            return TrainState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                opt_state=self.tx.init(params),
                router_bias=bias if self.abstract.router_bias is not None else None,
            )

        return jax.jit(init, out_shardings=self.shardings)()

    def rest(self) -> nnx.State:
        """The fixed non-parameter state (hash-routing tables), built under jit straight into its shardings."""
        rest_sh = state_shardings(self.abstract_rest, self.mesh)
        return jax.jit(lambda: nnx.split(self.make_model(), nnx.Param, RouterBias, ...)[3], out_shardings=rest_sh)()

    def initial_router_bias(self) -> nnx.State | None:
        """The router bias of step 0 (zeros) in its shardings; None for a model without one."""
        if self.abstract.router_bias is None:
            return None
        make = lambda: nnx.split(self.make_model(), nnx.Param, RouterBias, ...)[2]
        return jax.jit(make, out_shardings=self.shardings.router_bias)()

    def restore_target(self) -> TrainState:
        """What a checkpoint restores onto: the abstract state carrying its shardings."""
        return abstract_like(self.abstract, self.shardings)

    def from_params(self, params: nnx.State, step: int, router_bias: nnx.State | None = None) -> TrainState:
        """A state at `step` around given parameter values (placed in their shardings), with the optimizer
        state (`tx.init`) a fresh run would have and the given router bias (default: zeros, as a fresh run),
        e.g. for weights imported from another format or upcycled from a dense model."""
        params = jax.device_put(params, self.shardings.params)
        opt_state = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)(params)
        step = jax.device_put(jnp.asarray(step, jnp.int32), self.replicated)
        if router_bias is None:
            router_bias = self.initial_router_bias()
        elif self.abstract.router_bias is None:
            raise ValueError("from_params: a router bias was given for a model without a selection bias")
        else:
            router_bias = jax.device_put(router_bias, self.shardings.router_bias)
        return TrainState(step=step, params=params, opt_state=opt_state, router_bias=router_bias)

    def abstract_batch(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes of one global batch of seqio decoder features ([batch_size, seq_len] int32)."""
        return {n: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32) for n in BATCH_FEATURES}

    def jit_train_step(self, rest: nnx.State) -> Callable:
        """The trainer's step, jitted with the state's shardings (the state argument is donated):
        `step(state, batch, rng) -> (state, metrics)`."""
        cfg = self.train_cfg
        speed = self.model_cfg.moe.bias_update_speed if self.model_cfg.moe is not None else 0.0
        return jax.jit(
            make_train_step(self.graphdef, rest, self.tx, learning_rate_schedule(cfg), cfg.grad_accum_steps, speed),
            in_shardings=(self.shardings, batch_sharding(self.mesh), self.replicated),
            out_shardings=(self.shardings, None),
            donate_argnums=(0,),
        )

    def lower_train_step(self, rest: nnx.State, batch_size: int, seq_len: int):
        """`jit_train_step(rest)` lowered on abstract inputs (nothing allocated), ready to `.compile()`."""
        step = self.jit_train_step(rest)
        rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
        with jax.set_mesh(self.mesh):
            return step.lower(self.abstract, self.abstract_batch(batch_size, seq_len), rng)


def build_train_state(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    mesh,
    *,
    global_batch: int | None = None,
    num_devices: int | None = None,
) -> ShardedTrainState:
    """The abstract train state of `model_cfg` trained as `train_cfg`, sharded over `mesh`.

    Args:
      global_batch: if given, check first that the model, this batch and the mesh fit together
        (`moe_jax.parallel.validate`; raises `ShardingError` listing every problem).
      num_devices: the devices the mesh must cover in that check (default: `jax.device_count()`).
    """
    make_model = lambda: Transformer(model_cfg, nnx.Rngs(train_cfg.seed))
    abstract_model = nnx.eval_shape(make_model)
    graphdef, abstract_params, abstract_bias, abstract_rest = nnx.split(abstract_model, nnx.Param, RouterBias, ...)
    abstract_bias = abstract_bias if jax.tree.leaves(abstract_bias) else None  # None: no field in TrainState
    model_state = nnx.state(abstract_model)
    if global_batch is not None:
        validate(model_cfg, mesh, global_batch, state=model_state, num_devices=num_devices)
    tx = make_optimizer(train_cfg)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    param_sh = state_shardings(abstract_params, mesh)
    opt_sh = tree_shardings_like(abstract_opt, abstract_params, param_sh, mesh)
    bias_sh = None if abstract_bias is None else state_shardings(abstract_bias, mesh)
    replicated = NamedSharding(mesh, P())
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=abstract_params,
        opt_state=abstract_opt,
        router_bias=abstract_bias,
    )
    return ShardedTrainState(
        model_cfg=model_cfg,
        train_cfg=train_cfg,
        mesh=mesh,
        graphdef=graphdef,
        abstract=abstract,
        shardings=TrainState(step=replicated, params=param_sh, opt_state=opt_sh, router_bias=bias_sh),
        abstract_rest=abstract_rest,
        model_state=model_state,
        tx=tx,
    )

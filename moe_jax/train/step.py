"""The train and eval steps as pure functions of an explicit `TrainState`.

    state, metrics = train_step(state, batch, rng)

`batch` holds the seqio decoder features ([B, S] int32): decoder_input_tokens, decoder_target_tokens,
decoder_loss_weights, decoder_segment_ids, decoder_positions. A non-finite loss, gradient, updated parameter
or optimizer state leaves the state unchanged and reports `finite = False`, so the loop can stop with the
last good state intact. A model with DeepSeek-V3's selection bias (`MoEConfig.selection_bias`) has it moved
here after every step, outside the gradient, from the step's expert load (`update_router_bias`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax.model.transformer import ModelOutput
from moe_jax.moe.gating import selection_load, update_selection_bias
from moe_jax.train.loss import cross_entropy


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a checkpoint holds besides the data position.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: the nnx.Param variables of the model.
      opt_state: optax state over `params`.
      router_bias: the `RouterBias` variables (DeepSeek-V3's selection bias, one [layers_in_stack, E] array
        per MoE layer stack), moved by the train step outside the gradient; None for a model without them.
        A None field is no pytree child: such a state flattens, and is checkpointed, exactly as before the
        field existed, so checkpoints written before it restore unchanged.
    """

    step: jax.Array
    params: nnx.State
    opt_state: Any
    router_bias: nnx.State | None = None

    def replace(self, **changes) -> "TrainState":
        return dataclasses.replace(self, **changes)

    def variables(self) -> nnx.State:
        """What a forward takes besides the fixed non-trainable state (`rest`): the parameters, with the
        router bias merged in when there is one (evaluation must select experts as training does)."""
        return self.params if self.router_bias is None else nnx.merge_state(self.params, self.router_bias)


def _state_fields(state: TrainState) -> tuple[str, ...]:
    """The pytree children of a state: router_bias only where there is one."""
    return ("step", "params", "opt_state") + (() if state.router_bias is None else ("router_bias",))


def _flatten_with_keys(state: TrainState):
    names = _state_fields(state)
    return [(jax.tree_util.GetAttrKey(n), getattr(state, n)) for n in names], names


def _unflatten(names: tuple[str, ...], children) -> TrainState:
    return TrainState(**dict(zip(names, children)))


def _flatten(state: TrainState):
    names = _state_fields(state)
    return [getattr(state, n) for n in names], names


# Keys as flax.struct.dataclass gave them (attribute names), so orbax names the arrays as it always did.
jax.tree_util.register_pytree_with_keys(TrainState, _flatten_with_keys, _unflatten, _flatten)


def _bias_layers(bias: nnx.State) -> list[jax.Array]:
    """The bias arrays [layers_in_stack, E], one per MoE layer stack, in layer order (the order of
    `ModelOutput.expert_ids`): pytree order, which sorts the integer stack indices numerically."""
    return jax.tree.leaves(bias)


def update_router_bias(bias: nnx.State, load: jax.Array, speed: float) -> nnx.State:
    """Every MoE layer's bias moved by V3's rule (`gating.update_selection_bias`) from its load [L_moe, E]."""
    leaves, treedef = jax.tree.flatten(bias)
    bounds = [0]
    for leaf in leaves:
        bounds.append(bounds[-1] + leaf.shape[0])
    if bounds[-1] != load.shape[0]:
        raise ValueError(f"router bias covers {bounds[-1]} MoE layers but the load has {load.shape[0]}")
    new = [update_selection_bias(b, load[lo:hi], speed) for b, lo, hi in zip(leaves, bounds, bounds[1:])]
    return jax.tree.unflatten(treedef, new)


def bias_range(bias: nnx.State) -> jax.Array:
    """[L_moe] max_i b_i - min_i b_i of every MoE layer: how far the selection bias has spread."""
    stacked = jnp.concatenate(_bias_layers(bias))
    return stacked.max(axis=-1) - stacked.min(axis=-1)


def model_inputs(batch: dict) -> dict:
    return dict(
        tokens=batch["decoder_input_tokens"],
        positions=batch.get("decoder_positions"),
        segment_ids=batch.get("decoder_segment_ids"),
    )


def forward(graphdef, rest, params, batch: dict, rng) -> ModelOutput:
    return nnx.merge(graphdef, params, rest)(**model_inputs(batch), rng=rng)


def make_train_step(
    graphdef,
    rest,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int = 1,
    bias_update_speed: float = 0.0,
) -> Callable:
    """Build train_step(state, batch, rng) -> (state, metrics) for one model structure.

    `bias_update_speed` is gamma of DeepSeek-V3's selection-bias update (`MoEConfig.bias_update_speed`):
    with a `state.router_bias`, each layer's bias moves after the step by gamma * sign(mean load - load)
    from the load of the whole step (global batch, every micro-batch; integer counts, so the same on any
    mesh), unless the step is not finite. 0 keeps the bias fixed."""

    def loss_fn(params, bias, batch, rng):
        variables = params if bias is None else nnx.merge_state(params, bias)
        out = forward(graphdef, rest, variables, batch, rng)
        ce_sum, count = cross_entropy(out.logits, batch["decoder_target_tokens"], batch.get("decoder_loss_weights"))
        ce = ce_sum / jnp.maximum(count, 1.0)
        load = None  # the selection load [L_moe, E] int32, counted only where it moves a bias
        if bias is not None and bias_update_speed:
            load = selection_load(out.expert_ids, _bias_layers(bias)[0].shape[-1])
        return ce + out.aux_loss, (ce, out.moe_losses, out.stats, count, load)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)  # the gradient of the parameters only

    def accumulate(params, bias, batch, rng):
        if grad_accum_steps == 1:
            return grad_fn(params, bias, batch, rng)
        micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)
        rngs = jax.random.split(rng, grad_accum_steps)

        def body(acc, xs):
            out = grad_fn(params, bias, *xs)
            return jax.tree.map(jnp.add, acc, out), None

        zeros = jax.tree.map(
            jnp.zeros_like, jax.eval_shape(grad_fn, params, bias, jax.tree.map(lambda x: x[0], micro), rngs[0])
        )
        total, _ = jax.lax.scan(body, zeros, (micro, rngs))
        scale = lambda x: x / grad_accum_steps if jnp.issubdtype(x.dtype, jnp.floating) else x
        (loss, (ce, losses, stats, count, load)), grads = jax.tree.map(scale, total)  # int loads stay summed
        return (loss, (ce, losses, stats, count * grad_accum_steps, load)), grads

    def train_step(state: TrainState, batch: dict, rng):
        (loss, (ce, losses, stats, count, load)), grads = accumulate(state.params, state.router_bias, batch, rng)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # The updated parameters and optimizer state too: a damaged moment (e.g. negative) turns finite
        # gradients into NaN updates.
        all_finite = lambda tree: jnp.all(
            jnp.stack(
                [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
                or [jnp.bool_(True)]
            )
        )
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params) & all_finite(opt_state)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        bias = state.router_bias
        if load is not None:
            bias = update_router_bias(bias, load, bias_update_speed)
        new_state = TrainState(
            step=state.step + finite.astype(jnp.int32),
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            router_bias=keep(bias, state.router_bias),
        )
        metrics = {
            "loss": loss,
            "ce": ce,
            "expert_balance": losses.expert_balance,
            "device_balance": losses.device_balance,
            "z_loss": losses.z_loss,
            "comm_balance": losses.comm_balance,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "finite": finite,
            "tokens": count,
        }
        if stats is not None:
            metrics.update({f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)})
        if new_state.router_bias is not None:
            metrics["router_bias_range"] = bias_range(new_state.router_bias)
        return new_state, metrics

    return train_step


def make_routing_probe(graphdef, rest) -> Callable:
    """probe(params, batch) -> [L_moe, B*S, k] int32 routed experts of every token (-1: inactive), or
    None for a dense model: the routing a fixed batch gets, compared between evaluations. `params`:
    `TrainState.variables()` (with the router bias of a model that has one)."""

    def probe(params, batch):
        return forward(graphdef, rest, params, batch, None).expert_ids

    return probe


def make_eval_step(graphdef, rest) -> Callable:
    """eval_step(params, batch) -> per-sequence (nll sum [B], token count [B]). `params`:
    `TrainState.variables()` (with the router bias of a model that has one)."""

    def eval_step(params, batch):
        out = forward(graphdef, rest, params, batch, None)
        logp = jax.nn.log_softmax(out.logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]
        w = batch["decoder_loss_weights"].astype(jnp.float32)
        return jnp.sum(nll * w, axis=1), jnp.sum(w, axis=1)

    return eval_step

"""The train and eval steps as pure functions of an explicit `TrainState`.

    state, metrics = train_step(state, batch, rng)

`batch` holds the seqio decoder features ([B, S] int32): decoder_input_tokens, decoder_target_tokens,
decoder_loss_weights, decoder_segment_ids, decoder_positions. A non-finite loss, gradient, updated parameter
or optimizer state leaves the state unchanged and reports `finite = False`, so the loop can stop with the
last good state intact.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from moe_jax.model.transformer import ModelOutput
from moe_jax.train.loss import cross_entropy


@struct.dataclass
class TrainState:
    """Everything a checkpoint holds besides the data position."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # nnx.Param variables of the model
    opt_state: Any  # optax state over `params`


def model_inputs(batch: dict) -> dict:
    return dict(
        tokens=batch["decoder_input_tokens"],
        positions=batch.get("decoder_positions"),
        segment_ids=batch.get("decoder_segment_ids"),
    )


def forward(graphdef, rest, params, batch: dict, rng) -> ModelOutput:
    return nnx.merge(graphdef, params, rest)(**model_inputs(batch), rng=rng)


def make_train_step(
    graphdef, rest, tx: optax.GradientTransformation, schedule: optax.Schedule, grad_accum_steps: int = 1
) -> Callable:
    """Build train_step(state, batch, rng) -> (state, metrics) for one model structure."""

    def loss_fn(params, batch, rng):
        out = forward(graphdef, rest, params, batch, rng)
        ce_sum, count = cross_entropy(out.logits, batch["decoder_target_tokens"], batch.get("decoder_loss_weights"))
        ce = ce_sum / jnp.maximum(count, 1.0)
        return ce + out.aux_loss, (ce, out.moe_losses, out.stats, count)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(params, batch, rng):
        if grad_accum_steps == 1:
            return grad_fn(params, batch, rng)
        micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)
        rngs = jax.random.split(rng, grad_accum_steps)

        def body(acc, xs):
            out = grad_fn(params, *xs)
            return jax.tree.map(jnp.add, acc, out), None

        zeros = jax.tree.map(
            jnp.zeros_like, jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rngs[0])
        )
        total, _ = jax.lax.scan(body, zeros, (micro, rngs))
        scale = lambda x: x / grad_accum_steps if jnp.issubdtype(x.dtype, jnp.floating) else x
        (loss, (ce, losses, stats, count)), grads = jax.tree.map(scale, total)
        return (loss, (ce, losses, stats, count * grad_accum_steps)), grads

    def train_step(state: TrainState, batch: dict, rng):
        (loss, (ce, losses, stats, count)), grads = accumulate(state.params, batch, rng)
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
        new_state = TrainState(
            step=state.step + finite.astype(jnp.int32),
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
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
        return new_state, metrics

    return train_step


def make_routing_probe(graphdef, rest) -> Callable:
    """probe(params, batch) -> [L_moe, B*S, k] int32 routed experts of every token (-1: inactive), or
    None for a dense model: the routing a fixed batch gets, compared between evaluations."""

    def probe(params, batch):
        return forward(graphdef, rest, params, batch, None).expert_ids

    return probe


def make_eval_step(graphdef, rest) -> Callable:
    """eval_step(params, batch) -> per-sequence (nll sum [B], token count [B])."""

    def eval_step(params, batch):
        out = forward(graphdef, rest, params, batch, None)
        logp = jax.nn.log_softmax(out.logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]
        w = batch["decoder_loss_weights"].astype(jnp.float32)
        return jnp.sum(nll * w, axis=1), jnp.sum(w, axis=1)

    return eval_step

"""One process of the multi-host test (run by test_multihost.py; not a test module).

    python multihost_worker.py --mesh=expert:8 --local_devices=4 --steps=3 \
        --coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I

Trains a tiny DeepSeekMoE model for a few AdamW steps on a mesh spanning every process, each process
feeding only its own rows of the global batch, and prints "LOSSES <json list>" from process 0.
"""

import argparse
import json
import os
import sys


def train_losses(mesh_spec: str, steps: int) -> tuple[list[float], str]:
    """Losses of `steps` AdamW steps of the tiny DeepSeekMoE model on the mesh `mesh_spec` over every
    process's devices, each process feeding only its rows of the (fixed) global batch; and a line
    saying which rows and experts this process held."""
    import jax
    import optax
    from ep_testlib import BATCH, FAST_COMPILE, loss_fn, model_config, tokens
    from ep_testlib import mesh as make_mesh
    from flax import nnx

    from moe_jax.model.transformer import Transformer
    from moe_jax.parallel import abstract_state, create_sharded, process_batch_rows, shard_batch, validate

    cfg = model_config("deepseekmoe")
    mesh = make_mesh(mesh_spec)
    make = lambda: Transformer(cfg, nnx.Rngs(0))
    validate(cfg, mesh, global_batch=BATCH, state=abstract_state(make))
    model = create_sharded(make, mesh)
    graphdef, params, rest_state = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-2)
    opt_state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, opt_state, rest_state, toks, rng):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, rest_state, toks, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rows = process_batch_rows(mesh, BATCH)
    losses = []
    compiled = None
    with jax.set_mesh(mesh):
        for i in range(steps):
            batch = shard_batch(tokens(seed=100)[rows], mesh)  # this process's rows only
            args = (params, opt_state, rest_state, batch, jax.random.key(i))
            if compiled is None:
                compiled = step.lower(*args).compile(compiler_options=FAST_COMPILE)
            params, opt_state, loss = compiled(*args)
            losses.append(float(loss))
    wi = params["stacks"][1]["blocks"]["ffn"]["wi"][...]
    local_experts = sorted({s.index[1].start for s in wi.addressable_shards})
    report = (
        f"PROCESS {jax.process_index()}/{jax.process_count()} devices={jax.local_device_count()} "
        f"rows={rows.start}:{rows.stop} expert_shard_starts={local_experts}"
    )
    return losses, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mesh", default="expert:8")
    parser.add_argument("--local_devices", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args, rest = parser.parse_known_args(argv)
    # Fake CPU devices must be configured before jax is imported.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    from moe_jax.parallel import add_distributed_args, distributed_config_from_args, initialize_distributed

    dist_parser = argparse.ArgumentParser()
    add_distributed_args(dist_parser)
    initialize_distributed(distributed_config_from_args(dist_parser.parse_args(rest)), initialization_timeout=120)

    losses, report = train_losses(args.mesh, args.steps)
    print(report, flush=True)
    import jax

    if jax.process_index() == 0:
        print("LOSSES " + json.dumps(losses), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

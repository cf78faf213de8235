"""The decoder: scanned vs unrolled layers, aux losses reaching the loss, bf16, causality, packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_tree_close, max_rel_err

from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.model.transformer import Transformer
from moe_jax.train.loss import cross_entropy

VOCAB = 97


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB,
        d_model=32,
        num_layers=3,
        num_heads=2,
        head_dim=16,
        ffn_dim=64,
        first_k_dense=1,
        moe=MoEConfig.fine_grained(4, 2, 2, 1, 32, router_z_loss_alpha=1e-3),
    )
    base.update(kw)
    return ModelConfig(**base)


def loss_and_grads(cfg, tokens, seed=0, **call):
    graphdef, params, rest = nnx.split(Transformer(cfg, nnx.Rngs(seed)), nnx.Param, ...)

    def loss_fn(p):
        out = nnx.merge(graphdef, p, rest)(tokens, **call)
        s, n = cross_entropy(out.logits[:, :-1], tokens[:, 1:])
        return s / n + out.aux_loss, out

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


def tokens(b=2, s=16, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, s), 0, VOCAB)


@pytest.mark.slow
def test_layer_pattern_and_segments():
    cfg = small_cfg(num_layers=6, first_k_dense=1, moe_layer_freq=1)
    assert cfg.layer_segments() == [(False, 0, 1), (True, 1, 5)]
    cfg2 = small_cfg(num_layers=6, first_k_dense=1, moe_layer_freq=2)
    assert [cfg2.is_moe_layer(l) for l in range(6)] == [False, False, True, False, True, False]
    assert small_cfg(moe=None).layer_segments() == [(False, 0, 3)]
    model = Transformer(cfg, nnx.Rngs(0))
    assert model.stacks[1].blocks.ffn.wi.shape == (5, 7, 32, 2, 16)  # [layers, E, d, 2, f]
    assert model.stacks[1].blocks.ffn.wi.get_metadata()["axes"] == ("layers", "experts", "embed", None, "expert_mlp")


@pytest.mark.slow
def test_scan_and_unrolled_layers_agree_including_aux_losses():
    toks = tokens()
    (l_scan, out_scan), g_scan = loss_and_grads(small_cfg(scan_layers=True), toks)
    (l_loop, out_loop), g_loop = loss_and_grads(small_cfg(scan_layers=False), toks)
    assert float(out_scan.aux_loss) > 0
    np.testing.assert_allclose(l_scan, l_loop, rtol=1e-6)
    assert_tree_close(out_scan.moe_losses, out_loop.moe_losses, 1e-6)
    assert_tree_close(g_scan, g_loop, 1e-5)
    assert out_scan.stats.tokens_per_expert.shape == (2, 7)  # [MoE layers, routed experts]


@pytest.mark.slow
def test_aux_losses_reach_the_router_gradient_under_scan():
    toks = tokens()
    cfg = small_cfg(scan_layers=True)
    graphdef, params, rest = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param, ...)

    def aux_only(p):
        return nnx.merge(graphdef, p, rest)(toks).aux_loss

    g = jax.grad(aux_only)(params)
    router_grad = g["stacks"][1]["blocks"]["ffn"]["router"]["kernel"][...]
    assert float(jnp.abs(router_grad).sum()) > 0


@pytest.mark.slow
def test_remat_does_not_change_the_numbers():
    toks = tokens()
    (l0, _), g0 = loss_and_grads(small_cfg(remat="none"), toks)
    (l1, _), g1 = loss_and_grads(small_cfg(remat="full"), toks)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    assert_tree_close(g1, g0, 1e-5)


@pytest.mark.slow
def test_bfloat16_forward_backward_is_finite_and_close_to_float32():
    cfg = small_cfg(num_layers=4, d_model=64, init_std=0.02)
    toks = tokens(4, 32)
    (l32, _), _ = loss_and_grads(cfg, toks)
    (l16, _), g16 = loss_and_grads(cfg.replace(dtype="bfloat16"), toks)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g16))
    assert jax.tree.leaves(g16)[0].dtype == jnp.float32  # params (and their grads) stay float32
    assert abs(float(l16) - float(l32)) / float(l32) < 0.02, (float(l16), float(l32))


def test_attention_is_causal():
    cfg = small_cfg()
    model = Transformer(cfg, nnx.Rngs(0))
    a = tokens(1, 16)
    b = a.at[0, 10].set((a[0, 10] + 1) % VOCAB)
    la, lb = model(a).logits, model(b).logits
    np.testing.assert_allclose(la[0, :10], lb[0, :10], rtol=1e-6, atol=1e-7)
    assert not np.allclose(la[0, 10:], lb[0, 10:])


def test_packed_segments_do_not_see_each_other():
    # Dense FFN so that routing (which pools over the whole batch only through balance stats) is irrelevant.
    cfg = small_cfg(moe=None)
    model = Transformer(cfg, nnx.Rngs(0))
    seq = tokens(1, 16)
    seg = jnp.array([[1] * 6 + [2] * 10])
    pos = jnp.array([list(range(6)) + list(range(10))])
    packed = model(seq, positions=pos, segment_ids=seg).logits
    alone = model(seq[:, 6:]).logits
    assert max_rel_err(packed[:, 6:], alone) < 1e-5


def test_dense_model_has_no_moe_outputs():
    out = Transformer(small_cfg(moe=None), nnx.Rngs(0))(tokens())
    assert out.stats is None and float(out.aux_loss) == 0.0
    assert out.logits.shape == (2, 16, VOCAB) and out.logits.dtype == jnp.float32


@pytest.mark.slow
def test_init_std_is_respected():
    model = Transformer(small_cfg(vocab_size=4096, d_model=128, init_std=0.006), nnx.Rngs(0))
    assert abs(float(jnp.std(model.embed[...])) - 0.006) < 3e-4
    np.testing.assert_array_equal(model.final_norm.scale[...], 1.0)


def _forward_oracle(model, toks, positions, segment_ids, rng):
    """The forward as written before the KV cache joined the model (commit 302672d), from the model's
    parts: attention inlined from qkv / attention_mask / output. The training forward must not move a bit."""
    from moe_jax.layers.attention import attention_mask
    from moe_jax.model.transformer import _REMAT_POLICIES
    from moe_jax.moe.layer import MoELosses

    cfg, s = model.cfg, toks.shape[1]
    x = jnp.take(model.embed[...], toks, axis=0).astype(jnp.dtype(cfg.dtype))
    losses, stats, ids = MoELosses.zeros(), [], []
    for stack in model.stacks:
        graphdef, state = nnx.split(stack.blocks)
        layer_rngs = None if rng is None else jax.random.split(jax.random.fold_in(rng, stack.first_layer), stack.count)

        def body(h, layer_state, layer_rng, graphdef=graphdef):
            block = nnx.merge(graphdef, layer_state)
            q, k, v = block.attn.qkv(block.attn_norm(h), positions)
            mask = attention_mask(segment_ids, s)
            h = h + block.attn.output(
                jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=cfg.attention_impl)
            )
            u = block.ffn_norm(h)
            y, aux = block.ffn(u, toks, layer_rng) if block.is_moe else (block.ffn(u), None)
            return h + y, aux

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat])
        if cfg.scan_layers:
            x, aux = jax.lax.scan(lambda c, xs, body=body: body(c, *xs), x, (state, layer_rngs))
        else:
            auxes = []
            for i in range(stack.count):
                x, a = body(x, jax.tree.map(lambda a: a[i], state), None if layer_rngs is None else layer_rngs[i])  # noqa: B023
                auxes.append(a)
            aux = None if auxes[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *auxes)
        if aux is not None:
            losses = losses + jax.tree.map(lambda a: a.sum(0), aux.losses)
            stats.append(aux.stats)
            ids.append(aux.expert_ids)
    logits = jnp.einsum("bsd,dv->bsv", model.final_norm(x), model.lm_head[...].astype(x.dtype)).astype(jnp.float32)
    return logits, losses, jax.tree.map(lambda *a: jnp.concatenate(a), *stats), jnp.concatenate(ids)


@pytest.mark.parametrize("variant", ["scanned_random_second_choice", "unrolled_remat"])
def test_forward_without_a_cache_is_bitwise_the_forward_before_the_cache(variant):
    """Loss, logits, aux losses, stats, routing and gradients (packed rows, an rng) are those of the oracle,
    bit for bit: scanned with GShard's random second choice, and unrolled under remat."""
    import dataclasses

    base = small_cfg()
    cfg = {
        "scanned_random_second_choice": base.replace(moe=dataclasses.replace(base.moe, second_expert_policy="random")),
        "unrolled_remat": base.replace(scan_layers=False, remat="full"),
    }[variant]
    toks = tokens()
    seg = jnp.array([[1] * 6 + [2] * 10, [1] * 16])
    pos = jnp.array([list(range(6)) + list(range(10)), list(range(16))])
    graphdef, params, rest = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param, ...)

    def model_loss(p):
        out = nnx.merge(graphdef, p, rest)(toks, pos, seg, rng=jax.random.key(3))
        s, n = cross_entropy(out.logits[:, :-1], toks[:, 1:])
        return s / n + out.aux_loss, (out.logits, out.moe_losses, out.stats, out.expert_ids)

    def oracle_loss(p):
        logits, losses, stats, ids = _forward_oracle(nnx.merge(graphdef, p, rest), toks, pos, seg, jax.random.key(3))
        s, n = cross_entropy(logits[:, :-1], toks[:, 1:])
        return s / n + losses.total, (logits, losses, stats, ids)

    got = jax.jit(jax.value_and_grad(model_loss, has_aux=True))(params)
    want = jax.jit(jax.value_and_grad(oracle_loss, has_aux=True))(params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_routing_from_the_forward_is_each_routers_top_k():
    """ModelOutput.expert_ids [L_moe, B*S, k] is what every MoE layer's router picks for its input: the
    top-k of its scores, best first, and the per-expert counts the layers report."""
    from moe_jax.model.transformer import BlockInputs

    cfg = small_cfg(num_layers=4)  # 1 dense + 3 MoE layers
    model = Transformer(cfg, nnx.Rngs(0))
    toks = tokens()
    b, s = toks.shape
    out = model(toks)
    inputs = BlockInputs(positions=jnp.broadcast_to(jnp.arange(s), (b, s)), segment_ids=None, token_ids=toks)
    x, expected = jnp.take(model.embed[...], toks, axis=0), []
    for stack in model.stacks:
        graphdef, state = nnx.split(stack.blocks)
        for i in range(stack.count):
            block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))  # noqa: B023
            if block.is_moe:
                h = x + block.attn(block.attn_norm(x), inputs.positions, None)
                routing = block.ffn.router(block.ffn_norm(h).reshape(b * s, -1), toks.reshape(-1), None)
                top = jax.lax.top_k(routing.probs, cfg.moe.top_k)[1]
                np.testing.assert_array_equal(routing.indices, top)
                expected.append(jnp.where(routing.mask, routing.indices, -1))
            x = block(x, inputs, None)[0]
    assert out.expert_ids.shape == (3, b * s, cfg.moe.top_k)
    np.testing.assert_array_equal(out.expert_ids, jnp.stack(expected))
    counts = jax.nn.one_hot(out.expert_ids, cfg.moe.num_experts, dtype=jnp.int32).sum(axis=(1, 2))
    np.testing.assert_array_equal(counts, out.stats.tokens_per_expert)

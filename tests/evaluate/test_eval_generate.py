"""The model's forward with a KV cache (incremental decoding) against the full forward, and greedy
generation with the cache equal to generation without it, token for token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.evaluate.generate import GreedyDecoder, greedy_generate
from moe_jax.model.transformer import KVCache, Transformer

V = 97


def _model(first_k_dense=0, router="softmax", top_k=2, seed=0, vocab=V) -> Transformer:
    """router None: a dense model."""
    moe = router and MoEConfig(
        num_experts=6,
        num_shared_experts=1 if router == "softmax" else 0,
        expert_dim=16,
        top_k=top_k if router == "softmax" else 1,
        router=router,
    )
    # A large init std: well-separated logits, so greedy choices are not float near-ties.
    cfg = ModelConfig(
        vocab_size=vocab,
        d_model=32,
        num_layers=2,
        num_heads=2,
        head_dim=16,
        ffn_dim=48,
        moe=moe,
        first_k_dense=first_k_dense,
        init_std=0.3,
    )
    return Transformer(cfg, nnx.Rngs(seed))


@pytest.mark.slow
@pytest.mark.parametrize("first_k_dense,router", [(1, "softmax"), (0, "hash"), (0, None)])
def test_cached_prefill_and_decode_match_full_forward(first_k_dense, router):
    """MoE (softmax with a dense first layer; hash) and dense: the logits of every position, and the routing."""
    model = _model(first_k_dense, router)
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, V)
    ref = model(tokens)
    full = ref.logits
    cache = KVCache.init(model.cfg, 2, 12)
    out = model(tokens[:, :5], cache=cache)
    np.testing.assert_allclose(out.logits, full[:, :5], atol=2e-5, rtol=2e-5)
    cache, ids = out.cache, [out.expert_ids]
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda st, tok, c: nnx.merge(graphdef, st)(tok, cache=c))
    for t in range(5, 9):
        out = step(state, tokens[:, t : t + 1], cache)
        cache = out.cache
        ids.append(out.expert_ids)
        np.testing.assert_allclose(out.logits[:, 0], full[:, t], atol=2e-5, rtol=2e-5)
    assert int(cache.index) == 9
    if router is None:
        assert ref.expert_ids is None and all(i is None for i in ids)
    else:  # each token routed as in the full forward: [L_moe, B*S, k] -> [L_moe, B, S, k]
        per_step = [i.reshape(i.shape[0], 2, -1, i.shape[-1]) for i in ids]
        np.testing.assert_array_equal(
            np.concatenate(per_step, axis=2), ref.expert_ids.reshape(*per_step[0].shape[:2], 9, -1)
        )


def test_a_cache_refuses_positions_segments_and_overflow():
    model = _model()
    tokens = jnp.zeros((1, 4), jnp.int32)
    cache = KVCache.init(model.cfg, 1, 6)
    with pytest.raises(ValueError, match="pass neither positions nor segment_ids"):
        model(tokens, positions=jnp.zeros((1, 4), jnp.int32), cache=cache)
    out = model(tokens, cache=cache)
    with pytest.raises(ValueError, match="no room for 4 more"):
        model(tokens, cache=out.cache)


@pytest.mark.slow
def test_left_padded_rows_see_their_own_positions():
    model = _model()
    a = [0, 5, 6, 7, 8, 9]
    b = [0, 11, 12]
    cache = KVCache.init(model.cfg, 2, 8, offset=[0, 3])
    batch = jnp.array([a, [0, 0, 0] + b])
    out = model(batch, cache=cache)
    np.testing.assert_allclose(out.logits[1, 3:], model(jnp.array([b])).logits[0], atol=2e-5, rtol=2e-5)
    assert np.isfinite(np.asarray(out.logits)).all()


@pytest.mark.slow
def test_greedy_with_cache_equals_without_token_for_token():
    model = _model(1, seed=3)
    prompts = [[0, 4, 8, 15, 16, 23, 42], [0, 7], [0, 1, 2, 3]]
    dec = GreedyDecoder(model)
    cached = dec.with_cache(prompts, 12)
    plain = dec.without_cache(prompts, 12)
    assert cached == plain
    assert all(len(c) == 12 for c in cached)
    assert len({tuple(c) for c in cached}) > 1  # not a degenerate constant output
    # Row independence: a prompt alone gives the same tokens as inside the batch.
    assert greedy_generate(model, prompts[1:2], 12) == cached[1:2]


def test_greedy_stops_at_eos():
    model = _model(seed=4)
    dec = GreedyDecoder(model)
    first = dec.with_cache([[0, 3, 4]], 6)[0]
    eos = first[2]
    out = dec.with_cache([[0, 3, 4]], 6, eos_id=eos)[0]
    assert out == first[: first.index(eos) + 1]
    assert dec.without_cache([[0, 3, 4]], 6, eos_id=eos)[0] == out


@pytest.mark.slow
def test_generate_texts_batches_prompts_and_cuts_at_stop_strings():
    from eval_fixtures import ALPHABET, CharTokenizer

    from moe_jax.evaluate.generate import generate_texts

    tok = CharTokenizer()
    model = _model(seed=5, vocab=len(ALPHABET))
    dec = GreedyDecoder(model)
    prompts = ["ab", "Q?c", "the cat sat"]
    gens = generate_texts(dec, tok, prompts, seq_len=32, max_new_tokens=6, eos_id=None, batch_size=2, progress=False)
    refs = dec.without_cache([[0] + ids for ids in tok.encode(prompts)], 6)
    for g, ref in zip(gens, refs):
        assert g.tokens == ref and g.text == tok.decode(ref)
    stop = gens[0].text[2]
    cut = generate_texts(
        dec, tok, prompts[:1], seq_len=32, max_new_tokens=6, stop=(stop,), eos_id=None, progress=False
    )[0]
    assert cut.text == gens[0].text[: gens[0].text.index(stop)]
    with pytest.raises(ValueError, match="no room"):
        generate_texts(dec, tok, prompts, seq_len=8, max_new_tokens=7, progress=False)


def test_exact_match_and_code_execution():
    from moe_jax.evaluate.run import code_program, exact_match, normalize_answer, run_program

    assert normalize_answer("The  Sunset Blvd.") == "sunset blvd"
    assert exact_match(" sunset  boulevard", ["Sunset Boulevard", "x"]) and not exact_match("sunset", ["Sunset Blvd"])
    he = {"prompt": "def f(x):\n", "test": "def check(c):\n    assert c(2) == 4\n", "entry_point": "f"}
    assert run_program(code_program("humaneval", he, "    return 2 * x\n"))
    assert not run_program(code_program("humaneval", he, "    return x\n"))
    mbpp = {"test_list": ["assert g(1) == 2"], "test_setup_code": ""}
    assert run_program(code_program("mbpp", mbpp, "def g(x):\n    return x + 1"))
    assert not run_program("while True:\n    pass\n", timeout=1.0)


def test_report_prints_the_papers_generation_score_beside_ours_never_beside_bits_per_byte():
    """The paper reports exact match / pass@1, not bits/byte: its value goes on the generation line."""
    from moe_jax.evaluate.run import format_report

    entry = dict(kind="bpb", shots=5, split="validation", docs=500, value=4.042, paper_generation=16.6)
    head = {"workdir": "w", "step": 1, "seq_len": 256}
    without = format_report({**head, "tasks": {"triviaqa": {**entry, "generation_metric": "exact_match"}}}).splitlines()
    bpb = next(line for line in without if "gold bits/byte" in line)
    assert "16.6" not in bpb and bpb.split()[-1] == "-"
    gen = without[without.index(bpb) + 1].split()
    assert gen == ["exact_match", "--generate", "16.6"]
    generated = {**entry, "generation_metric": "exact_match", "generation": {"docs": 100, "exact_match": 0.02}}
    lines = format_report({**head, "tasks": {"triviaqa": generated}}).splitlines()
    assert next(line for line in lines if "exact_match" in line).split() == ["100", "exact_match", "2.0", "16.6"]
    code = {**entry, "generation_metric": "pass@1", "paper_generation": 4.9, "generation": {"docs": 164}}
    lines = format_report({**head, "tasks": {"humaneval": code}}).splitlines()
    assert next(line for line in lines if "pass@1" in line and "164" in line).split() == ["164", "pass@1", "n/a", "4.9"]

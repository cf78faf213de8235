"""`--format=transformers` with the real libraries (torch + transformers, the `hf` extra): each model kind
exports to a directory `AutoModelForCausalLM` loads without remote code, whose float32 logits on real
text equal ours within 1e-5 relative, and imports back (bitwise, same logits); models transformers
itself saved import with the same parity and train/eval here; greedy `generate()` continues prompts
as our decoder does; `AutoTokenizer` encodes as our SentencePiece model; refusals name the problem
before any file is written."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
from export_fixtures import STEP, TINY, cli_eval_heldout, make_workdir, short_run_flags
from helpers import TRAIN_SEQ, TRAIN_VOCAB, max_rel_err

TOL = 1e-5
MOE = "architectures/moe.gin"
# TINY: d 32, 3 layers, 2 heads x 16, vocab 320, ffn 64, layer 0 dense (FIRST_K_DENSE=1).
KINDS = {
    # DeepSeekMoE: dense first layer, 2 shared + 6 fine-grained routed experts (f = 16), top-3.
    "deepseekmoe": (MOE, TINY + ["NUM_EXPERTS=6", "NUM_SHARED=2", "TOP_K=3", "EXPERT_DIM=16"]),
    # GShard: 4 experts of the dense width, top-2, no shared expert (Qwen2Moe's has width 0).
    "gshard": (MOE, TINY + ["NUM_EXPERTS=4", "NUM_SHARED=0", "TOP_K=2", "EXPERT_DIM=64"]),
    # Switch: top-1; MoE every other layer (mlp_only_layers [1]), head_dim 8 != d / heads, and an expert
    # width (18) that torch's grouped_mm cannot run (72-byte rows): config.json selects the eager kernel.
    "switch": (
        MOE,
        TINY
        + [
            "FIRST_K_DENSE=0",
            "ModelConfig.moe_layer_freq=2",
            "NUM_EXPERTS=4",
            "TOP_K=1",
            "EXPERT_DIM=18",
            "HEAD_DIM=8",
        ],
    ),
    # DeepSeek-V3's gating (Glm4Moe): sigmoid scores, renormalised top-3, routed scaling 2.5, 2 shared experts.
    "v3_sigmoid": (
        MOE,
        TINY
        + ["NUM_EXPERTS=6", "NUM_SHARED=2", "TOP_K=3", "EXPERT_DIM=16"]
        + [
            "MoEConfig.router_score='sigmoid'",
            "MoEConfig.renormalize_topk=True",
            "MoEConfig.routed_scaling_factor=2.5",
        ],
    ),
    # V3's auxiliary-loss-free balancing with node-limited routing, no shared expert (Glm4Moe's has width
    # 0): a random selection bias (make_workdir), top-2 within the top 2 of 3 groups scored by their top-2 sum.
    "v3_aux_free_groups": (
        MOE,
        TINY
        + ["NUM_EXPERTS=6", "NUM_SHARED=0", "TOP_K=2", "EXPERT_DIM=16", "MoEConfig.router_score='sigmoid'"]
        + ["MoEConfig.renormalize_topk=True", "MoEConfig.selection_bias=True", "MoEConfig.bias_update_speed=0.001"]
        + ["MoEConfig.topk_groups=2", "MoEConfig.num_expert_groups=3", "MoEConfig.group_score='top2_sum'"],
    ),
    "dense": ("architectures/dense.gin", TINY),
    # Dense x4 (shared experts only): LlamaForCausalLM of width 4 x 16 = ffn_dim.
    "dense_x4": (MOE, TINY + ["NUM_EXPERTS=0", "NUM_SHARED=4", "TOP_K=0", "EXPERT_DIM=16"]),
}
ARCHITECTURES = {
    "deepseekmoe": "Qwen2MoeForCausalLM",
    "gshard": "Qwen2MoeForCausalLM",
    "switch": "Qwen2MoeForCausalLM",
    "v3_sigmoid": "Glm4MoeForCausalLM",
    "v3_aux_free_groups": "Glm4MoeForCausalLM",
    "dense": "LlamaForCausalLM",
    "dense_x4": "LlamaForCausalLM",
}


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def _our_logits(workdir, tokens: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    from moe_jax.train.restore import load_trained

    return np.asarray(load_trained(workdir).model()(jnp.asarray(tokens)).logits)


def _load(path, **kwargs):
    """AutoModelForCausalLM.from_pretrained (eval mode); (model, loading info) with output_loading_info."""
    from transformers import AutoModelForCausalLM

    out = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    (out[0] if isinstance(out, tuple) else out).eval()
    return out


@pytest.fixture(scope="module")
def corpus(train_cache):
    """(documents of the train_cache corpus, its SentencePiece processor)."""
    import sentencepiece as spm

    root = Path(train_cache).parent
    docs = [d for d in (root / "texts" / "part0.txt").read_text(encoding="utf-8").split("\n\n") if d.strip()]
    return docs, spm.SentencePieceProcessor(model_file=str(root / "vocab.model"))


@pytest.fixture(scope="module")
def text_tokens(corpus) -> np.ndarray:
    """[3, 40] ids of real text as training sees it: BOS (id 0) + the document's first 39 tokens."""
    docs, sp = corpus
    rows = [[0] + sp.encode(d)[:39] for d in docs if len(sp.encode(d)) >= 39][:3]
    return np.asarray(rows, np.int64)


@dataclasses.dataclass
class Exported:
    workdir: Path
    out: Path
    result: object


@pytest.fixture(scope="module")
def exported(tmp_path_factory, train_cache):
    """kind -> Exported (a workdir of that kind and its float32 --format=transformers export), built once."""
    from moe_jax.export.hf import export_hf

    cache: dict[str, Exported] = {}

    def get(kind: str) -> Exported:
        if kind not in cache:
            arch, bindings = KINDS[kind]
            root = tmp_path_factory.mktemp(kind)
            wd = make_workdir(root / "wd", bindings, arch=arch, seed=len(kind), data_cache=train_cache)
            res = export_hf(wd, root / "tf", fmt="transformers", progress=False)
            cache[kind] = Exported(wd, res.out, res)
        return cache[kind]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_parity_both_directions(kind, exported, text_tokens, tmp_path):
    """transformers' model of our export = our model (1e-5 rel, float32, real text); importing the
    export back gives our parameters bitwise, hence the same logits."""
    from moe_jax.export.hf import import_hf

    ex = exported(kind)
    cfg = json.loads((ex.out / "config.json").read_text())
    assert cfg["architectures"] == [ARCHITECTURES[kind]] and "auto_map" not in cfg
    assert ex.result.architecture == ARCHITECTURES[kind]
    model, info = _load(ex.out, dtype="float32", output_loading_info=True)
    assert type(model).__name__ == ARCHITECTURES[kind]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    theirs = _torch_logits(model, text_tokens)
    ours = _our_logits(ex.workdir, text_tokens)
    err = max_rel_err(theirs, ours)
    print(f"{kind}: max rel logits error transformers vs moe_jax: {err:.2e}")
    assert err < TOL
    assert np.std(ours) > 0.1  # not vacuous: logits far from uniform
    back = import_hf(ex.out, tmp_path / "back", progress=False)
    assert back.step == STEP
    ours_back = _our_logits(tmp_path / "back", text_tokens)
    err_back = max_rel_err(ours_back, theirs)
    print(f"{kind}: max rel logits error imported vs transformers: {err_back:.2e}")
    assert err_back < TOL
    np.testing.assert_array_equal(ours_back, ours)


def test_qwen2moe_layout_details(exported):
    """The shared experts are one expert of width K_s * f behind a zero gate, down projection x 2; the
    dense layer is listed in mlp_only_layers; GShard's shared expert has width 0."""
    from safetensors.numpy import load_file

    from moe_jax.export.layout import flat_params
    from moe_jax.train.restore import load_trained

    ex = exported("deepseekmoe")
    cfg = json.loads((ex.out / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (6, 3, 16)
    assert cfg["shared_expert_intermediate_size"] == 32 and cfg["mlp_only_layers"] == [0]
    assert cfg["norm_topk_prob"] is False and cfg["qkv_bias"] is False and cfg["decoder_sparse_step"] == 1
    w = {}
    for f in ex.result.files:
        w.update(load_file(ex.out / f))
    ours = {k: np.asarray(v) for k, v in flat_params(load_trained(ex.workdir).params).items()}
    np.testing.assert_array_equal(w["model.layers.1.mlp.shared_expert_gate.weight"], np.zeros((1, 32)))
    np.testing.assert_array_equal(
        w["model.layers.2.mlp.shared_expert.down_proj.weight"], 2 * ours["stacks.1.blocks.ffn.shared.wo"][1].T
    )
    np.testing.assert_array_equal(
        w["model.layers.1.mlp.experts.4.up_proj.weight"], ours["stacks.1.blocks.ffn.wi"][0, 4, :, 1, :].T
    )
    gshard = exported("gshard")
    g = json.loads((gshard.out / "config.json").read_text())
    assert g["shared_expert_intermediate_size"] == 0 and g["mlp_only_layers"] == [0]
    sw = json.loads((exported("switch").out / "config.json").read_text())
    assert sw["mlp_only_layers"] == [1] and sw["head_dim"] == 8 and sw["num_experts_per_tok"] == 1
    assert sw["experts_implementation"] == "eager" and "experts_implementation" not in cfg


def test_glm4moe_layout_details(exported):
    """Sigmoid-scored models are Glm4Moe: V3's router keys (groups, renormalisation, routed scaling), full
    rotary, the trained selection bias as `e_score_correction_bias` (zeros without one), the shared experts
    as `shared_experts` of width K_s * f (0 without), the training-only settings in the moe_jax block."""
    from safetensors.numpy import load_file

    from moe_jax.export.layout import flat_params
    from moe_jax.train.restore import load_trained

    def tensors(ex):
        out = {}
        for f in ex.result.files:
            out.update(load_file(ex.out / f))
        return out

    v3, groups = exported("v3_sigmoid"), exported("v3_aux_free_groups")
    c = json.loads((v3.out / "config.json").read_text())
    assert (c["n_routed_experts"], c["num_experts_per_tok"], c["n_shared_experts"], c["first_k_dense_replace"]) == (
        6,
        3,
        2,
        1,
    )
    assert (c["n_group"], c["topk_group"], c["norm_topk_prob"], c["routed_scaling_factor"]) == (1, 1, True, 2.5)
    assert c["rope_parameters"]["partial_rotary_factor"] == 1.0 and c["use_qk_norm"] is False
    assert c["moe_jax"]["selection_bias"] is False
    w = tensors(v3)
    np.testing.assert_array_equal(w["model.layers.1.mlp.gate.e_score_correction_bias"], np.zeros(6))
    assert w["model.layers.2.mlp.shared_experts.up_proj.weight"].shape == (32, 32)
    g = json.loads((groups.out / "config.json").read_text())
    assert (g["n_group"], g["topk_group"], g["n_shared_experts"]) == (3, 2, 0)
    assert g["moe_jax"]["selection_bias"] is True and g["moe_jax"]["bias_update_speed"] == 0.001
    w = tensors(groups)
    trained = load_trained(groups.workdir)
    bias = {k: np.asarray(v) for k, v in flat_params(trained.rest).items()}  # the selection bias: the only rest
    assert list(bias) == ["stacks.1.blocks.ffn.router.bias"] and np.std(bias["stacks.1.blocks.ffn.router.bias"]) > 0.05
    for layer in (1, 2):
        np.testing.assert_array_equal(
            w[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"],
            bias["stacks.1.blocks.ffn.router.bias"][layer - 1],
        )
    assert w["model.layers.1.mlp.shared_experts.gate_proj.weight"].shape == (0, 32)


@pytest.mark.slow
def test_exported_selection_bias_decides_the_routing(exported, text_tokens):
    """The parity above is not vacuous for the selection bias: zeroing transformers' loaded
    `e_score_correction_bias` moves its logits far from ours (the bias changes which experts are chosen)."""
    import torch

    ex = exported("v3_aux_free_groups")
    model = _load(ex.out, dtype="float32")
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()
    assert max_rel_err(_torch_logits(model, text_tokens), _our_logits(ex.workdir, text_tokens)) > 100 * TOL


def test_16b_config_describes_the_planned_tensors():
    """DeepSeekMoE 16B as Qwen2Moe: transformers builds (on the meta device) a model with exactly the
    parameters of our plan: per-layer names and shapes, and the 16.376B total plus the zero gates."""
    import math

    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from moe_jax.configs.gin_utils import model_config_from_gin, model_gin_path
    from moe_jax.export.hf import abstract_param_shapes
    from moe_jax.export.layout import QWEN2_MOE, plan
    from moe_jax.export.transformers_config import to_transformers_config

    cfg = model_config_from_gin([model_gin_path("deepseekmoe_16b")])
    entries = plan(cfg, abstract_param_shapes(cfg), QWEN2_MOE)
    names = {e.hf_name: e.hf_shape for e in entries}
    assert names["model.layers.1.mlp.shared_expert.gate_proj.weight"] == (2816, 2048)
    assert names["model.layers.1.mlp.shared_expert_gate.weight"] == (1, 2048)
    assert names["model.layers.0.mlp.gate_proj.weight"] == (10944, 2048)
    config = to_transformers_config(
        cfg, dtype="bfloat16", max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=0
    )
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "moe_jax", "torch_dtype")}
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**config))
    theirs = dict(model.named_parameters())
    ours_total = sum(math.prod(s) for s in names.values())
    assert sum(p.numel() for p in theirs.values()) == ours_total
    assert abs((ours_total - 27 * 2048) / 1e9 - 16.376) < 0.01
    for n, p in theirs.items():  # transformers fuses the routed experts of a layer in memory
        if ".mlp.experts." not in n:
            assert tuple(p.shape) == names[n], n
    assert tuple(theirs["model.layers.5.mlp.experts.gate_up_proj"].shape) == (64, 2 * 1408, 2048)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["deepseekmoe"])
def test_greedy_generate_matches_ours(kind, exported, corpus):
    """transformers' greedy generate() continues real-text prompts with our decoder's tokens."""
    import torch
    from transformers import AutoTokenizer

    from moe_jax.evaluate.generate import greedy_generate
    from moe_jax.train.restore import load_trained

    ex = exported(kind)
    docs, _ = corpus
    tok = AutoTokenizer.from_pretrained(ex.out)
    model = _load(ex.out, dtype="float32")
    ours_model = load_trained(ex.workdir).model()
    for doc in docs[:2]:
        enc = tok(doc[:80], return_tensors="pt")
        prompt = enc.input_ids[0].tolist()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        theirs = out[0, len(prompt) :].tolist()
        ours = greedy_generate(ours_model, [prompt], max_new_tokens=10)[0]
        assert theirs == ours and len(ours) == 10, (theirs, ours)


def test_tokenizer_parity(exported, corpus):
    """AutoTokenizer(out) = BOS (id 0, what training prepends) + the SentencePiece ids, on the corpus and
    on text with digits, unicode, byte fallback, odd whitespace and special-token strings (text, as for
    SentencePiece); decoding gives the text back."""
    from transformers import AutoTokenizer

    ex = exported("dense")
    tok = AutoTokenizer.from_pretrained(ex.out)
    docs, sp = corpus
    samples = docs + [
        "Hello  World 12345 ünïcödé 日本語 🙂\n\ttabs   end ",
        " leading space",
        "a\n\nb",
        "x",
        "perlre: modifier C</s>. <pad> and <unk> are text here",
    ]
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1 and tok.pad_token_id == 0
    for text in samples:
        ids = tok(text).input_ids
        assert ids == [0] + sp.encode(text), text[:40]
        assert tok.decode(ids, skip_special_tokens=True) == text
    batch = tok(samples[:3]).input_ids
    assert batch == [[0] + sp.encode(t) for t in samples[:3]]
    assert tok(samples[0], add_special_tokens=False).input_ids == sp.encode(samples[0])


def test_tokenizer_json_matches_sentencepiece_on_a_larger_vocab(tmp_path):
    """The merge ranking on a vocabulary where it matters: a 1500-piece BPE trained (with the project's
    settings) on docs/*.md encodes README.md and Python sources (code, digits, unicode) as SentencePiece
    does. (The 320-piece test vocabulary is nearly whole words: most merge orders would pass there.)"""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    from moe_jax.data.vocab import trainer_settings
    from moe_jax.export.hf_tokenizer import tokenizer_json

    root = Path(__file__).resolve().parents[2]
    train = [line for f in sorted(root.glob("docs/*.md")) for line in f.read_text().splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train), model_prefix=str(tmp_path / "big"), **trainer_settings(1500, 10**6, 1)
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "big.model"))
    tok = Tokenizer.from_str(json.dumps(tokenizer_json(tmp_path / "big.model", 0)))
    held = [
        line
        for f in (root / "README.md", root / "moe_jax/config.py", root / "moe_jax/export/layout.py")
        for line in f.read_text().splitlines()
    ] + ["ünïcödé 日本語 🙂 x²  \t end", "  2048 x 1408 = 2883584"]
    wrong = [line for line in held if tok.encode(line, add_special_tokens=False).ids != sp.encode(line)]
    assert not wrong and len(held) > 500, wrong[:3]


def test_bfloat16_export_loads_as_rounded_float32(exported, tmp_path):
    """bfloat16: transformers loads bf16 weights equal to the float32 export's, rounded to bf16."""
    import torch

    from moe_jax.export.hf import export_hf

    ex = exported("deepseekmoe")
    res = export_hf(ex.workdir, tmp_path / "bf16", fmt="transformers", dtype="bfloat16", progress=False)
    assert json.loads((res.out / "config.json").read_text())["dtype"] == "bfloat16"
    m16, m32 = _load(res.out), _load(ex.out, dtype="float32")
    s16, s32 = m16.state_dict(), m32.state_dict()
    assert s16.keys() == s32.keys()
    assert {v.dtype for v in s16.values()} == {torch.bfloat16}
    for k in s32:
        assert torch.equal(s16[k], s32[k].to(torch.bfloat16)), k


# ------------------------------------------------------------------ models that transformers itself saved


# The trunk of the transformers-saved MoE models below: d 32, 3 layers, 2 heads of 8 (head_dim free), FFN 48.
_HF_TRUNK = dict(
    vocab_size=TRAIN_VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=TRAIN_SEQ,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=0,
)


def _fresh_qwen2moe(path: Path, *, zero_shared_gate: bool = True) -> Path:
    """A freshly initialised tiny Qwen2MoeForCausalLM (2 shared-expert widths, dense layer 0, head_dim 8),
    saved by transformers. Its shared_expert_gate is zeroed (our shared experts have no input-dependent
    gate) unless `zero_shared_gate` is False."""
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(
        **_HF_TRUNK,
        num_experts=5,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        mlp_only_layers=[0],
        qkv_bias=False,
        initializer_range=0.2,
        rope_theta=5000.0,
    )
    model = Qwen2MoeForCausalLM(cfg)
    if zero_shared_gate:
        with torch.no_grad():
            for layer in model.model.layers[1:]:
                layer.mlp.shared_expert_gate.weight.zero_()
    model.save_pretrained(path)
    return path


def _fresh_llama(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=TRAIN_VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        initializer_range=0.2,
        rms_norm_eps=1e-5,
        max_position_embeddings=TRAIN_SEQ,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _fresh_glm4moe(path: Path) -> Path:
    """A freshly initialised tiny Glm4MoeForCausalLM saved by transformers: DeepSeek-V3's router with a
    random selection bias, top-2 within the top 2 of 3 groups, routed scaling 1.5, one shared expert,
    full rotary (Glm4MoeConfig's default rotates half of each head, which our RoPE does not)."""
    import torch
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    torch.manual_seed(2)
    cfg = Glm4MoeConfig(
        **_HF_TRUNK,
        n_routed_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=3,
        topk_group=2,
        routed_scaling_factor=1.5,
        initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 1.0},
        num_nextn_predict_layers=0,
    )
    model = Glm4MoeForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.weight.normal_(0.0, 0.2)
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return path


@pytest.mark.slow
def test_import_transformers_saved_glm4moe_parity_and_train(tmp_path, train_cache, text_tokens):
    """A Glm4Moe model transformers saved imports as DeepSeek-V3's router (sigmoid, its selection bias,
    groups, routed scaling) with the same logits (1e-5 rel, float32), and trains here with the bias moving
    at the speed bound at import (Glm4Moe's config has none: 0 by default)."""
    from moe_jax.cli import main
    from moe_jax.train.restore import load_trained, parse_workdir_config

    hf, wd = _fresh_glm4moe(tmp_path / "glm"), tmp_path / "glm_wd"
    run = short_run_flags(train_cache, steps=2, warmup_steps=1)
    assert main(["import", f"--hf={hf}", f"--workdir={wd}", "--no_progress", *run]) == 0
    theirs = _torch_logits(_load(hf, dtype="float32"), text_tokens)
    err = max_rel_err(_our_logits(wd, text_tokens), theirs)
    print(f"transformers-saved glm4moe: max rel logits error moe_jax vs transformers: {err:.2e}")
    assert err < TOL and np.std(theirs) > 0.1
    cfg, _ = parse_workdir_config(wd)
    m = cfg.moe
    assert (m.router_score, m.renormalize_topk, m.routed_scaling_factor, m.selection_bias) == (
        "sigmoid",
        True,
        1.5,
        True,
    )
    assert (m.topk_groups, m.num_expert_groups, m.group_score, m.bias_update_speed) == (2, 3, "top2_sum", 0.0)
    assert (m.num_experts, m.num_shared_experts, m.top_k, cfg.first_k_dense, cfg.head_dim) == (6, 1, 2, 1, 8)
    imported = np.asarray(load_trained(wd).rest["stacks"][1]["blocks"]["ffn"]["router"]["bias"][...])
    argv = ["train", f"--workdir={wd}", f"--gin_file={wd / 'config.gin'}", "--no_progress"]
    assert main(argv + ["--gin.MoEConfig.bias_update_speed=0.001"]) == 0
    trained = np.asarray(load_trained(wd).rest["stacks"][1]["blocks"]["ffn"]["router"]["bias"][...])
    moved = np.abs(trained - imported)
    assert json.loads((wd / "result.json").read_text())["step"] == 2
    assert np.all(moved <= 2 * 0.001 + 1e-7) and np.any(moved > 0)  # two steps of +-gamma (or 0) per expert


@pytest.mark.slow
def test_import_transformers_saved_models_parity_train_and_eval(tmp_path, train_cache, text_tokens):
    """Qwen2Moe and Llama models that transformers saved import (`moe-jax import`) with the same logits
    (1e-5 rel, float32); the imported Qwen2Moe workdir then continues with `moe-jax train` and is scored
    by `moe-jax eval`."""
    from moe_jax.cli import main
    from moe_jax.train.restore import parse_workdir_config

    run = short_run_flags(train_cache, steps=2, warmup_steps=1)
    for name, make in (("qwen2moe", _fresh_qwen2moe), ("llama", _fresh_llama)):
        hf, wd = make(tmp_path / name), tmp_path / f"{name}_wd"
        assert main(["import", f"--hf={hf}", f"--workdir={wd}", "--no_progress", *run]) == 0
        theirs = _torch_logits(_load(hf, dtype="float32"), text_tokens)
        err = max_rel_err(_our_logits(wd, text_tokens), theirs)
        print(f"transformers-saved {name}: max rel logits error moe_jax vs transformers: {err:.2e}")
        assert err < TOL and np.std(theirs) > 0.1
    qwen, _ = parse_workdir_config(tmp_path / "qwen2moe_wd")
    assert (qwen.moe.num_shared_experts, qwen.moe.num_experts, qwen.moe.top_k, qwen.first_k_dense) == (2, 5, 2, 1)
    assert qwen.head_dim == 8 and qwen.rope_theta == 5000.0
    llama, _ = parse_workdir_config(tmp_path / "llama_wd")
    assert llama.moe is None and llama.ffn_dim == 48 and llama.norm_eps == 1e-5 and llama.head_dim == 8
    wd = tmp_path / "qwen2moe_wd"
    assert main(["train", f"--workdir={wd}", f"--gin_file={wd / 'config.gin'}", "--no_progress"]) == 0
    result = json.loads((wd / "result.json").read_text())
    assert result["step"] == 2 and np.isfinite(result["train_loss"])
    rc = cli_eval_heldout(wd, tmp_path / "eval.json")
    assert rc == 0 and json.loads((tmp_path / "eval.json").read_text())["step"] == 2


# ------------------------------------------------------------------------------------------- refusals


def test_import_refuses_input_dependent_shared_gate(tmp_path):
    from moe_jax.export.hf import HFImportError, import_hf

    hf = _fresh_qwen2moe(tmp_path / "hf", zero_shared_gate=False)
    with pytest.raises(HFImportError, match=r"model.layers.1.mlp.shared_expert_gate.weight: max \|value - 0\|"):
        import_hf(hf, tmp_path / "wd", progress=False)
    assert not (tmp_path / "wd").exists()


# A Glm4Moe config.json (as a change to the Qwen2Moe one below) that imports: full rotary, 6 experts, 3 groups.
_GLM = {
    "model_type": "glm4_moe",
    "n_routed_experts": 6,
    "n_shared_experts": 2,
    "first_k_dense_replace": 1,
    "n_group": 3,
    "topk_group": 2,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
}


def test_import_refuses_a_bias_the_moe_jax_block_denies(exported, tmp_path):
    """Our export of a bias-free sigmoid model says `selection_bias: false`: a non-zero
    e_score_correction_bias there is refused, naming the tensor and the fix."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from moe_jax.export.hf import HFImportError, import_hf

    ex = exported("v3_sigmoid")
    hf = Path(shutil.copytree(ex.out, tmp_path / "hf"))
    name = "model.layers.2.mlp.gate.e_score_correction_bias"
    shard = hf / json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = np.full_like(tensors[name], 0.25)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(HFImportError, match=rf"{name}: max \|value - 0\| = 0.25(.|\n)*remove `selection_bias`"):
        import_hf(hf, tmp_path / "wd", progress=False)
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_key_value_heads": 1}, "grouped-query attention is not supported"),
        ({"qkv_bias": True}, "qkv_bias=True is not supported"),
        ({"shared_expert_intermediate_size": 24}, "not a multiple of moe_intermediate_size=16"),
        ({"mlp_only_layers": [2]}, "MoE layers [0, 1] do not follow our rule"),
        ({"model_type": "mixtral"}, "model_type 'mixtral'"),
        (_GLM | {"rope_parameters": {"rope_type": "default"}}, "partial_rotary_factor=0.5 is not supported"),
        (_GLM | {"use_qk_norm": True}, "use_qk_norm=True is not supported"),
        (_GLM | {"n_group": 4}, "n_group=4 / topk_group=2 do not group the 6 routed experts"),
    ],
)
def test_import_refuses_unsupported_transformers_config(change, message):
    from moe_jax.export.hf import config_layout
    from moe_jax.export.layout import LayoutError

    config = {
        "model_type": "qwen2_moe",
        "vocab_size": 320,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 32,
        "mlp_only_layers": [0],
        "qkv_bias": False,
    }
    config_layout(config)  # the unchanged configs import
    config_layout({**config, **_GLM})
    with pytest.raises(LayoutError) as err:
        config_layout({**config, **change})
    assert message in str(err.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["ROUTER='hash'", "NUM_EXPERTS=7", "TOP_K=1", "EXPERT_DIM=16"], "Hash models cannot be exported"),
        (
            ["NUM_EXPERTS=4", "TOP_K=2", "EXPERT_DIM=16", "MoEConfig.dispatch='capacity'"],
            "dispatch='capacity' drops tokens",
        ),
        (["NUM_EXPERTS=0", "NUM_SHARED=2", "TOP_K=0", "EXPERT_DIM=16"], "bind FFN_DIM=32 or FIRST_K_DENSE=0"),
        (
            ["NUM_EXPERTS=6", "TOP_K=2", "EXPERT_DIM=16", "MoEConfig.selection_bias=True"],
            "Glm4MoeForCausalLM has it only with sigmoid scores",
        ),
        (
            ["NUM_EXPERTS=6", "TOP_K=2", "EXPERT_DIM=16", "MoEConfig.router_score='sigmoid'"]
            + ["MoEConfig.topk_groups=2", "MoEConfig.num_expert_groups=3"],
            "group_score='max': Glm4MoeForCausalLM scores a group by the sum of its two highest",
        ),
        (
            ["NUM_EXPERTS=6", "TOP_K=2", "EXPERT_DIM=16", "MoEConfig.router_score='sigmoid'"]
            + ["MoEConfig.topk_groups=2", "MoEConfig.group_score='top2_sum'"],
            "bind MoEConfig.num_expert_groups",
        ),
        (
            ["NUM_EXPERTS=6", "TOP_K=2", "EXPERT_DIM=16", "MoEConfig.router_score='sigmoid'"]
            + ["FIRST_K_DENSE=0", "ModelConfig.moe_layer_freq=2"],
            "bind ModelConfig.moe_layer_freq=1",
        ),
    ],
)
def test_export_refuses_before_writing(tmp_path, extra, message, capsys):
    """A model the format cannot hold fails with a named error before any file is written."""
    import gin
    from moe_jax.cli import main
    from moe_jax.configs.gin_utils import parse_gin

    parse_gin([MOE, "runs/proxy_cpu.gin"], TINY + extra)
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.gin").write_text(gin.config_str())
    out = tmp_path / "tf"
    assert main(["export", f"--workdir={wd}", f"--out={out}", "--format=transformers", "--no_progress"]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_non_empty_output_is_refused_without_overwrite(exported, tmp_path, capsys):
    from moe_jax.cli import main

    ex = exported("dense")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["export", f"--workdir={ex.workdir}", f"--out={out}", "--format=transformers", "--no_progress"]
    assert main(args) == 1
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(args + ["--overwrite"]) == 0
    assert (out / "config.json").exists() and (out / "notes.txt").read_text() == "mine"
    _load(out)  # and the overwritten directory loads

"""Import refuses missing/misshapen tensors (naming each with its expected shape) before writing
anything; export refuses Hash, Dense-xN and head_dim != d_model / heads models with a clear message;
the layout table's spec language is exactly invertible and covers every parameter element once."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from export_fixtures import DEEPSEEK, TINY, make_workdir


def _copy_export(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_shard(hf_dir, mutate):
    """Rewrite the shard holding model.layers.1.mlp.experts.2.up_proj.weight with `mutate(dict)`."""
    from safetensors.numpy import load_file, save_file

    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    file = hf_dir / index["weight_map"][name]
    tensors = dict(load_file(file))
    mutate(tensors, name)
    save_file(tensors, file, metadata={"format": "pt"})
    return name


def test_import_missing_tensor_names_it_and_writes_nothing(ds_export, tmp_path):
    from moe_jax.export.hf import HFImportError, import_hf

    hf = _copy_export(ds_export.out, tmp_path / "hf")
    name = _rewrite_shard(hf, lambda t, n: t.pop(n))
    with pytest.raises(HFImportError) as err:
        import_hf(hf, tmp_path / "wd", progress=False)
    assert f"{name}: missing (expected shape [16, 32])" in str(err.value)
    assert not (tmp_path / "wd").exists()


def test_import_misshapen_tensor_names_it_with_expected_shape(ds_export, tmp_path):
    from moe_jax.export.hf import HFImportError, import_hf

    hf = _copy_export(ds_export.out, tmp_path / "hf")

    def transpose(t, n):
        t[n] = np.ascontiguousarray(t[n].T)

    name = _rewrite_shard(hf, transpose)
    with pytest.raises(HFImportError) as err:
        import_hf(hf, tmp_path / "wd", progress=False)
    assert f"{name}: shape [32, 16]" in str(err.value) and "expected shape [16, 32]" in str(err.value)
    assert not (tmp_path / "wd").exists()


def test_import_missing_shard_file_and_cli_exit_code(ds_export, tmp_path, capsys):
    from moe_jax.cli import main

    hf = _copy_export(ds_export.out, tmp_path / "hf")
    (hf / ds_export.files[-1]).unlink()
    assert main(["import", f"--hf={hf}", f"--workdir={tmp_path / 'wd'}", "--no_progress"]) == 1
    msg = capsys.readouterr().err
    assert ds_export.files[-1] in msg and "lm_head.weight: missing (expected shape [320, 32])" in msg


def test_import_refuses_unsupported_config(ds_export, tmp_path):
    from moe_jax.export.hf import import_hf
    from moe_jax.export.layout import LayoutError

    hf = _copy_export(ds_export.out, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(num_key_value_heads=1, scoring_func="sigmoid")
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LayoutError, match="num_key_value_heads=1.*scoring_func='sigmoid'"):
        import_hf(hf, tmp_path / "wd", progress=False)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["ROUTER='hash'", "NUM_EXPERTS=7", "TOP_K=1", "EXPERT_DIM=16"], "Export refuses Hash models"),
        (["NUM_EXPERTS=0", "NUM_SHARED=4", "TOP_K=1", "EXPERT_DIM=64"], "Export refuses Dense-xN models"),
        (DEEPSEEK[len(TINY) :] + ["HEAD_DIM=8"], "head_dim = hidden_size / num_attention_heads"),
        (
            DEEPSEEK[len(TINY) :] + ["MoEConfig.router_score='sigmoid'", "MoEConfig.renormalize_topk=True"],
            "Export it with --format=transformers, which writes sigmoid-scored models as transformers' "
            "Glm4MoeForCausalLM",
        ),
        (DEEPSEEK[len(TINY) :] + ["MoEConfig.routed_scaling_factor=2.5"], "routed_scaling_factor=2.5"),
        (DEEPSEEK[len(TINY) :] + ["ROUTER='expert_choice'"], "Export refuses expert-choice models"),
        (
            DEEPSEEK[len(TINY) :] + ["MoEConfig.topk_groups=3", "MoEConfig.num_expert_groups=7"],
            "no exported architecture holds this softmax model",
        ),
        (
            DEEPSEEK[len(TINY) :] + ["MoEConfig.selection_bias=True", "MoEConfig.bias_update_speed=0.001"],
            "selection_bias=True (DeepSeek-V3's auxiliary-loss-free balancing)",
        ),
    ],
)
def test_export_refuses_with_clear_message(tmp_path, extra, message, capsys):
    from moe_jax.cli import main
    from moe_jax.config import ModelConfig
    from moe_jax.configs.gin_utils import parse_gin

    parse_gin(["architectures/moe.gin", "runs/proxy_cpu.gin"], TINY + extra)
    wd = tmp_path / "wd"
    wd.mkdir()
    import gin

    (wd / "config.gin").write_text(gin.config_str())
    ModelConfig()  # the configuration itself is valid
    assert main(["export", f"--workdir={wd}", f"--out={tmp_path / 'hf'}", "--no_progress"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_dense_model_exports_as_all_dense_layers(tmp_path):
    import jax.numpy as jnp

    from moe_jax.export import numpy_reference
    from moe_jax.export.hf import export_hf, import_hf, read_hf_dir
    from moe_jax.export.safetensors_io import load_tensor
    from moe_jax.train.restore import load_trained

    wd = make_workdir(tmp_path / "dense", TINY, arch="architectures/dense.gin")
    res = export_hf(wd, tmp_path / "hf", progress=False)
    cfg, infos, _ = read_hf_dir(res.out)
    assert cfg["n_routed_experts"] is None and cfg["first_k_dense_replace"] == 3
    tokens = np.arange(20).reshape(2, 10)
    ours = np.asarray(load_trained(wd).model()(jnp.asarray(tokens)).logits)
    ref = numpy_reference.forward(cfg, {n: load_tensor(i) for n, i in infos.items()}, tokens)
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4
    back = import_hf(res.out, tmp_path / "back", progress=False)
    assert back.model_cfg.moe is None and back.model_cfg.num_layers == 3


# ----------------------------------------------------------------------------------- the layout table


@pytest.mark.parametrize(
    "spec, shape",
    [
        ("[l] d h k -> (h k) d", (3, 8, 2, 4)),
        ("[l] h k d -> d (h k)", (3, 2, 4, 8)),
        ("[l] [e] d [1] f -> f d", (3, 5, 8, 2, 6)),
        ("d v -> v d", (8, 11)),
    ],
)
def test_tensor_spec_is_invertible(spec, shape):
    from moe_jax.export.layout import TensorSpec

    s = TensorSpec.parse(spec)
    x = np.random.default_rng(0).standard_normal(shape)
    idx = s.index(l=2, e=4)
    hf = s.to_hf(x[idx])
    assert hf.shape == s.hf_shape(shape) and hf.flags.c_contiguous
    np.testing.assert_array_equal(s.from_hf(hf, shape), x[idx])


def test_spec_semantics_match_hf_linear():
    """q_proj.weight [H*Dh, d] applied as x @ W.T equals our einsum over wq [d, H, Dh] (head-major)."""
    from moe_jax.export.layout import TensorSpec

    wq = np.random.default_rng(1).standard_normal((1, 8, 2, 4))
    x = np.random.default_rng(2).standard_normal((5, 8))
    w = TensorSpec.parse("[l] d h k -> (h k) d").to_hf(wq[0])
    np.testing.assert_allclose((x @ w.T).reshape(5, 2, 4), np.einsum("td,dhk->thk", x, wq[0]))


@pytest.mark.parametrize("bad", ["d h -> d", "d -> d d", "[l] d -> (d) [l]"])
def test_bad_specs_are_rejected(bad):
    from moe_jax.export.layout import TensorSpec

    with pytest.raises(ValueError):
        TensorSpec.parse(bad)


def test_plan_covers_every_parameter_element_once():
    """16B config (abstract): the plan's HF tensors partition every parameter array exactly."""
    from moe_jax.configs.gin_utils import model_config_from_gin, model_gin_path
    from moe_jax.export.hf import abstract_param_shapes
    from moe_jax.export.layout import plan

    cfg = model_config_from_gin([model_gin_path("deepseekmoe_16b")])
    shapes = abstract_param_shapes(cfg)
    entries = plan(cfg, shapes)
    covered = dict.fromkeys(shapes, 0)
    seen = set()
    for e in entries:
        key = (e.ours, tuple(i if isinstance(i, int) else None for i in e.index))
        assert key not in seen
        seen.add(key)
        covered[e.ours] += math.prod(e.hf_shape)
    assert all(covered[p] == math.prod(s) for p, s in shapes.items())
    names = {e.hf_name: e.hf_shape for e in entries}
    # The published 16B layout (docs/paper.md §3.2).
    assert names["model.layers.0.mlp.gate_proj.weight"] == (10944, 2048)
    assert names["model.layers.1.mlp.gate.weight"] == (64, 2048)
    assert names["model.layers.27.mlp.experts.63.down_proj.weight"] == (2048, 1408)
    assert names["model.layers.5.mlp.shared_experts.gate_proj.weight"] == (2816, 2048)
    assert names["model.layers.3.self_attn.o_proj.weight"] == (2048, 2048)
    assert names["lm_head.weight"] == names["model.embed_tokens.weight"] == (102400, 2048)
    assert abs(sum(math.prod(s) for s in names.values()) / 1e9 - 16.376) < 0.01


def test_chunk_region_maps_blocks_into_hf_views():
    """Every chunk grid cuts each HF tensor into pieces that tile its (unflattened) view exactly."""
    from moe_jax.export.hf import chunk_boxes, chunk_region
    from moe_jax.export.layout import LAYER_RULES, ROUTED_EXPERT_RULES, TensorEntry

    rng = np.random.default_rng(0)
    for rule, shape, chunk in [
        (ROUTED_EXPERT_RULES[1], (3, 5, 6, 2, 4), (2, 2, 4, 1, 3)),
        (LAYER_RULES[1], (3, 6, 2, 4), (1, 5, 1, 4)),
        (LAYER_RULES[4], (3, 2, 4, 6), (3, 2, 3, 6)),
    ]:
        x = rng.standard_normal(shape)
        for l in range(shape[0]):
            index = rule.spec.index(l=l, e=min(l + 1, shape[1] - 1))
            entry = TensorEntry(rule.hf, rule.spec.hf_shape(shape), rule.ours, index, rule.spec)
            out = np.full(rule.spec.hf_view_shape(shape), np.nan)
            for box in chunk_boxes(shape, chunk):
                hit = chunk_region(entry, box)
                if hit is not None:
                    src, dst = hit
                    assert np.isnan(out[dst]).all()  # no element written twice
                    out[dst] = rule.spec.to_hf_view(x[box][src])
            np.testing.assert_array_equal(out.reshape(entry.hf_shape), rule.spec.to_hf(x[index]))

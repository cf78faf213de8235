"""Every gin file parses; every model, shrunk, runs a forward pass and a loss on CPU; bad names fail.

A model is shrunk with gin bindings (width, depth, vocabulary and expert width down; expert counts,
top-k, shared experts, router and dense-first-layer pattern kept), as T5X's gin_configs_test does.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.configs import gin_utils
from moe_jax.configs.params_cli import main as params_main
from moe_jax.model.transformer import Transformer
from moe_jax.train.loss import cross_entropy

MODELS = gin_utils.list_models()
_RUN_FILES = sorted(gin_utils.RUNS_DIR.glob("*.gin"))
# runs are the run files no other run file includes (runs/trainer.gin is a shared fragment)
RUNS = [
    p.stem for p in _RUN_FILES if not any(f"include 'runs/{p.name}'" in q.read_text() for q in _RUN_FILES if q != p)
]

SHRINK = (
    "ModelConfig.vocab_size=256",
    "ModelConfig.d_model=32",
    "ModelConfig.num_layers=2",
    "ModelConfig.num_heads=2",
    "ModelConfig.head_dim=16",
    "ModelConfig.ffn_dim=64",
    "MoEConfig.expert_dim=8",
)


def _config(name: str, bindings=()) -> ModelConfig:
    return gin_utils.model_config_from_gin([gin_utils.model_gin_path(name)], bindings)


def test_the_issue_models_exist():
    paper = [
        "dense_2b",
        "hash_2b",
        "switch_2b",
        "gshard_2b",
        "deepseekmoe_2b",
        "gshard_x1.2_2b",
        "gshard_x1.5_2b",
        "dense_x4_2b",
        "dense_x16_2b",
        "ablation_0s_2of16_2b",
        "ablation_1s_1of15_2b",
        "ablation_1s_3of31_2b",
        "ablation_1s_7of63_2b",
        "ablation_2s_6of62_2b",
        "ablation_4s_4of60_2b",
        "ablation_1s_3of63_2b",
        "deepseekmoe_16b",
        "deepseekmoe_145b",
        "gshard_137b",
        "deepseekmoe_142b_half",
    ]
    families = [m[:-3] for m in paper if m.endswith("_2b")]
    proxies = [f"{f}_{s}" for f in families for s in ("tiny", "small")]
    assert set(paper + proxies) <= set(MODELS)
    assert {"pretrain_2b", "pretrain_16b", "pretrain_145b", "proxy_cpu"} <= set(RUNS)


def test_model_names_are_unique():
    stems = [p.stem for p in gin_utils.MODELS_DIR.rglob("*.gin")]
    assert len(stems) == len(set(stems))


def test_every_gin_file_is_reached():
    """Each file under gin/ is a model, a run, or included (transitively) by a model."""
    reached: set = set()
    todo = [gin_utils.model_gin_path(m) for m in MODELS] + [gin_utils.run_gin_path(r) for r in RUNS]
    assert "trainer" not in RUNS
    while todo:
        path = todo.pop().resolve()
        if path in reached:
            continue
        reached.add(path)
        for inc in re.findall(r"^include '([^']+)'", path.read_text(), flags=re.M):
            assert (gin_utils.GIN_DIR / inc).is_file(), f"{path}: include {inc} not found"
            todo.append(gin_utils.GIN_DIR / inc)
    assert {p.resolve() for p in gin_utils.GIN_DIR.rglob("*.gin")} == reached


@pytest.mark.parametrize("run", RUNS)
def test_runs_parse_with_a_model(run):
    model = (
        "deepseekmoe_tiny"
        if run == "proxy_cpu"
        else {"pretrain_2b": "deepseekmoe_2b", "pretrain_16b": "deepseekmoe_16b"}.get(run, "deepseekmoe_145b")
    )
    cfg = gin_utils.model_config_from_gin([gin_utils.model_gin_path(model), gin_utils.run_gin_path(run)])
    for macro in (
        "SEQ_LEN",
        "BATCH_SIZE",
        "TRAIN_STEPS",
        "LEARNING_RATE",
        "WARMUP_STEPS",
        "SCHEDULE",
        "WEIGHT_DECAY",
        "BETA1",
        "BETA2",
        "GRAD_CLIP",
    ):
        assert gin_utils.query_macro(macro) is not None, (run, macro)
    assert cfg.moe is not None and cfg.moe.dispatch == "dropless"


@pytest.mark.parametrize(
    "run,alpha1,alpha2,seq_len,lr",
    [
        ("pretrain_2b", 0.01, 0.0, 2048, 1.08e-3),
        ("pretrain_16b", 0.001, 0.0, 4096, 4.2e-4),
        ("pretrain_145b", 0.003, 0.05, 4096, 3.0e-4),
    ],
)
def test_runs_carry_the_paper_balance_factors(run, alpha1, alpha2, seq_len, lr):
    cfg = gin_utils.model_config_from_gin([gin_utils.model_gin_path("deepseekmoe_145b"), gin_utils.run_gin_path(run)])
    assert (cfg.moe.expert_balance_alpha, cfg.moe.device_balance_alpha) == (alpha1, alpha2)
    assert gin_utils.query_macro("SEQ_LEN") == seq_len and gin_utils.query_macro("LEARNING_RATE") == lr


_LOSSES: dict[ModelConfig, float] = {}


def _forward_loss(cfg: ModelConfig) -> float:
    """Build the model for real, run a forward pass on random tokens and return CE + aux loss.

    Shrunk proxies and their 2B originals give the same config (the shrink overrides every trunk
    size), so each distinct config is run once per test process.
    """
    if cfg not in _LOSSES:
        model = Transformer(cfg, nnx.Rngs(0))
        tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
        out = model(tokens[:, :-1], rng=jax.random.key(2))
        assert out.logits.shape == (2, 15, cfg.vocab_size)
        nll, count = cross_entropy(out.logits, tokens[:, 1:])
        ce = float(nll / count)
        # an untrained model (init std 0.006) predicts about uniformly: loss near log(V)
        assert abs(ce - np.log(cfg.vocab_size)) < 0.5
        if cfg.moe is not None and cfg.moe.num_experts and cfg.moe.router != "hash":
            assert float(out.moe_losses.expert_balance) > 0
        _LOSSES[cfg] = ce + float(out.aux_loss)
    return _LOSSES[cfg]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_shrunk_model_forward_and_loss(name):
    full = _config(name)
    cfg = _config(name, SHRINK)
    assert (cfg.d_model, cfg.num_layers, cfg.vocab_size) == (32, 2, 256)
    assert cfg.first_k_dense == full.first_k_dense
    if full.moe is None:
        assert cfg.moe is None
    else:  # the expert pattern survives the shrink
        keep = ("num_experts", "num_shared_experts", "top_k", "router")
        assert [getattr(cfg.moe, k) for k in keep] == [getattr(full.moe, k) for k in keep]
        assert cfg.moe.expert_dim == 8
    assert np.isfinite(_forward_loss(cfg))


def test_overrides_by_macro_binding_and_bare_word():
    cfg = _config(
        "gshard_tiny",
        ["NUM_LAYERS=3", "ModelConfig.d_model=96", "MoEConfig.top_k=1", "MoEConfig.second_expert_policy=random"],
    )
    assert (cfg.num_layers, cfg.d_model, cfg.moe.top_k, cfg.moe.second_expert_policy) == (3, 96, 1, "random")


def test_split_gin_args_keeps_order_and_rest():
    args = gin_utils.split_gin_args(
        [
            "--model=dense_tiny",
            "--seq_len=7",
            "--gin_file",
            "runs/proxy_cpu.gin",
            "--gin.NUM_LAYERS=1",
            "--gin_bindings=MoEConfig.router=hash",
        ]
    )
    assert args.gin_files == (str(gin_utils.model_gin_path("dense_tiny")), "runs/proxy_cpu.gin")
    assert args.bindings == ("NUM_LAYERS=1", "MoEConfig.router='hash'")
    assert args.rest == ("--seq_len=7",)


@pytest.mark.parametrize(
    "argv,gin_says",
    [
        (["--model=deepseekmoe_2b", "--gin.ModelConfig.num_layrs=2"], "doesn't have a parameter named 'num_layrs'"),
        (["--model=deepseekmoe_2b", "--gin.ModelConfg.num_layers=2"], "No configurable matching 'ModelConfg'"),
        (["--model=deepseekmoe_2b", "--gin.MoEConfig.topk=2"], "doesn't have a parameter named 'topk'"),
        (["--model=deepseekmoe_2b", "--gin.NUM_LAYRS=2"], "NUM_LAYRS"),
        (["--model=deepseekmoe_2B"], "'deepseekmoe_2B' is not a model"),
        (["--gin_file=gin/models/deepseek_2b.gin"], "not found"),
    ],
)
def test_bad_names_fail_with_gin_message_and_models(argv, gin_says, capsys):
    assert params_main(argv) == 2
    err = capsys.readouterr().err
    assert gin_says in err
    assert "Available models" in err and "deepseekmoe_2b" in err and "deepseekmoe_tiny" in err


def test_bad_binding_fails_before_building_a_model(monkeypatch):
    def boom(*_):
        raise AssertionError("a model was built")

    monkeypatch.setattr("moe_jax.model.params.abstract_model", boom)
    with pytest.raises(gin_utils.GinConfigError, match="d_modle"):
        gin_utils.model_config_from_gin([gin_utils.model_gin_path("deepseekmoe_145b")], ["ModelConfig.d_modle=1"])


def test_params_cli_single_model(capsys):
    assert params_main(["--model=deepseekmoe_16b", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"seq_len": 4096' in out and '"total": 16375728128' in out
    assert params_main(["--model=deepseekmoe_tiny", "--gin_file=runs/proxy_cpu.gin", "--gin.NUM_LAYERS=1"]) == 0
    out = capsys.readouterr().out
    assert "T=256, from SEQ_LEN of the run file" in out


@pytest.mark.slow
def test_loss_is_differentiable_for_a_shrunk_model():
    cfg = _config("deepseekmoe_tiny", SHRINK)
    model = Transformer(cfg, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)

    def loss_fn(m):
        out = m(tokens[:, :-1])
        nll, count = cross_entropy(out.logits, tokens[:, 1:])
        return nll / count + out.aux_loss

    grads = nnx.grad(loss_fn)(model)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0


@pytest.mark.parametrize("run", RUNS)
def test_runs_build_the_train_config(run):
    """Each run file gives TrainConfig (bound through runs/trainer.gin) the paper's schedule."""
    from moe_jax.train.config import TrainConfig

    gin_utils.parse_gin([gin_utils.model_gin_path("deepseekmoe_tiny"), gin_utils.run_gin_path(run)])
    train = TrainConfig()
    assert (train.seq_len, train.batch_size, train.steps) == tuple(
        gin_utils.query_macro(m) for m in ("SEQ_LEN", "BATCH_SIZE", "TRAIN_STEPS")
    )
    assert train.schedule == ("constant" if run == "pretrain_145b" else "step_decay")


def test_command_line_values_are_quoted_only_when_gin_needs_it():
    from moe_jax.configs.gin_utils import _normalise_binding

    assert _normalise_binding("MoEConfig.router=hash") == "MoEConfig.router='hash'"
    assert _normalise_binding("TrainConfig.data_cache=/a/b c") == "TrainConfig.data_cache='/a/b c'"
    for unchanged in (
        "X.n=3",
        "X.f=1e-3",
        "X.t=(0.8, 0.9)",
        "X.b=True",
        "X.r=@MoEConfig()",
        "X.m=%MACRO",
        "X.s='quoted'",
    ):
        assert _normalise_binding(unchanged) == unchanged

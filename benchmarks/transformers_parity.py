"""Logits and generation parity of `--format=transformers` on the CPU proxies and real held-out text
(docs/export.md, "Measured parity").

    python benchmarks/transformers_parity.py [--models deepseekmoe_tiny,gshard_tiny,...] [--cache DIR]
        [--rows 4] [--seq 256] [--init_std 0.02] [--dir /tmp/moe_jax_tf_parity]

For each proxy model (gin/models/proxy/<name>.gin, default all tiny ones that export): a workdir with
randomly initialised parameters (N(0, init_std), norm scales 1 + N(0, 0.3)) is exported in float32 with
`--format=transformers`, loaded by `AutoModelForCausalLM`, and run on `rows` x `seq` tokens of the
token cache's held-out split (documents as training sees them: BOS id 0, then the text's ids). Printed:
max |ours - theirs| / max |theirs| of the logits, whether greedy generate() of 16 tokens after a
32-token prompt equals `moe_jax.evaluate.generate.greedy_generate`, and whether AutoTokenizer encodes
the rows' documents as the SentencePiece model. Needs `moe-jax data build` (the default cache) and the
`hf` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = (
    "deepseekmoe_tiny",
    "gshard_tiny",
    "switch_tiny",
    "dense_tiny",
    "dense_x4_tiny",
    "dense_x16_tiny",
    "ablation_0s_2of16_tiny",
    "ablation_2s_6of62_tiny",
    "ablation_4s_4of60_tiny",
    "gshard_x1.5_tiny",
)


def make_workdir(workdir: Path, model: str, init_std: float, cache: Path | None) -> Path:
    """config.gin + checkpoints/0 with random parameters (norm scales randomised too)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import gin
    from moe_jax.config import ModelConfig
    from moe_jax.configs.gin_utils import model_gin_path, parse_gin
    from moe_jax.model.transformer import Transformer
    from moe_jax.train.checkpoint import Checkpointer
    from moe_jax.train.config import TrainConfig
    from moe_jax.train.optimizer import make_optimizer
    from moe_jax.train.step import TrainState

    extra = [f"TrainConfig.data_cache='{cache}'"] if cache else []
    parse_gin(
        [model_gin_path(model), "runs/proxy_cpu.gin"],
        [f"INIT_STD={init_std}", *extra],
        modules=("moe_jax.train.config", "moe_jax.parallel.mesh"),
    )
    cfg, train_cfg = ModelConfig(), TrainConfig()
    workdir.mkdir(parents=True)
    (workdir / "config.gin").write_text(gin.config_str())
    params = nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + 0.3 * jnp.asarray(rng.standard_normal(x.shape), x.dtype) if "scale" in jax.tree_util.keystr(p) else x
        ),
        params,
    )
    state = TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=make_optimizer(train_cfg).init(params))
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(0, state, {})
    ckpt.close()
    gin.clear_config()
    return workdir


def heldout_docs(cache: Path, rows: int, min_chars: int) -> list[str]:
    """`rows` held-out documents of the cache's corpus, from different sources where possible."""
    meta = json.loads((cache / "meta.json").read_text())
    docs = []
    for src in sorted(p for p in Path(meta["corpus_dir"]).iterdir() if (p / "heldout.jsonl").exists()):
        for line in (src / "heldout.jsonl").open():
            rec = json.loads(line)
            text = rec.get("text", "") if isinstance(rec, dict) else str(rec)
            if len(text) >= min_chars:
                docs.append(text)
                break
    return docs[:rows]


def measure(model: str, root: Path, cache: Path, rows: int, seq: int, init_std: float) -> dict:
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_jax.evaluate.generate import greedy_generate
    from moe_jax.export.hf import export_hf
    from moe_jax.train.restore import load_trained

    t0 = time.time()
    wd = make_workdir(root / model, model, init_std, cache)
    res = export_hf(wd, root / f"{model}_tf", fmt="transformers", progress=False)
    tok = AutoTokenizer.from_pretrained(res.out)
    docs = heldout_docs(cache, rows, 8 * seq)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(res.out / "tokenizer.model"))
    tok_ok = all(tok(d).input_ids == [0] + sp.encode(d) for d in docs)
    tokens = np.asarray([tok(d).input_ids[:seq] for d in docs])
    theirs_model = AutoModelForCausalLM.from_pretrained(res.out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = theirs_model(torch.as_tensor(tokens)).logits.numpy().astype(np.float64)
    ours_model = load_trained(wd).model()
    ours = np.asarray(ours_model(jnp.asarray(tokens)).logits, np.float64)
    err = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
    prompt = tokens[:1, :32]
    with torch.no_grad():
        gen = theirs_model.generate(
            torch.as_tensor(prompt),
            attention_mask=torch.ones_like(torch.as_tensor(prompt)),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    same_gen = gen[0, 32:].tolist() == greedy_generate(ours_model, prompt.tolist(), 16)[0]
    return {
        "model": model,
        "architecture": res.architecture,
        "params": int(sum(p.numel() for p in theirs_model.parameters())),
        "tokens": list(tokens.shape),
        "max_rel_err": err,
        "logits_std": float(np.std(theirs)),
        "generate_equal": same_gen,
        "tokenizer_equal": tok_ok,
        "seconds": round(time.time() - t0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--cache", default=None, help="token cache (default: the data build's for vocabulary 8192)")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--init_std", type=float, default=0.02)
    p.add_argument("--dir", default="/tmp/moe_jax_tf_parity")
    args = p.parse_args()

    from moe_jax.data import paths as data_paths

    cache = Path(args.cache) if args.cache else data_paths.data_dir() / "cache" / "default_v8192_s512"
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    for model in args.models.split(","):
        print(json.dumps(measure(model, root, cache, args.rows, args.seq, args.init_std)), flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

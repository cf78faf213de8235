"""Helpers of the evaluation tests: a character tokenizer, a bigram "model" with known log-probabilities,
oe_eval-style request files, and tiny `moe-jax train`-like workdirs with random weights."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from helpers import save_checkpoint, tiny_trunk_gin, write_config_gin

ALPHABET = "\x00 abcdefghijklmnopqrstuvwxyzAQ?:.\n"  # id 0 = pad / BOS


class CharTokenizer:
    """One token per character of ALPHABET (id = position); decode is the inverse."""

    vocab_size = len(ALPHABET)

    def encode(self, texts):
        return [[ALPHABET.index(c) for c in t] for t in texts]

    def decode(self, ids):
        return "".join(ALPHABET[i] for i in ids)


def bigram_table(rows: dict[str, dict[str, float]], default: dict[str, float]) -> np.ndarray:
    """Log-prob table L [V, V]: L[prev, next] = log q_prev(next); q given for some characters, the rest of
    the mass (to 1) shared equally by the other characters."""
    v = len(ALPHABET)
    table = np.zeros((v, v))
    for prev in range(v):
        q = rows.get(ALPHABET[prev], default)
        rest = (1.0 - sum(q.values())) / (v - len(q))
        p = np.full(v, rest)
        for c, val in q.items():
            p[ALPHABET.index(c)] = val
        table[prev] = np.log(p)
    return table


def write_requests(folder: Path, lines: list[dict]) -> Path:
    """An oe_eval `requests.jsonl.gz` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "requests.jsonl.gz", "wt", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return folder / "requests.jsonl.gz"


def mc_lines(docs: list[tuple[str, list[str], int]], uncond: bool = True, query_prefix: str = "") -> list[dict]:
    """Request lines of multiple-choice docs (context, choices, gold), + unconditional lines if asked.
    Choices are written with a leading space, as OLMES renders them."""
    out = []
    for d, (ctx, choices, gold) in enumerate(docs):
        doc = {"query": ctx, "choices": choices, "gold": gold}
        for i, c in enumerate(choices):
            out.append(
                {
                    "doc": doc,
                    "request": {"context": query_prefix + ctx, "continuation": " " + c},
                    "doc_id": d,
                    "idx": i,
                    "label": gold,
                }
            )
            out.append(dict(out[-1]))  # a duplicate line: de-duplicated on (doc_id, idx)
        if uncond:
            for i, c in enumerate(choices):
                out.append(
                    {
                        "doc": doc,
                        "request": {"context": "Answer:", "continuation": " " + c},
                        "doc_id": 1_000_000 + d,
                        "idx": i,
                        "label": gold,
                    }
                )
    return out


# d 32, 2 layers, 2 heads x 16, vocab 320 (the train_cache fixture's), 1 shared + 7 routed of width 16, top-3.
TINY = tiny_trunk_gin() + ["SEQ_LEN=64", "BATCH_SIZE=16"]
DEEPSEEK = TINY + ["NUM_EXPERTS=7", "NUM_SHARED=1", "TOP_K=3", "EXPERT_DIM=16"]
GSHARD = TINY + ["NUM_EXPERTS=4", "NUM_SHARED=0", "TOP_K=2", "EXPERT_DIM=32"]


def make_workdir(path: Path, bindings, data_cache: Path, seed: int = 0, step: int = 3) -> Path:
    """A workdir as `moe-jax train` leaves it (config.gin + checkpoints/<step>), random weights."""
    from flax import nnx

    from moe_jax.model.transformer import Transformer

    extra = [f"TrainConfig.data_cache='{data_cache}'"]
    model_cfg, train_cfg = write_config_gin(path, ["architectures/moe.gin", "runs/proxy_cpu.gin"], [*bindings, *extra])
    params = nnx.state(Transformer(model_cfg, nnx.Rngs(seed)), nnx.Param)
    return save_checkpoint(path, train_cfg, params, step)

"""Greedy generation, with a KV cache (the model's forward given a `KVCache`: prefill, then one token a
step) or without one (the model's forward over the whole sequence at every step). The two give the same
tokens (tests).

    new = greedy_generate(model, [[0, 17, 42], [0, 5]], max_new_tokens=16, eos_id=1)

Prompts are token ids (the caller adds the decoder's BOS input, id 0, when it wants one). With the cache
the batch is left-padded; without it, right-padded (the model is causal, so padding after a row's end
never changes that row). Generation runs `max_new_tokens` steps or until every row has emitted `eos_id`;
a row's output stops at (and includes) its first eos.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.model.transformer import KVCache


def _cut(seq: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in seq:
        return seq[: seq.index(eos_id) + 1]
    return seq


class GreedyDecoder:
    """Jitted greedy decoding of one model, compiled once per (batch, prompt length, total length)."""

    def __init__(self, model):
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg

        def prefill(state, tokens, cache):
            out = nnx.merge(self.graphdef, state)(tokens, cache=cache)
            return jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32), out.cache

        def full(state, buf, lengths):
            logits = nnx.merge(self.graphdef, state)(buf).logits
            last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
            return jnp.argmax(last, axis=-1).astype(jnp.int32)

        self._prefill = jax.jit(prefill)  # also the one-token decode step (S = 1)
        self._full = jax.jit(full)

    def with_cache(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        eos_id: int | None = None,
        pad_to: int | None = None,
    ) -> list[list[int]]:
        """Left-pad the prompts to `pad_to` (default the longest), prefill, then decode one token a step."""
        b = len(prompts)
        plen = max(pad_to or 0, max(len(p) for p in prompts))
        tokens = np.zeros((b, plen), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, plen - len(p) :] = p
        offset = np.array([plen - len(p) for p in prompts], np.int32)
        cache = KVCache.init(self.cfg, b, plen + max_new_tokens, offset)
        nxt, cache = self._prefill(self.state, jnp.asarray(tokens), cache)
        out = [[] for _ in range(b)]
        for step in range(max_new_tokens):
            host = np.asarray(nxt)
            for i in range(b):
                out[i].append(int(host[i]))
            if eos_id is not None and all(eos_id in o for o in out):
                break
            if step + 1 < max_new_tokens:
                nxt, cache = self._prefill(self.state, nxt[:, None], cache)
        return [_cut(o, eos_id) for o in out]

    def without_cache(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int | None = None
    ) -> list[list[int]]:
        """The reference: the model's own forward over a right-padded [B, P + max_new] buffer every step."""
        b = len(prompts)
        total = max(len(p) for p in prompts) + max_new_tokens
        buf = np.zeros((b, total), np.int32)
        lengths = np.array([len(p) for p in prompts], np.int32)
        for i, p in enumerate(prompts):
            buf[i, : len(p)] = p
        out = [[] for _ in range(b)]
        for _ in range(max_new_tokens):
            host = np.asarray(self._full(self.state, jnp.asarray(buf), jnp.asarray(lengths)))
            for i in range(b):
                out[i].append(int(host[i]))
                buf[i, lengths[i]] = host[i]
            lengths += 1
            if eos_id is not None and all(eos_id in o for o in out):
                break
        return [_cut(o, eos_id) for o in out]


def greedy_generate(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, use_cache: bool = True, eos_id: int | None = None
) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids) by `model`; see the module docstring."""
    dec = GreedyDecoder(model)
    if use_cache:
        return dec.with_cache(prompts, max_new_tokens, eos_id)
    return dec.without_cache(prompts, max_new_tokens, eos_id)


@dataclasses.dataclass
class Generation:
    """One generated answer: the text (cut at the first stop string) and the new token ids."""

    text: str
    tokens: list[int]


def generate_texts(
    decoder: GreedyDecoder,
    tokenizer,
    contexts: Sequence[str],
    *,
    seq_len: int,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    eos_id: int | None = 1,
    bos_id: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "generating",
) -> list[Generation]:
    """Greedy answers to text prompts: each prompt is [BOS] + tokens, cut from the left so that prompt +
    `max_new_tokens` fit in `seq_len`; prompts are batched by length (left-padded to a bucket length)."""
    from tqdm import tqdm

    from moe_jax.evaluate.scoring import bucket_lengths

    budget = seq_len - max_new_tokens
    if budget < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in seq_len={seq_len}")
    ids = [([bos_id] + t)[-budget:] for t in tokenizer.encode(list(contexts))]
    buckets = [b for b in bucket_lengths(budget) if b <= budget] or [budget]
    padded = [next((b for b in buckets if b >= len(t)), budget) for t in ids]
    order = sorted(range(len(ids)), key=lambda i: (padded[i], i))
    results: list[Generation | None] = [None] * len(ids)
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for group in tqdm(groups, desc=desc, unit="batch", disable=not progress, leave=False, dynamic_ncols=True):
        prompts = [ids[i] for i in group]
        pad_to = max(padded[i] for i in group)
        prompts += [[bos_id]] * (batch_size - len(prompts))  # fixed batch shape: one compile per length
        new = decoder.with_cache(prompts, max_new_tokens, eos_id, pad_to=pad_to)
        for i, toks in zip(group, new):
            body = [t for t in toks if t != eos_id]
            text = tokenizer.decode(body)
            cut = min([text.find(s) for s in stop if s and s in text] or [len(text)])
            results[i] = Generation(text=text[:cut], tokens=toks)
    return results  # type: ignore[return-value]

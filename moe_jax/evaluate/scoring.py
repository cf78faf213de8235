"""Likelihood scoring of (context, continuation) requests: tokenisation, windows, fixed-shape batches,
and the metrics (accuracy with length / unconditional normalisation, bits per byte of a gold answer).

Conventions (documented in docs/evaluation.md):

* **Tokenisation.** Context and continuation are tokenised separately and concatenated, so the
  continuation's tokens are exactly `encode(continuation)` (the usual lm-eval-harness/OLMES choice). The
  sequence starts with the decoder's BOS input, the pad id 0, as in training.
* **Windows.** A request becomes one window `[BOS] + context + continuation`, truncated from the left to
  the model's length (the training `seq_len`). A continuation longer than `seq_len // 2` is scored in
  rolling windows of `seq_len // 2` new tokens, each with up to `seq_len // 2` (or more) tokens of
  preceding text as context, so every continuation token is scored exactly once.
* **Length normalisation** ("acc_per_char", OLMES): sum log p(continuation) / number of characters of
  the continuation string (with its leading space).
* **Unconditional normalisation** ("acc_uncond", ARC in DeepSeek's protocol): log p(cont | context) -
  log p(cont | "Answer:"), using the unconditional requests shipped with the task.
* **Bits per byte** of a gold answer: -sum log2 p(answer tokens) / UTF-8 bytes of the answer string;
  the task figure is the total over docs (sum of bits / sum of bytes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from moe_jax.evaluate.tasks import Request, TaskData

UNCOND_CONTEXT = "Answer:"


class Tokenizer(Protocol):
    """What scoring needs of a tokenizer (sentencepiece.SentencePieceProcessor has it)."""

    def encode(self, text: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class Window:
    """One model input row: `inputs` [n] predict `targets` [n]; `scored` [n] marks continuation targets.
    `request` is the index of the request it belongs to."""

    request: int
    inputs: np.ndarray
    targets: np.ndarray
    scored: np.ndarray

    @property
    def length(self) -> int:
        return int(self.inputs.shape[0])


def request_windows(
    request: int, context: Sequence[int], continuation: Sequence[int], seq_len: int, bos_id: int = 0
) -> list[Window]:
    """Windows that score every continuation token once, each with as much left context as fits.

    Args:
      request: index stored in each window.
      context, continuation: token ids (continuation non-empty).
      seq_len: the model's length; every window has at most `seq_len` inputs.
      bos_id: the decoder's first input (the pad id 0 in this project, as seqio).

    Returns:
      One window when the continuation has at most seq_len // 2 tokens (the context is cut from the
      left), else rolling windows scoring seq_len // 2 new tokens each.
    """
    if not len(continuation):
        raise ValueError(f"request {request}: empty continuation")
    full = np.asarray([bos_id, *context, *continuation], np.int32)
    first = len(full) - len(continuation)  # index in `full` of the first continuation token
    chunk = len(continuation) if len(continuation) <= seq_len // 2 else max(seq_len // 2, 1)
    windows, a = [], first
    while a < len(full):
        b = min(a + chunk, len(full))  # this window scores targets full[a:b]
        s = max(0, b - 1 - seq_len)  # inputs full[s:b-1] predict full[s+1:b]
        windows.append(Window(request, full[s : b - 1], full[s + 1 : b], np.arange(s + 1, b) >= a))
        a = b
    return windows


def bucket_lengths(seq_len: int, smallest: int = 16) -> list[int]:
    """Padded row lengths: 16, 24, 32, 48, 64, 96, ... (x1.5 / x4/3 steps) up to and including seq_len,
    so padding wastes at most a third and there are few shapes to compile."""
    out, n = [], smallest
    while n < seq_len:
        out += [n] + ([n * 3 // 2] if n * 3 // 2 < seq_len else [])
        n *= 2
    return sorted(set(out + [seq_len]))


@dataclasses.dataclass
class Batch:
    """A fixed-shape batch [B, L]: inputs, targets, weights (1.0 on scored targets), owner [B] (the request
    of each row, -1 for all-padding rows)."""

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    owner: np.ndarray


def make_batches(windows: Sequence[Window], seq_len: int, batch_tokens: int, row_multiple: int = 1) -> Iterator[Batch]:
    """Sort windows by length, pad each to its bucket length, group equal lengths into batches of
    max(row_multiple, batch_tokens // L rounded down to row_multiple) rows (last batch padded with rows)."""
    buckets = bucket_lengths(seq_len)
    padded = [next(b for b in buckets if b >= w.length) for w in windows]
    order = sorted(range(len(windows)), key=lambda i: (padded[i], i))
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(padded[i], []).append(i)
    for length, idx in groups.items():
        rows = max(row_multiple, (batch_tokens // length) // row_multiple * row_multiple)
        for start in range(0, len(idx), rows):
            part = idx[start : start + rows]
            batch = Batch(
                np.zeros((rows, length), np.int32),
                np.zeros((rows, length), np.int32),
                np.zeros((rows, length), np.float32),
                np.full((rows,), -1, np.int64),
            )
            for r, i in enumerate(part):
                w = windows[i]
                batch.inputs[r, : w.length] = w.inputs
                batch.targets[r, : w.length] = w.targets
                batch.weights[r, : w.length] = w.scored
                batch.owner[r] = w.request
            yield batch


def num_batches(windows: Sequence[Window], seq_len: int, batch_tokens: int, row_multiple: int = 1) -> int:
    buckets = bucket_lengths(seq_len)
    counts: dict[int, int] = {}
    for w in windows:
        b = next(b for b in buckets if b >= w.length)
        counts[b] = counts.get(b, 0) + 1
    return sum(
        math.ceil(n / max(row_multiple, (batch_tokens // b) // row_multiple * row_multiple)) for b, n in counts.items()
    )


@dataclasses.dataclass
class RequestScores:
    """Per request [N]: logprob (sum of log p over continuation tokens, nats), tokens (scored), greedy (every
    continuation token is the argmax), chars and bytes of the continuation string; truncated: requests
    whose [BOS] + context + continuation did not fit in seq_len (context cut from the left)."""

    logprob: np.ndarray
    tokens: np.ndarray
    greedy: np.ndarray
    chars: np.ndarray
    bytes: np.ndarray
    truncated: int = 0


# score_fn(batch) -> (logprob sum [B], scored count [B], all-greedy [B]) as numpy.
ScoreFn = Callable[[Batch], tuple[np.ndarray, np.ndarray, np.ndarray]]


def tokenize_requests(requests: Sequence[Request], tokenizer: Tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Context and continuation ids of every request (each string encoded once)."""
    contexts = sorted({r.context for r in requests})
    ctx_ids = dict(zip(contexts, tokenizer.encode(contexts))) if contexts else {}
    conts = [r.continuation for r in requests]
    return [ctx_ids[r.context] for r in requests], tokenizer.encode(conts)


def score_requests(
    requests: Sequence[Request],
    tokenizer: Tokenizer,
    score_fn: ScoreFn,
    seq_len: int,
    batch_tokens: int = 8192,
    row_multiple: int | None = None,
    progress: bool = True,
    desc: str = "scoring",
) -> RequestScores:
    """Tokenise, window, batch and score `requests` with `score_fn`; sums windows back per request.
    Batches have a multiple of `row_multiple` rows (default: `score_fn.row_multiple`, else 1)."""
    from tqdm import tqdm

    if row_multiple is None:
        row_multiple = getattr(score_fn, "row_multiple", 1)
    ctx, cont = tokenize_requests(requests, tokenizer)
    windows = [w for i, (c, x) in enumerate(zip(ctx, cont)) for w in request_windows(i, c, x, seq_len)]
    n = len(requests)
    logprob, tokens, greedy = np.zeros(n), np.zeros(n, np.int64), np.ones(n, bool)
    total = num_batches(windows, seq_len, batch_tokens, row_multiple)
    for batch in tqdm(
        make_batches(windows, seq_len, batch_tokens, row_multiple),
        total=total,
        desc=desc,
        unit="batch",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    ):
        lp, cnt, gr = score_fn(batch)
        real = batch.owner >= 0
        np.add.at(logprob, batch.owner[real], np.asarray(lp, np.float64)[real])
        np.add.at(tokens, batch.owner[real], np.asarray(cnt).astype(np.int64)[real])
        np.logical_and.at(greedy, batch.owner[real], np.asarray(gr, bool)[real])
    return RequestScores(
        logprob=logprob,
        tokens=tokens,
        greedy=greedy,
        chars=np.array([len(r.continuation) for r in requests]),
        bytes=np.array([len(r.continuation.encode("utf-8")) for r in requests]),
        truncated=int(sum(1 + len(c) + len(x) > seq_len + 1 for c, x in zip(ctx, cont))),
    )


@dataclasses.dataclass
class MCMetrics:
    """Multiple-choice accuracies over `docs` questions (fractions in [0, 1]).

    acc: argmax of sum log p; acc_per_char: of sum log p / characters; acc_uncond: of log p(cont | ctx) -
    log p(cont | "Answer:") (None without unconditional requests); chance: mean of 1 / choices.
    """

    docs: int
    acc: float
    acc_per_char: float
    acc_uncond: float | None
    chance: float

    def get(self, name: str) -> float | None:
        return getattr(self, name)


def _argmax_per_doc(
    doc: np.ndarray, choice: np.ndarray, score: np.ndarray, num_docs: int, max_choices: int
) -> np.ndarray:
    table = np.full((num_docs, max_choices), -np.inf)
    table[doc, choice] = score
    return np.argmax(table, axis=1)


def mc_predictions(task: TaskData, scores: RequestScores) -> dict[str, np.ndarray]:
    """Predicted choice per doc [D] under each rule: "acc" (sum log p), "acc_per_char" (sum log p / chars)
    and, when unconditional requests exist, "acc_uncond" (log p(cont | ctx) - log p(cont | "Answer:"))."""
    req = task.requests
    cond = np.array([not r.uncond for r in req], bool)
    doc = np.array([r.doc for r in req], np.int64)
    choice = np.array([r.choice for r in req], np.int64)
    n_docs = len(task.docs)
    width = max([d.num_choices for d in task.docs] + [int(choice.max()) + 1 if len(choice) else 1])
    pick = lambda score: _argmax_per_doc(doc[cond], choice[cond], score[cond], n_docs, width)
    out = {"acc": pick(scores.logprob), "acc_per_char": pick(scores.logprob / np.maximum(scores.chars, 1))}
    if task.has_uncond:
        u = np.full((n_docs, width), np.nan)
        u[doc[~cond], choice[~cond]] = scores.logprob[~cond]
        pmi = scores.logprob - np.where(cond, u[doc, choice], 0.0)
        if not np.isnan(pmi[cond]).any():
            out["acc_uncond"] = pick(pmi)
    return out


def mc_metrics(task: TaskData, scores: RequestScores) -> MCMetrics:
    """Accuracies of a multiple-choice task from its request scores (requests as `task.requests`)."""
    gold = np.array([d.gold for d in task.docs])
    preds = mc_predictions(task, scores)
    acc = {k: float(np.mean(v == gold)) if len(gold) else float("nan") for k, v in preds.items()}
    chance = float(np.mean([1.0 / d.num_choices for d in task.docs])) if task.docs else float("nan")
    return MCMetrics(
        docs=len(task.docs),
        acc=acc["acc"],
        acc_per_char=acc["acc_per_char"],
        acc_uncond=acc.get("acc_uncond"),
        chance=chance,
    )


def with_uncond_requests(task: TaskData) -> TaskData:
    """The task plus unconditional requests (context "Answer:") for every choice, when none shipped."""
    if task.has_uncond or task.spec.primary != "acc_uncond":
        return task
    extra = [Request(UNCOND_CONTEXT, r.continuation, r.doc, r.choice, uncond=True) for r in task.requests]
    return dataclasses.replace(task, requests=task.requests + extra)


@dataclasses.dataclass
class BPBMetrics:
    """Bits per byte of the gold answers: bits_per_byte = sum bits / sum bytes over docs;
    doc_mean = mean of per-doc bits/byte; tokens/bytes: totals scored."""

    docs: int
    bits_per_byte: float
    doc_mean: float
    tokens: int
    bytes: int


def bpb_metrics(scores: RequestScores) -> BPBMetrics:
    bits = -scores.logprob / math.log(2)
    nbytes = np.maximum(scores.bytes, 1)
    return BPBMetrics(
        docs=len(bits),
        bits_per_byte=float(bits.sum() / nbytes.sum()) if len(bits) else float("nan"),
        doc_mean=float(np.mean(bits / nbytes)) if len(bits) else float("nan"),
        tokens=int(scores.tokens.sum()),
        bytes=int(scores.bytes.sum()),
    )

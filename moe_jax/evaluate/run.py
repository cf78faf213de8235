"""`moe-jax eval` as a function: held-out loss/BPB per source, the likelihood-scored benchmarks, gold-answer
BPB, and (optionally) greedy generation scored by exact match / pass@1.

    trained = load_trained(workdir)
    report = evaluate(trained, EvalOptions(tasks=resolve_tasks("paper"), limit=500), mesh)
    print(format_report(report))
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_jax.evaluate import scoring
from moe_jax.evaluate.tasks import PAPER_GENERATION, TASKS, EvalSetMissing, TaskData, load_task


@dataclasses.dataclass
class EvalOptions:
    """What `evaluate` runs.

    Attributes:
      tasks: task names (see `tasks.TASKS`).
      limit: docs per task (0 = all).
      heldout: compute held-out loss/BPB per source; heldout_batches: per source (0 = all).
      batch_tokens: tokens per scoring batch (rows = batch_tokens // padded length).
      heldout_batch_size: rows per held-out batch.
      generate: also greedy-generate answers for the bpb tasks (exact match for QA; pass@1 for code with
        execute_code); max_new_tokens: generation length; gen_limit: docs per task for generation.
      execute_code: run generated programs with their tests (subprocess, timeout) for pass@1.
      evalsets_dir / cache_dir: where the eval sets / token cache are (defaults: the data dir's).
      baseline: print the corpus unigram baseline next to the held-out loss.
      progress: progress bars (on a terminal); verbose: one log line per finished task (stderr).
    """

    tasks: Sequence[str] = ()
    limit: int = 0
    heldout: bool = True
    heldout_batches: int = 0
    heldout_batch_size: int = 16
    batch_tokens: int = 8192
    generate: bool = False
    max_new_tokens: int = 64
    gen_limit: int = 100
    execute_code: bool = False
    evalsets_dir: str = ""
    cache_dir: str = ""
    baseline: bool = True
    progress: bool = True
    verbose: bool = True

    @property
    def bars(self) -> bool:
        """tqdm bars: asked for and stderr is a terminal (log lines otherwise, as in training)."""
        return self.progress and sys.stderr.isatty()


def default_evalsets_dir() -> Path:
    from moe_jax.data import paths

    return paths.evalsets_dir(paths.data_dir())


def load_tokenizer(cache_dir: Path, vocab_size: int):
    """The SentencePiece model the token cache was built with (path in its meta.json)."""
    import sentencepiece as spm

    from moe_jax.data import paths
    from moe_jax.data.cache import load_meta

    meta = load_meta(Path(cache_dir))
    candidates = [Path(meta.get("vocab", {}).get("path", "")), paths.vocab_path(paths.data_dir(), vocab_size)]
    for p in candidates:
        if str(p) not in ("", ".") and p.exists():
            return spm.SentencePieceProcessor(model_file=str(p))
    raise FileNotFoundError(
        f"no vocabulary found for {cache_dir} (tried {', '.join(map(str, candidates))}); run `moe-jax data build`"
    )


# ---------------------------------------------------------------------------------------------------
# Generation scoring
# ---------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD/TriviaQA answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def run_program(source: str, timeout: float = 10.0) -> bool:
    """Run a Python program in a fresh interpreter (isolated mode, temp dir); True iff it exits with 0."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(source)
        try:
            res = subprocess.run([sys.executable, "-I", str(path)], cwd=tmp, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
    return res.returncode == 0


def code_program(kind: str, doc: dict, completion: str) -> str:
    """The program whose success is pass@1: HumanEval prompt + completion + tests; MBPP code + asserts."""
    if kind == "humaneval":
        return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"
    setup = doc.get("test_setup_code") or ""
    return f"{setup}\n{completion}\n\n" + "\n".join(doc["test_list"]) + "\n"


# ---------------------------------------------------------------------------------------------------
# One task
# ---------------------------------------------------------------------------------------------------


def run_task(task: TaskData, score_fn, tokenizer, seq_len: int, opts: EvalOptions, decoder=None) -> dict:
    """Score one loaded task; returns its report entry (metrics, counts, timing)."""
    t0 = time.perf_counter()
    spec = task.spec
    if spec.kind == "mc":
        task = scoring.with_uncond_requests(task)
    scores = scoring.score_requests(
        task.requests, tokenizer, score_fn, seq_len, opts.batch_tokens, progress=opts.bars, desc=spec.name
    )
    entry = {
        "task": spec.name,
        "kind": spec.kind,
        "split": spec.split,
        "shots": spec.shots,
        "source": task.source,
        "docs": len(task.docs),
        "total_docs": task.total_docs,
        "requests": len(task.requests),
        "primary": spec.primary,
        "paper": spec.paper_value,
        "truncated_requests": scores.truncated,
    }
    if spec.kind == "mc":
        m = scoring.mc_metrics(task, scores)
        entry.update(metrics=dataclasses.asdict(m), value=m.get(spec.primary), chance=m.chance)
    else:
        m = scoring.bpb_metrics(scores)
        entry.update(
            metrics=dataclasses.asdict(m),
            value=m.bits_per_byte,
            paper_generation=PAPER_GENERATION.get(spec.name),
            generation_metric={"": None, "exact_match": "exact_match"}.get(spec.generation, "pass@1"),
        )
        if decoder is not None and spec.generation:
            entry["generation"] = _generation_metrics(task, decoder, tokenizer, seq_len, opts)
    entry["seconds"] = time.perf_counter() - t0
    return entry


def _generation_metrics(task: TaskData, decoder, tokenizer, seq_len: int, opts: EvalOptions) -> dict:
    from moe_jax.evaluate.generate import generate_texts

    spec = task.spec
    docs = task.docs[: opts.gen_limit] if opts.gen_limit else task.docs
    max_new = min(opts.max_new_tokens, seq_len // 2)
    # HumanEval: the standard Codex setup (complete the function from its prompt); others: the scored context.
    contexts = [d.raw["prompt"] if spec.generation == "humaneval" else d.context for d in docs]
    gens = generate_texts(
        decoder,
        tokenizer,
        contexts,
        seq_len=seq_len,
        max_new_tokens=max_new,
        stop=spec.stop,
        progress=opts.bars,
        desc=f"{spec.name} generate",
    )
    out = {"docs": len(docs), "max_new_tokens": max_new, "examples": [g.text for g in gens[:3]]}
    if spec.generation == "exact_match":
        answers = [d.raw.get("answers") or d.raw.get("choices") or [] for d in docs]
        out["exact_match"] = float(np.mean([exact_match(g.text, a) for g, a in zip(gens, answers)]))
    elif opts.execute_code:
        passed = [run_program(code_program(spec.generation, d.raw, g.text)) for d, g in zip(docs, gens)]
        out["pass@1"] = float(np.mean(passed))
    else:
        out["pass@1"] = None
        out["note"] = "pass@1 needs --execute_code (runs generated code in a subprocess)"
    return out


# ---------------------------------------------------------------------------------------------------
# A checkpoint
# ---------------------------------------------------------------------------------------------------


def _log(opts: EvalOptions, msg: str) -> None:
    import jax

    if opts.verbose and jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def evaluate(trained, opts: EvalOptions, mesh) -> dict:
    """Everything `moe-jax eval` reports for a restored model (`moe_jax.train.restore.TrainedModel`)."""
    from moe_jax.data.paths import default_cache
    from moe_jax.evaluate.heldout import heldout_eval
    from moe_jax.evaluate.model_fns import ModelScorer, model_apply_fn

    seq_len = trained.train_cfg.seq_len
    cache = Path(opts.cache_dir) if opts.cache_dir else default_cache(trained.train_cfg, trained.model_cfg.vocab_size)
    report: dict = {
        "workdir": str(trained.workdir),
        "step": trained.step,
        "seq_len": seq_len,
        "cache": str(cache),
        "tasks": {},
        "skipped": {},
    }
    if opts.heldout:
        t0 = time.perf_counter()
        res = heldout_eval(
            trained.graphdef,
            trained.params,
            trained.rest,
            cache,
            seq_len,
            opts.heldout_batch_size,
            mesh,
            max_batches=opts.heldout_batches,
            progress=opts.bars,
        )
        report["heldout"] = dict(res.to_json(), seconds=time.perf_counter() - t0)
        _log(
            opts,
            f"  held-out: loss {res.loss:.4f}, {res.bits_per_byte:.4f} bits/byte over {res.tokens:.0f} tokens "
            f"of {len(res.sources)} sources [{report['heldout']['seconds']:.0f}s]",
        )
        if opts.baseline:
            from moe_jax.evaluate.baselines import unigram_baseline

            report["unigram_baseline"] = dataclasses.asdict(unigram_baseline(cache))
    if not opts.tasks:
        return report
    tokenizer = load_tokenizer(cache, trained.model_cfg.vocab_size)
    scorer = ModelScorer(model_apply_fn(trained.graphdef, trained.rest), trained.params, mesh)
    decoder = None
    if opts.generate:
        from moe_jax.evaluate.generate import GreedyDecoder

        decoder = GreedyDecoder(trained.model())
    evalsets = Path(opts.evalsets_dir) if opts.evalsets_dir else default_evalsets_dir()
    for name in opts.tasks:
        try:
            task = load_task(TASKS[name], evalsets, opts.limit or None)
        except EvalSetMissing as e:
            print(f"skipping {name}: {e}", file=sys.stderr)
            report["skipped"][name] = str(e)
            continue
        entry = run_task(task, scorer, tokenizer, seq_len, opts, decoder)
        report["tasks"][name] = entry
        _log(opts, f"  {_task_line(entry)}")
    return report


# ---------------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------------


def _binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def _task_line(e: dict) -> str:
    if e["kind"] == "mc":
        m = e["metrics"]
        extra = "" if m["acc_uncond"] is None else f", uncond {100 * m['acc_uncond']:.1f}"
        return (
            f"{e['task']}: {e['primary']} {100 * e['value']:.1f} ± {100 * _binomial_se(e['value'], e['docs']):.1f} "
            f"on {e['docs']} docs (raw {100 * m['acc']:.1f}, per-char {100 * m['acc_per_char']:.1f}{extra}; "
            f"chance {100 * e['chance']:.1f}) [{e['seconds']:.0f}s]"
        )
    return f"{e['task']}: gold bits/byte {e['value']:.3f} on {e['docs']} docs [{e['seconds']:.0f}s]"


def format_report(report: dict) -> str:
    """A plain-text table of the report, with the paper's DeepSeekMoE 2B numbers (Tab 1) alongside."""
    lines = [f"checkpoint {report['workdir']} step {report['step']} (seq_len {report['seq_len']})"]
    if "heldout" in report:
        h = report["heldout"]
        lines.append(
            f"held-out loss {h['loss']:.4f} nats/token, {h['bits_per_byte']:.4f} bits/byte "
            f"({h['tokens']:.0f} tokens, {h['bytes']:.0f} bytes; paper Pile loss 1.808 at 2B/100B tokens)"
        )
        if "unigram_baseline" in report:
            u = report["unigram_baseline"]
            lines.append(
                f"  unigram baseline {u['heldout_loss']:.4f} nats/token, {u['heldout_bits_per_byte']:.4f} bits/byte"
            )
        lines.append(f"  {'source':<16}{'loss':>9}{'bits/byte':>11}{'tokens':>9}")
        for name, s in h["sources"].items():
            lines.append(f"  {name:<16}{s['loss']:>9.4f}{s['bits_per_byte']:>11.4f}{s['tokens']:>9.0f}")
    if report.get("tasks"):
        lines.append("")
        lines.append(
            f"{'task':<15}{'shots':>5}{'split':>11}{'docs':>7}  {'metric':<14}{'ours':>7}{'±se':>6}"
            f"{'chance':>8}{'paper':>7}"
        )
        for name, e in report["tasks"].items():
            if e["kind"] == "mc":
                v, se = 100 * e["value"], 100 * _binomial_se(e["value"], e["docs"])
                lines.append(
                    f"{name:<15}{e['shots']:>5}{e['split']:>11}{e['docs']:>7}  {e['primary']:<14}{v:>7.1f}"
                    f"{se:>6.1f}{100 * e['chance']:>8.1f}{_fmt(e['paper']):>7}"
                )
            else:
                lines += _bpb_rows(name, e)
        lines.append(
            "paper = DeepSeekMoE 2B, Tab 1 (accuracy %; exact match / pass@1 % on the generation line: the paper "
            "reports no bits/byte, so a bits/byte row has no paper value)"
        )
    for name, why in report.get("skipped", {}).items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def _bpb_rows(name: str, e: dict) -> list[str]:
    """A bits/byte task's rows: our gold bits/byte (the paper reports none), then its generation metric
    (exact match or pass@1) with the paper's value beside it; ours only with `--generate`."""
    rows = [
        f"{name:<15}{e['shots']:>5}{e['split']:>11}{e['docs']:>7}  {'gold bits/byte':<14}"
        f"{e['value']:>7.3f}{'':>6}{'':>8}{'-':>7}"
    ]
    label = e.get("generation_metric")
    if not label:
        return rows
    g = e.get("generation")
    if g is None:
        ours, docs = "--generate", ""
    else:
        score, docs = g.get(label), g["docs"]
        ours = "n/a" if score is None else f"{100 * score:.1f}"
    rows.append(
        f"{'':<15}{'':>5}{'':>11}{docs:>7}  {label:<14}{ours:>7}{'':>6}{'':>8}{_fmt(e.get('paper_generation')):>7}"
    )
    return rows


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"

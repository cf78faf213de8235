"""`moe-jax eval` and `moe-jax analyze` on a `moe-jax train` workdir.

    moe-jax eval --workdir=DIR [--tasks=paper|all|mc|bpb|hellaswag,piqa,...] [--limit=N] [--step=N]
                 [--heldout_batches=N | --no_heldout] [--generate [--execute_code]] [--mesh=data:2]
                 [--gin.MoEConfig.top_k=3 ...]
    moe-jax analyze --workdir=DIR [--heldout_batches=N] [--heatmap_batches=N] [--step=N] [--mesh=...]

`eval` writes <workdir>/eval/eval_step<N>.json; `analyze` writes <workdir>/analysis/specialization.json and
PNG plots. Gin bindings (`--gin.KEY=VALUE`) are applied on top of the workdir's config.gin.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="a `moe-jax train` workdir (config.gin + checkpoints)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--mesh", default="", help="mesh axes, e.g. data:2,expert:4 (default: all devices data-parallel)")
    p.add_argument("--cache", default="", help="token cache (default: the one the model was trained on)")
    p.add_argument("--heldout_batches", type=int, default=0, help="held-out batches per source (0 = all)")
    p.add_argument("--batch_size", type=int, default=16, help="held-out rows per batch")
    p.add_argument("--out", default="", help="output file (eval) or folder (analyze)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars (they only show on a terminal)")
    p.add_argument("--quiet", action="store_true", help="no log lines while running (the final table only)")


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-jax eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _common(p)
    p.add_argument(
        "--tasks",
        default="paper",
        help="comma list of tasks or groups: paper (Tab 1: hellaswag, piqa, arc_easy, arc_challenge, "
        "triviaqa, naturalqs, humaneval, mbpp), all (+ winogrande, boolq, sciq, openbookqa), mc, "
        "bpb; 'none' for held-out only",
    )
    p.add_argument("--limit", type=int, default=0, help="docs per task (0 = all)")
    p.add_argument("--no_heldout", action="store_true", help="skip the held-out loss")
    p.add_argument("--batch_tokens", type=int, default=8192, help="tokens per scoring batch")
    p.add_argument(
        "--generate",
        action="store_true",
        help="also greedy-generate (KV cache) answers for TriviaQA/NQ (exact match) and code tasks",
    )
    p.add_argument(
        "--execute_code",
        action="store_true",
        help="with --generate: run generated code against the tasks' tests (pass@1; untrusted code)",
    )
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--gen_limit", type=int, default=100, help="docs per task to generate for (0 = all)")
    p.add_argument("--evalsets_dir", default="", help="default: <data dir>/evalsets")
    return p


def analyze_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-jax analyze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _common(p)
    p.add_argument("--heatmap_batches", type=int, default=0, help="batches per source for the expert load (0 = all)")
    p.add_argument("--fewest_activated", type=int, default=None, help="smallest top-k of Fig 5 (default K'-4)")
    p.add_argument("--no_shared", action="store_true", help="skip the shared-expert analysis")
    return p


def _setup(prog: str, argv, parser_fn):
    from moe_jax.configs.gin_utils import command_gin_args

    gin_args = command_gin_args(prog, argv)
    if gin_args is None:
        return None
    if gin_args.gin_files:
        print(
            f"{prog}: gin files are not applied here (the workdir's config.gin is); use --gin.KEY=VALUE",
            file=sys.stderr,
        )
        return None
    args = parser_fn().parse_args(list(gin_args.rest))
    from moe_jax.parallel import MeshConfig, build_mesh

    mesh = build_mesh(MeshConfig.from_string(args.mesh) if args.mesh else MeshConfig())
    return args, gin_args.bindings, mesh


def eval_main(argv: list[str] | None = None) -> int:
    setup = _setup("moe-jax eval", argv, eval_parser)
    if setup is None:
        return 2
    args, bindings, mesh = setup
    from moe_jax.data.errors import DataError
    from moe_jax.evaluate.run import EvalOptions, evaluate, format_report
    from moe_jax.evaluate.tasks import resolve_tasks
    from moe_jax.train.checkpoint import CheckpointError
    from moe_jax.train.restore import load_trained

    try:
        tasks = [] if args.tasks.strip() in ("", "none") else resolve_tasks(args.tasks)
        trained = load_trained(args.workdir, args.step, bindings, mesh)
        opts = EvalOptions(
            tasks=tasks,
            limit=args.limit,
            heldout=not args.no_heldout,
            heldout_batches=args.heldout_batches,
            heldout_batch_size=args.batch_size,
            batch_tokens=args.batch_tokens,
            generate=args.generate,
            max_new_tokens=args.max_new_tokens,
            gen_limit=args.gen_limit,
            execute_code=args.execute_code,
            evalsets_dir=args.evalsets_dir,
            cache_dir=args.cache,
            progress=not args.no_progress,
            verbose=not args.quiet,
        )
        report = evaluate(trained, opts, mesh)
    except (DataError, CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"moe-jax eval: error: {err}", file=sys.stderr)
        return 1
    report["bindings"] = list(bindings)
    out = Path(args.out) if args.out else Path(args.workdir) / "eval" / f"eval_step{trained.step}.json"
    import jax

    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=float) + "\n")
        print(format_report(report))
        print(f"wrote {out}")
    return 0


def analyze_main(argv: list[str] | None = None) -> int:
    setup = _setup("moe-jax analyze", argv, analyze_parser)
    if setup is None:
        return 2
    args, bindings, mesh = setup
    from moe_jax.data.errors import DataError
    from moe_jax.evaluate.analyze import AnalysisOptions, analyze, format_analysis
    from moe_jax.train.checkpoint import CheckpointError

    opts = AnalysisOptions(
        heldout_batches=args.heldout_batches,
        batch_size=args.batch_size,
        heatmap_batches=args.heatmap_batches,
        cache_dir=args.cache,
        out_dir=args.out,
        fewest_activated=args.fewest_activated,
        shared=not args.no_shared,
        progress=not args.no_progress,
        verbose=not args.quiet,
    )
    try:
        report = analyze(args.workdir, opts, mesh, args.step, bindings)
    except (DataError, CheckpointError, ValueError) as err:
        print(f"moe-jax analyze: error: {err}", file=sys.stderr)
        return 1
    print(format_analysis(report))
    return 0

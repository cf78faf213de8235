"""`moe-jax sweep experiments/<family>.py [...]`: run families' members and report them.

    moe-jax sweep experiments/table1.py [--workdir=workdirs/table1] [--seeds 0 1 2] [--parallel 2]
                  [--scale paper] [--gin KEY=VALUE ...] [--eval_tasks hellaswag,piqa] [--only MEMBER ...]
                  [--reuse workdirs/crossover ...]
    moe-jax sweep experiments/table1.py --report      # tables and plots from stored results only
    moe-jax sweep experiments/table1.py --report --results experiments/results  # keep runs' small files, report there
    moe-jax sweep experiments/table1.py --status [--parallel 2]  # each run's state, hours left; writes nothing
    moe-jax sweep experiments/table1.py experiments/ablation_fig3.py [--workdir=workdirs] --parallel 2 \
                  --results experiments/results      # several families, one queue, shared runs trained once

Rerunning the same command skips finished members and resumes interrupted ones. Several families share
one queue (moe_jax.sweep.schedule): seed by seed, each distinct run trained once and linked where another
family has it, each run stored and each family reported as soon as it can be (with --results).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-jax sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "families", nargs="+", metavar="family", help="experiment file defining FAMILY, e.g. experiments/table1.py"
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="root of the members' workdirs (default workdirs/<family>); with several families, the folder "
        "their roots go in (<workdir>/<family>; default workdirs)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the family's)")
    p.add_argument("--scale", default=None, help="one of the family's named scales (e.g. paper)")
    p.add_argument("--parallel", type=int, default=1, help="members run at once on disjoint devices")
    p.add_argument(
        "--gin",
        dest="bindings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra gin binding for every member (repeatable)",
    )
    p.add_argument("--eval_tasks", default=None, help="also run `moe-jax eval --tasks=...` on each member")
    p.add_argument(
        "--only",
        nargs="+",
        default=(),
        metavar="MEMBER",
        help="run only these members (in every family that has them; the report still covers every finished one)",
    )
    p.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="DIR",
        help="another family's workdir root: link its finished runs that are exactly a member's run "
        "(same resolved model and training config) instead of training them again (repeatable)",
    )
    p.add_argument("--report", action="store_true", help="only regenerate the report from stored results")
    p.add_argument(
        "--results",
        default=None,
        metavar="DIR",
        help="keep the finished runs' small files in DIR/<family>/runs/ (no checkpoints; e.g. "
        "experiments/results, committed) and write the report to DIR/<family>/ from them; with --report "
        "and no workdir, regenerates that report from the stored runs alone (moe_jax.sweep.store); a sweep "
        "restores the finished runs stored there that its workdirs lack instead of training them again, and "
        "--status counts them as finished",
    )
    p.add_argument(
        "--status",
        action="store_true",
        help="only print each run's state, training hours and an estimate of the hours left (writes nothing; "
        "the wall-hours estimate divides by --parallel)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.status and args.report:
        p.error(
            "--status and --report are exclusive: --status only reads where the runs stand, --report writes "
            "the report; give one of them"
        )
    if args.status and args.parallel < 1:
        p.error(f"--parallel {args.parallel}: give at least 1 (the wall-hours estimate divides by it)")

    from moe_jax.sweep.family import load_family

    families = [load_family(f) for f in args.families]
    names = [f.name for f in families]
    if len(set(names)) < len(names):
        p.error(f"a family is given twice ({names}): give each experiment file once")
    if len(families) == 1:
        roots = [Path(args.workdir or f"workdirs/{families[0].name}")]
    else:
        roots = [Path(args.workdir or "workdirs") / f.name for f in families]
    if args.status:
        if len(families) > 1 and args.only:
            from moe_jax.sweep.schedule import check_only

            try:
                check_only(families, args.only)
            except ValueError as err:
                p.error(str(err))
        return _print_statuses(families, roots, args)
    if not args.report:
        from moe_jax.sweep.schedule import Options, run_sweep

        opts = Options(args.seeds, args.scale, args.bindings, args.eval_tasks, args.only, [Path(d) for d in args.reuse])
        try:
            run_sweep(families, roots, opts, args.parallel, args.results)
        except KeyboardInterrupt:
            return 130
        except (RuntimeError, ValueError) as err:
            print(f"moe-jax sweep: {err}")
            return 1
    return max(_report(f, root, args.results) for f, root in zip(families, roots))


def _report(family, root: Path, results: str | None) -> int:
    """Store the family's finished runs under `results` (when given) and print its report."""
    from moe_jax.sweep.report import write_report

    report_root, out = root, None
    if results:
        from moe_jax.sweep.store import store_runs

        report_root, out = Path(results) / family.name / "runs", Path(results) / family.name
        if root.exists():
            try:
                store_runs(family, root, Path(results))
            except ValueError as err:
                print(f"moe-jax sweep: {err}")
                return 1
    try:
        summary = write_report(family, report_root, out)
    except FileNotFoundError as err:
        stored = Path("experiments/results") / family.name / "runs"
        hint = (
            f"; or report the runs kept in the repository: --results {stored.parent.parent}" if stored.is_dir() else ""
        )
        print(f"moe-jax sweep: {err}{hint}")
        return 1
    print(summary.read_text())
    print(f"report: {summary.parent}")
    return 0


def _print_statuses(families, roots: list[Path], args) -> int:
    """Each family's `--status`, and with several families their total, each shared run counted once."""
    from moe_jax.sweep.status import family_status, format_status, sweep_total

    every = []
    for family, root in zip(families, roots):
        only = args.only
        if len(families) > 1 and only:
            only = [m.name for m in family.members if m.name in set(only)]
            if not only:
                every.append([])
                continue
        try:
            statuses = family_status(
                family,
                root,
                seeds=args.seeds,
                scale=args.scale,
                only=only,
                extra_bindings=args.bindings,
                results=args.results,
            )
        except ValueError as err:
            print(f"moe-jax sweep: {err}")
            return 1
        print(format_status(family, root, statuses, args.parallel))
        every.append(statuses)
    if len(families) > 1:
        print(
            sweep_total(
                families,
                every,
                seeds=args.seeds,
                scale=args.scale,
                extra_bindings=args.bindings,
                parallel=args.parallel,
            )
        )
    return 0

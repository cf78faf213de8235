"""`moe-jax sweep experiments/<family>.py`: run a family's members and report them.

    moe-jax sweep experiments/table1.py [--workdir=workdirs/table1] [--seeds 0 1 2] [--parallel 2]
                  [--scale paper] [--gin KEY=VALUE ...] [--eval_tasks hellaswag,piqa] [--only MEMBER ...]
                  [--reuse workdirs/crossover ...]
    moe-jax sweep experiments/table1.py --report      # tables and plots from stored results only

Rerunning the same command skips finished members and resumes interrupted ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="moe-jax sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("family", help="experiment file defining FAMILY, e.g. experiments/table1.py")
    p.add_argument("--workdir", default=None, help="root of the members' workdirs (default workdirs/<family>)")
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
        help="run only these members (the report still covers every finished one)",
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
    args = p.parse_args(argv)

    from moe_jax.sweep.family import load_family
    from moe_jax.sweep.report import write_report
    from moe_jax.sweep.runner import run_family

    family = load_family(args.family)
    root = Path(args.workdir or f"workdirs/{family.name}")
    if not args.report:
        try:
            run_family(
                family,
                root,
                seeds=args.seeds,
                scale=args.scale,
                parallel=args.parallel,
                extra_bindings=args.bindings,
                eval_tasks=args.eval_tasks,
                only=args.only,
                reuse=[Path(d) for d in args.reuse],
            )
        except KeyboardInterrupt:
            return 130
        except (RuntimeError, ValueError) as err:
            print(f"moe-jax sweep: {err}")
            return 1
    summary = write_report(family, root)
    print(summary.read_text())
    print(f"report: {summary.parent}")
    return 0

"""The `moe-jax` command line: one subcommand per module, imported lazily.

Each entry maps a subcommand to `module:function`; the function takes the remaining argv list and
returns an exit code. Lazy imports keep `moe-jax --help` fast and keep TensorFlow (seqio) out of every
command that does not build data.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module:function, one-line help)
    "quickstart": ("moe_jax.quickstart:main", "the main job: DeepSeekMoE vs GShard vs Dense proxies, offline corpus"),
    "sweep": ("moe_jax.sweep.cli:main", "run an experiment family (experiments/*.py) and tabulate/plot it"),
    "claims": ("moe_jax.sweep.claims:main", "the paper's claims table (experiments/claims.py) from stored results"),
    "smoke": ("moe_jax.smoke:main", "forward/backward smoke run of a small DeepSeekMoE model"),
    "data": ("moe_jax.data.cli:main", "build the offline corpus, vocabulary and token cache"),
    "train": ("moe_jax.train.cli:main", "train a gin-configured model (checkpoints, metrics, resume)"),
    "params": ("moe_jax.configs.params_cli:main", "parameter counts and training FLOPs of gin models vs the paper"),
    "eval": (
        "moe_jax.evaluate.cli:eval_main",
        "held-out loss/BPB and the paper's benchmarks (likelihood) on a checkpoint",
    ),
    "analyze": ("moe_jax.evaluate.cli:analyze_main", "expert-specialization analyses of paper §4.5 (JSON + PNG)"),
    "plan": (
        "moe_jax.train.plan:main",
        "compile one training step on a fake-device mesh; per-device memory and fit",
    ),
    "export": (
        "moe_jax.export.cli:export_main",
        "export a workdir's checkpoint to DeepSeek's Hugging Face layout (safetensors)",
    ),
    "import": ("moe_jax.export.cli:import_main", "import a Hugging Face DeepSeekMoE directory into a new workdir"),
    "upcycle": (
        "moe_jax.train.upcycle:main",
        "a new MoE workdir initialised from a trained dense one (sparse upcycling)",
    ),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: moe-jax COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"moe-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

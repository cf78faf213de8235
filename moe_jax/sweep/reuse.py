"""Reuse a finished run of another family when it is exactly the training a member asks for.

Families share members: table1's GShard at seed 0 is the crossover family's GShard at seed 0, and
ablation_fig3's "0 shared + 2/16" is the same model under another name. `moe-jax sweep --reuse DIR`
links such a member's workdir (a symlink `<root>/<member>_s<seed>` -> the finished run) instead of
training it again. "Exactly" means the resolved `ModelConfig` and `TrainConfig` are equal, field by
field, between the member's gin files + bindings and the finished run's own `config.gin`; fields that
do not change the numbers (logging, checkpointing, the MFU peak: `BOOKKEEPING`) are ignored, and an
unset `TrainConfig.data_seed` compares as the `seed` it defaults to. Model names
and gin file names are not compared, so a model written as an include of another matches it. The report
lists each run's workdir and data build, so a reused run stays visible as one.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Sequence

from moe_jax.configs.gin_utils import GinConfigError, model_gin_path, parse_gin
from moe_jax.sweep.family import Run
from moe_jax.sweep.runner import is_finished

# TrainConfig fields that do not change what is trained or measured.
BOOKKEEPING = ("log_every", "checkpoint_every", "keep_checkpoints", "async_checkpointing", "peak_flops_per_device")


def resolved(gin_files: Sequence[str], bindings: Sequence[str]) -> tuple | None:
    """(ModelConfig, TrainConfig without BOOKKEEPING) configured by these files and bindings, or None
    when they no longer parse (e.g. a run from a version of the code with other fields)."""
    from moe_jax.config import ModelConfig
    from moe_jax.train.config import TrainConfig

    try:
        parse_gin(gin_files, bindings, modules=("moe_jax.train.config",))
        model, train = ModelConfig(), TrainConfig()
    except (GinConfigError, ValueError, TypeError):
        return None
    bookkeeping = {f: getattr(TrainConfig, f) for f in BOOKKEEPING}
    return model, dataclasses.replace(train, data_seed=train.data_order_seed, **bookkeeping)


@functools.lru_cache(maxsize=None)
def run_config(run: Run, extra_bindings: tuple[str, ...] = ()) -> tuple | None:
    """`resolved` for a run as the runner trains it (its model's gin file, the family's gin files, its
    bindings and the sweep's extra ones); cached, as the queue and `--status` ask for the same run
    several times and each answer parses gin."""
    return resolved((str(model_gin_path(run.model)), *run.gin_files), (*run.bindings, *extra_bindings))


def finished_runs(source: Path) -> list[tuple[Path, tuple | None]]:
    """(workdir, its resolved configuration) of every run under `source` whose training ran to its
    last step."""
    dirs = sorted(wd for wd in source.iterdir() if wd.is_dir() and is_finished(wd) and (wd / "config.gin").exists())
    return [(wd, resolved([str(wd / "config.gin")], ())) for wd in dirs]


def link_reusable(runs: Sequence[Run], root: Path, extra_bindings: Sequence[str], sources: Sequence[Path]) -> None:
    """Symlink `root/<run>` to a finished run under `sources` trained exactly as the run would be, for
    every run that has no workdir yet."""
    link_matching(runs, root, extra_bindings, candidates(sources))


def candidates(sources: Sequence[Path]) -> list[tuple[Path, tuple]]:
    """`finished_runs` of every source root that parse; raises ValueError naming a source that is not a
    directory."""
    missing = [str(s) for s in sources if not Path(s).is_dir()]
    if missing:
        raise ValueError(f"--reuse {missing[0]}: not a directory (give the workdir root of a family's runs)")
    return [c for s in sources for c in finished_runs(Path(s)) if c[1] is not None]


def link_matching(
    runs: Sequence[Run], root: Path, extra_bindings: Sequence[str], found: Sequence[tuple[Path, tuple]]
) -> None:
    """`link_reusable` with the candidate runs (`candidates`) already read; those under `root` itself are
    passed over."""
    found = [(src, cfg) for src, cfg in found if src.parent != root]
    root.mkdir(parents=True, exist_ok=True)
    for run in runs:
        wd = root / run.name
        if wd.exists() or wd.is_symlink():
            continue
        wanted = run_config(run, tuple(extra_bindings))
        if wanted is None:
            raise ValueError(f"{run.name}: its gin files and bindings do not parse; run without --reuse to see why")
        match = next((src for src, cfg in found if cfg == wanted), None)
        if match is not None:
            wd.symlink_to(match.resolve(), target_is_directory=True)
            name = f"{root.name}/{run.name}"
            print(f"[sweep] {name}: reusing {match.resolve()} (same model and training configuration)", flush=True)

"""A family: a base gin configuration plus named members (model + bindings), each run with several seeds.

An experiment file (`experiments/<name>.py`) defines `FAMILY = Family(...)`:

    FAMILY = Family(
        name="table1",
        members=(Member("dense", "dense_base"), Member("deepseekmoe", "deepseekmoe_base"), ...),
        seeds=(0, 1, 2),
        paper={"dense": {"pile_loss": 2.060}, ...},          # printed beside our numbers
        scales=PROXY_SCALES,                                  # --scale tiny / small / paper
    )

The default regime is the CPU one the crossover study chose (`*_base` models, `runs/proxy_base.gin`:
1024-piece vocabulary, 10M tokens; experiments/README.md says why); `PROXY_SCALES` maps every family to
the earlier tiny and small proxies and to the paper's 2B models with one switch.

`Family.runs(seeds, scale)` expands it into `Run`s (member x seed), each with its own workdir name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Member:
    """One configuration of a family.

    Attributes:
      name: short label used in tables, plots and workdir names.
      model: gin model name (`gin/models/**/<model>.gin`).
      bindings: extra gin bindings ("KEY=VALUE") for this member only.
      label: longer description for reports (default: name).
      seeds: if given, the member runs only those of the requested seeds that are in it (e.g. an
        expensive member with fewer seeds than the family); None = every requested seed.
    """

    name: str
    model: str
    bindings: tuple[str, ...] = ()
    label: str = ""
    seeds: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Scale:
    """How a family maps to another scale with one switch (e.g. the paper's 2B).

    Attributes:
      model_suffix: (old, new) replaced at the end of every member's model name.
      base: gin files replacing the family's base files.
      bindings: extra bindings for every member at this scale.
    """

    model_suffix: tuple[str, str] = ("", "")
    base: tuple[str, ...] | None = None
    bindings: tuple[str, ...] = ()


# The default regime's models end in _base (gin/models/proxy/*_base.gin, trained with
# runs/proxy_base.gin); these scales swap them for the tiny or small proxies (runs/proxy_cpu.gin, the
# regime before the crossover study) or the paper's 2B models (runs/pretrain_2b.gin).
PROXY_SCALES = {
    "tiny": Scale(model_suffix=("_base", "_tiny"), base=("runs/proxy_cpu.gin",)),
    "small": Scale(model_suffix=("_base", "_small"), base=("runs/proxy_cpu.gin",)),
    "paper": Scale(model_suffix=("_base", "_2b"), base=("runs/pretrain_2b.gin",)),
}


@dataclasses.dataclass(frozen=True)
class FollowUp:
    """A `moe-jax` command run on every member's workdir after its training (e.g. the §4.5 analyses).

    Attributes:
      command: the subcommand and its flags, e.g. ("analyze", "--heldout_batches=2"); the runner adds
        `--workdir=<member workdir>` and puts that workdir in place of "{workdir}" in a flag (e.g.
        "--out={workdir}/heldout_sources.json").
      output: the file (relative to the workdir) it writes; its existence marks the step done.
      metrics: "module:function" turning that file's JSON into {metric: float} for the report.
    """

    command: tuple[str, ...]
    output: str
    metrics: str = ""


@dataclasses.dataclass(frozen=True)
class Run:
    """One member trained with one seed."""

    member: Member
    seed: int
    model: str
    gin_files: tuple[str, ...]
    bindings: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.member.name}_s{self.seed}"


@dataclasses.dataclass(frozen=True)
class Family:
    """A base configuration, its members, default seeds and the paper's numbers for comparison.

    Attributes:
      name: the family's name (its default workdir is workdirs/<name>).
      base: gin files every member uses after its model file (e.g. the run file).
      members: the configurations compared.
      seeds: default seeds (override with --seeds).
      bindings: bindings every member gets.
      paper: {member name: {metric: value}} printed beside ours.
      metrics: metrics shown in the table and bar charts (keys of each run's results).
      description: what the family reproduces (paper section).
      scales: named alternative scales, selected with --scale.
      follow_ups: commands run on each trained member (their metrics join the report).
      pairs: (member, baseline) comparisons reported with paired seeds: the per-seed difference of
        every metric (mean ± std over the seeds both have), the held-out curves' difference against
        tokens, and the first evaluation from which the member stays below the baseline (crossover).
    """

    name: str
    members: tuple[Member, ...]
    base: tuple[str, ...] = ("runs/proxy_base.gin",)
    seeds: tuple[int, ...] = (0,)
    bindings: tuple[str, ...] = ()
    paper: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    metrics: tuple[str, ...] = ("heldout_loss", "train_loss")
    description: str = ""
    scales: Mapping[str, Scale] = dataclasses.field(default_factory=dict)
    follow_ups: tuple[FollowUp, ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"family {self.name}: duplicate member names {names}")
        unknown = sorted({n for pair in self.pairs for n in pair} - set(names))
        if unknown:
            raise ValueError(f"family {self.name}: pairs name {unknown}, which are not members ({names})")

    def runs(self, seeds: Sequence[int] | None = None, scale: str | None = None) -> list[Run]:
        """Every (member, seed) of the family at `scale` (None = the default proxy scale)."""
        if scale is not None and scale not in self.scales:
            raise ValueError(f"family {self.name} has no scale {scale!r}; it has {sorted(self.scales)}")
        sc = self.scales.get(scale, Scale()) if scale else Scale()
        base = sc.base if sc.base is not None else self.base
        out = []
        for member in self.members:
            model = member.model
            old, new = sc.model_suffix
            if old and model.endswith(old):
                model = model[: -len(old)] + new
            for seed in self.seeds if seeds is None else seeds:
                if member.seeds is not None and int(seed) not in member.seeds:
                    continue
                out.append(
                    Run(
                        member=member,
                        seed=int(seed),
                        model=model,
                        gin_files=tuple(base),
                        bindings=(*self.bindings, *sc.bindings, *member.bindings, f"TrainConfig.seed={int(seed)}"),
                    )
                )
        return out


def load_python_file(path: Path, what: str, where: str):
    """Import the `what` file `path` (an experiment or claims file) as module `moe_jax_{what}_{stem}`;
    FileNotFoundError saying `where` such files live if it does not exist."""
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} not found ({where})")
    spec = importlib.util.spec_from_file_location(f"moe_jax_{what}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_family(path: str | Path) -> Family:
    """Import an experiment file and return its `FAMILY`."""
    path = Path(path)
    module = load_python_file(path, "experiment", "families live in experiments/*.py")
    family = getattr(module, "FAMILY", None)
    if not isinstance(family, Family):
        raise ValueError(f"{path} defines no `FAMILY = Family(...)`")
    return family

"""Loading gin configs the way every `moe-jax` subcommand does (T5X conventions).

Command-line convention (shared by train/eval/params/...; see `split_gin_args`):
  --gin_file=PATH      repeatable; parsed in order. PATH is tried as given, then under `gin/`
                       (so both `gin/models/dense_2b.gin` and `models/dense_2b.gin` work).
  --model=NAME         the model file `gin/models/**/NAME.gin` (same as its --gin_file); repeatable
                       with --gin_file, order kept.
  --gin.KEY=VALUE      one gin binding, e.g. --gin.ModelConfig.num_layers=2, --gin.MoEConfig.top_k=4,
                       or a macro, --gin.NUM_LAYERS=2. Bare words are quoted for you
                       (--gin.MoEConfig.router=hash), because the shell strips the quotes gin wants.
  --gin_bindings=KEY=VALUE   the same, in T5X's spelling.

Files are included relative to the repository's `gin/` directory, which `parse_gin` adds to gin's
search path, so `include 'architectures/moe.gin'` works from any working directory.

Errors: an unknown model name, a missing gin file, a misspelt configurable or parameter, and a macro
set on the command line that no file defines or uses all raise `GinConfigError`, whose message is gin's own
message followed by the list of available models. This happens at parse time, before any model is
built or compiled.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util  # noqa: F401  (gin's missing-file path needs importlib.util loaded)
import re
import sys
import textwrap
from pathlib import Path
from typing import Iterable, Sequence

import gin
import moe_jax
from moe_jax import config as _config  # noqa: F401  (registers ModelConfig and MoEConfig with gin)

GIN_DIR = Path(moe_jax.__file__).resolve().parents[1] / "gin"
MODELS_DIR = GIN_DIR / "models"
RUNS_DIR = GIN_DIR / "runs"

_GIN_LITERALS = {"True", "False", "None"}


class GinConfigError(ValueError):
    """A gin file, binding or model name that cannot be used; the message says what is available."""


@dataclasses.dataclass(frozen=True)
class GinArgs:
    """Gin-related command-line arguments, split off the rest.

    Attributes:
      gin_files: files in command-line order (a --model=NAME contributes its model file).
      bindings: gin binding strings ("KEY=VALUE"), in order.
      rest: the arguments that are not gin's, for the subcommand's own parser.
    """

    gin_files: tuple[str, ...]
    bindings: tuple[str, ...]
    rest: tuple[str, ...]


def list_models() -> list[str]:
    """Names of all model files under gin/models (paper models and proxies), sorted."""
    return sorted(p.stem for p in MODELS_DIR.rglob("*.gin"))


def _models_message() -> str:
    names = list_models()
    paper = [n for n in names if not (MODELS_DIR / "proxy" / f"{n}.gin").exists()]
    proxy = [n for n in names if n not in paper]

    def wrap(title: str, items: list[str]) -> str:
        return textwrap.fill(
            ", ".join(items),
            width=100,
            initial_indent=f"  {title:<13}",
            subsequent_indent=" " * 15,
            break_on_hyphens=False,
        )

    return (
        "Available models (gin/models/**/<name>.gin; pass --model=NAME or --gin_file=PATH):\n"
        f"{wrap('paper scale:', paper)}\n{wrap('proxies:', proxy)}"
    )


def model_gin_path(name: str) -> Path:
    """The gin file of model `name`; GinConfigError listing the models if there is none."""
    matches = sorted(MODELS_DIR.rglob(f"{name}.gin")) if name and "/" not in name else []
    if len(matches) != 1:
        why = "is ambiguous" if matches else "is not a model"
        raise GinConfigError(f"{name!r} {why}.\n{_models_message()}")
    return matches[0]


def run_gin_path(name: str) -> Path:
    """The gin file of training setup `name` (gin/runs/<name>.gin)."""
    path = RUNS_DIR / f"{name}.gin"
    if not path.exists():
        runs = sorted(p.stem for p in RUNS_DIR.glob("*.gin"))
        raise GinConfigError(f"{name!r} is not a run config; available: {', '.join(runs)}")
    return path


def _is_gin_value(value: str) -> bool:
    """True if gin can parse `value` as is: a Python literal, a reference (@name, %MACRO), or a
    literal container/call written by the user."""
    if value in _GIN_LITERALS or value[:1] in ("@", "%", "(", "[", "{", "'", '"'):
        return True
    try:
        ast.literal_eval(value)
        return True
    except (ValueError, SyntaxError):
        return False


def _normalise_binding(binding: str) -> str:
    """Quote a value gin would not parse (KEY=word -> KEY='word', KEY=/a/path -> KEY='/a/path'),
    because the shell strips the quotes gin wants; everything else is passed through."""
    key, sep, value = binding.partition("=")
    value = value.strip()
    if sep and value and not _is_gin_value(value):
        value = repr(value)
    return f"{key.strip()}{sep}{value}" if sep else binding


def split_gin_args(argv: Sequence[str]) -> GinArgs:
    """Separate --gin_file / --model / --gin.KEY=VALUE / --gin_bindings from the other arguments.

    --gin_file and --model accept "--flag=value" and "--flag value"; model names are resolved here,
    so an unknown name fails with the list of models.
    """
    files: list[str] = []
    bindings: list[str] = []
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in ("--gin_file", "--model", "--gin_bindings"):
            if not eq:
                if i + 1 >= len(args):
                    raise GinConfigError(f"{flag} needs a value")
                i += 1
                value = args[i]
            if flag == "--gin_file":
                files.append(value)
            elif flag == "--model":
                files.append(str(model_gin_path(value)))
            else:
                bindings.append(_normalise_binding(value))
        elif arg.startswith("--gin."):
            if not eq:
                raise GinConfigError(f"{arg!r}: expected --gin.KEY=VALUE")
            bindings.append(_normalise_binding(arg[len("--gin.") :]))
        else:
            rest.append(arg)
        i += 1
    return GinArgs(gin_files=tuple(files), bindings=tuple(bindings), rest=tuple(rest))


def command_gin_args(prog: str, argv: Sequence[str] | None = None) -> GinArgs | None:
    """`split_gin_args` of the command `prog`'s arguments (default: sys.argv[1:]), or None once its error
    is printed on stderr as "prog: message" (the command then exits with status 2)."""
    try:
        return split_gin_args(sys.argv[1:] if argv is None else argv)
    except GinConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return None


def _resolve_file(path: str) -> str:
    """`path` as given if it exists, else under gin/; GinConfigError (with models) if neither."""
    for candidate in (Path(path), GIN_DIR / path):
        if candidate.is_file():
            return str(candidate.resolve())
    raise GinConfigError(f"gin file {path!r} not found (also looked in {GIN_DIR}).\n{_models_message()}")


def _macros_defined() -> set[str]:
    """Macros given a value (NAME = value) in the current gin config."""
    return set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*) = ", gin.config_str(), flags=re.M))


def _unknown_macros(bindings: Iterable[str], known: set[str]) -> list[str]:
    """Macros set by a command-line binding (NAME=VALUE, no dot) that no file defines and no binding
    refers to (%NAME): almost certainly a misspelling, which gin itself would accept silently."""
    text = gin.config_str()
    names = [b.partition("=")[0].strip() for b in bindings]
    return [
        n
        for n in names
        if n and "." not in n and "/" not in n and n not in known and not re.search(rf"%{re.escape(n)}\b", text)
    ]


def _add_search_path() -> None:
    """Put gin/ first on gin's include search path (idempotent).

    gin tries its prefixes in order and the default "" (the working directory) logs a spurious
    "Path not found" error for every include it cannot find there, so gin/ goes in front of it.
    """
    prefixes = getattr(gin.config, "_LOCATION_PREFIXES", None)  # no public API to query or order them
    if prefixes is None:
        gin.add_config_file_search_path(str(GIN_DIR))
    elif str(GIN_DIR) not in prefixes:
        prefixes.insert(0, str(GIN_DIR))


# Modules whose import registers gin configurables. They are imported before parsing: gin refuses
# to register a configurable once the config is finalized (locked), and a binding to a configurable
# that is not registered yet is an error.
CONFIGURABLE_MODULES: tuple[str, ...] = (
    "moe_jax.config",  # ModelConfig, MoEConfig
    "moe_jax.model.transformer",  # the model code (and the configurables it imports, e.g. MeshConfig)
    "moe_jax.train.config",  # TrainConfig, bound by gin/runs/trainer.gin (included by every run)
)


def import_configurables(modules: Iterable[str] = ()) -> None:
    """Import CONFIGURABLE_MODULES and `modules` so that their configurables are registered."""
    for name in (*CONFIGURABLE_MODULES, *modules):
        importlib.import_module(name)


def parse_gin(
    gin_files: Sequence[str | Path] = (),
    bindings: Sequence[str] = (),
    *,
    finalize: bool = True,
    skip_unknown: bool | Sequence[str] = False,
    modules: Iterable[str] = (),
) -> None:
    """Clear gin, then parse `gin_files` (in order) and `bindings` (after the files).

    finalize: lock the config and check that every `%gin.REQUIRED` macro was set (gin.finalize).
    skip_unknown: passed to gin (names of configurables to ignore if not registered).
    modules: extra modules to import first (e.g. the trainer's), see CONFIGURABLE_MODULES.
    Raises GinConfigError with gin's message and the available models.
    """
    import_configurables(modules)
    gin.clear_config()
    _add_search_path()
    files = [_resolve_file(str(f)) for f in gin_files]
    bindings = [_normalise_binding(b) for b in bindings]
    try:
        gin.parse_config_files_and_bindings(files, [], finalize_config=False, skip_unknown=skip_unknown)
        defined_in_files = _macros_defined()
        gin.parse_config(bindings, skip_unknown=skip_unknown)
        if finalize:
            gin.finalize()
    except (ValueError, SyntaxError, IOError, KeyError, TypeError) as err:
        gin.clear_config()
        raise GinConfigError(f"gin: {err}\n\n{_models_message()}") from err
    unused = _unknown_macros(bindings, defined_in_files)
    if unused:
        in_use = ", ".join(bound_macros())
        gin.clear_config()
        raise GinConfigError(
            f"gin: macro(s) {', '.join(unused)} set on the command line but defined and used by no "
            f"gin file (misspelt?). Macros in use: {in_use}.\n\n{_models_message()}"
        )


def bound_macros() -> list[str]:
    """Names of the macros referenced (%NAME) in the current gin config."""
    return sorted(set(re.findall(r"%([A-Za-z_][A-Za-z0-9_]*)\b", gin.config_str())) - {"gin"})


def query_macro(name: str, default=None):
    """The value bound to macro `name` in the current config, or `default` if it is not bound."""
    try:
        return gin.query_parameter(f"{name}/macro.value")
    except ValueError:
        return default


def model_config_from_gin(gin_files: Sequence[str | Path] = (), bindings: Sequence[str] = ()):
    """Parse and build the configured `ModelConfig` (the program's model entry point)."""
    parse_gin(gin_files, bindings)
    try:
        return _config.ModelConfig()
    except (ValueError, TypeError) as err:
        raise GinConfigError(f"gin: {err}\n\n{_models_message()}") from err

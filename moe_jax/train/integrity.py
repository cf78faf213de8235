"""What makes a checkpoint trustworthy (issue 18): checksums written at save and verified at restore,
parameter-by-parameter shape checks against the model, and finiteness of the restored values.

Each committed step directory gets `moe_jax_sha256.json` once orbax has finished writing it: the size
and SHA-256 of every file in it (written to a temporary name, then renamed, so it is whole or absent).
At restore the files are hashed again; a missing, truncated or altered file is named. A step written
before checksums existed (or whose run died between the commit and the manifest) has no manifest: it
is restored unverified, and still checked for non-finite values.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.data.vocab import file_sha256

MANIFEST = "moe_jax_sha256.json"
CORRUPT_DIR = "corrupt"  # checkpoints/corrupt/<step>: steps that failed verification
DISCARDED_DIR = "discarded"  # checkpoints/discarded/<step>: later steps set aside by --discard_later_steps


def _files(step_dir: Path) -> list[Path]:
    return sorted(
        p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith(MANIFEST)
    )


def write_manifest(step_dir: Path) -> Path:
    """Record size and SHA-256 of every file of a committed step directory (atomically)."""
    files = {
        str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in _files(step_dir)
    }
    out = step_dir / MANIFEST
    tmp = step_dir / f"{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out)
    return out


def has_manifest(step_dir: Path) -> bool:
    return (step_dir / MANIFEST).is_file()


def manifest_problems(step_dir: Path) -> list[str]:
    """Each file of `step_dir` that is missing, has another size or another SHA-256 than the manifest
    says (paths relative to the step directory). Empty: intact (or no manifest: see `has_manifest`)."""
    path = step_dir / MANIFEST
    if not path.is_file():
        return []
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return [f"{MANIFEST}: unreadable checksum manifest"]
    problems = []
    for rel, want in sorted(files.items()):
        p = step_dir / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != want["bytes"]:
            problems.append(
                f"{rel}: {p.stat().st_size} bytes, but {want['bytes']} were written (truncated or overwritten)"
            )
        elif file_sha256(p) != want["sha256"]:
            problems.append(f"{rel}: contents differ from the SHA-256 written at save (garbled)")
    return problems


def leaf_name(path) -> str:
    """'params/stacks/0/blocks/moe/wo/value' for a tree path of a TrainState or orbax metadata tree."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _shape_dtype(leaf) -> tuple[tuple, str]:
    return tuple(getattr(leaf, "shape", ())), str(np.dtype(getattr(leaf, "dtype", np.float32)))


def _mismatch(name: str, have: dict, want: dict) -> str | None:
    if name not in want:
        return f"{name}: in the checkpoint {have[name][0]}, but the model has no such array"
    if name not in have:
        return f"{name}: the model has {want[name][0]}, but the checkpoint has no such array"
    if have[name][0] != want[name][0]:
        return f"{name}: checkpoint {have[name][0]}, model {want[name][0]}"
    if have[name][1] != want[name][1]:
        return f"{name}: checkpoint dtype {have[name][1]}, model {want[name][1]}"
    return None


def shape_mismatches(saved: Any, expected: Any) -> list[str]:
    """Parameter by parameter: arrays of the checkpoint's metadata tree `saved` whose shape or dtype
    differ from `expected` (the model's abstract train state), and arrays only one side has. Parameters
    come first; optimizer-state arrays that mirror a listed parameter are counted in one last line."""
    have = {leaf_name(p): _shape_dtype(l) for p, l in jax.tree_util.tree_flatten_with_path(saved)[0]}
    want = {leaf_name(p): _shape_dtype(l) for p, l in jax.tree_util.tree_flatten_with_path(expected)[0]}
    bad = {n: m for n in sorted(set(have) | set(want)) if (m := _mismatch(n, have, want))}
    params = [n for n in bad if n.startswith("params/")]
    suffixes = tuple("/" + n[len("params/") :] for n in params)
    mirrors = [n for n in bad if not n.startswith("params/") and suffixes and n.endswith(suffixes)]
    out = [bad[n] for n in params] + [bad[n] for n in bad if n not in params and n not in mirrors]
    if mirrors:
        out.append(f"and {len(mirrors)} optimizer-state arrays (AdamW moments) of the parameters above")
    return out


def nonfinite_leaves(tree: Any) -> list[str]:
    """'name (k of n values)' for every floating-point array of `tree` holding NaN or inf."""
    flat = [
        (leaf_name(p), x)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not flat:
        return []
    counts = jax.jit(lambda xs: [jnp.sum(~jnp.isfinite(x)) for x in xs])([x for _, x in flat])
    return [f"{name} ({int(c)} of {x.size} values)" for (name, x), c in zip(flat, counts) if int(c)]


def move_aside(step_dir: Path, kind: str) -> Path:
    """Move `checkpoints/<step>` to `checkpoints/<kind>/<step>` (a fresh name if that is taken)."""
    dest_root = step_dir.parent / kind
    dest_root.mkdir(exist_ok=True)
    dest = dest_root / step_dir.name
    if dest.exists():
        dest = dest_root / f"{step_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.move(str(step_dir), str(dest))
    return dest

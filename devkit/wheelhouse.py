"""A wheelhouse: everything a host without a package index needs to install a Ferry part.

    python -m devkit.wheelhouse DEST [--part agent] [--part process-server ...]

DEST gets the binary wheels of each part's pinned requirements
(``requirements/<part>.txt``, ``pip download --only-binary=:all:``), a wheel
of Ferry itself, a copy of each lock file as ``requirements-<part>.txt`` and
``wheelhouse.sha256``, the digest of all of them. The roles install from it
with ``pip --no-index --find-links`` when ``ferry_wheelhouse`` names it
(roles/ferry_daemon/tasks/venv.yml), and reinstall only when that digest
changes. The lab guest is such a host (docs/lab.md).

pip does the work (it resolves, downloads and builds wheels); this only
puts its three commands together and writes the digest the roles compare.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ferry.errors import Exit, FerryError

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "wheelhouse.sha256"
"""The file the roles read: one digest over every file of the wheelhouse."""
PYTHON_VERSION = "3.11"
"""The hosts' Python (Debian 12's); wheels are fetched for it, not for the controller's."""
GLIBC_MINOR = 36
"""Debian 12's glibc is 2.36: a wheel for it or any older glibc installs there."""
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MINOR, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64",
]  # fmt: skip
"""Every tag such a wheel may carry: pip matches --platform literally, never older glibcs."""


class WheelhouseError(FerryError):
    """the wheelhouse could not be made: {problem}"""

    exit_code = Exit.DEVKIT


def build(dest: Path, parts: list[str], cache: Path | None = None) -> str:
    """Fill ``dest`` (made empty first) for ``parts``; returns the wheelhouse's digest.

    With ``cache``, the requirements' wheels are downloaded once per lock file
    into ``cache/<digest of the lock>/`` (resolving them against the index
    takes minutes) and copied from there; Ferry's own wheel is always new.
    """
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for part in parts:
        lock = ROOT / "requirements" / f"{part}.txt"
        if not lock.is_file():
            raise WheelhouseError(problem=f"no lock file {lock} for part {part!r}")
        wheels = _download(lock, cache)
        for wheel in wheels.glob("*.whl"):
            shutil.copyfile(wheel, dest / wheel.name)
        shutil.copyfile(lock, dest / f"requirements-{part}.txt")
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), str(ROOT))
    return write_manifest(dest)


def _download(lock: Path, cache: Path | None) -> Path:
    """A directory holding the wheels of every pin in ``lock`` for the hosts' platform."""
    key = hashlib.sha256(lock.read_bytes() + repr((PYTHON_VERSION, PLATFORMS)).encode())
    where = (cache or Path(tempfile.mkdtemp(prefix="wheelhouse-"))) / key.hexdigest()[:16]
    if (where / ".complete").exists():
        return where
    partial = where.with_name(where.name + f".{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    _pip("download", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
         *platforms, "--implementation", "cp", "-r", str(lock), "-d", str(partial))  # fmt: skip
    (partial / ".complete").touch()
    try:
        partial.rename(where)
    except OSError:  # another run finished the same download first
        shutil.rmtree(partial)
    return where


def write_manifest(dest: Path) -> str:
    """Write and return the digest of every file in ``dest`` (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in dest.iterdir() if p.is_file() and p.name != MANIFEST):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    (dest / MANIFEST).write_text(digest.hexdigest() + "\n")
    return digest.hexdigest()


def _pip(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise WheelhouseError(problem=f"pip {args[0]}: {last}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.wheelhouse", description=__doc__)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--part", action="append", help="a part (default: agent)")
    parser.add_argument("--cache", type=Path, help="keep downloaded wheels here for next time")
    args = parser.parse_args(argv)
    try:
        digest = build(args.dest, args.part or ["agent"], args.cache)
    except FerryError as e:
        print(e, file=sys.stderr)
        return e.exit_code
    print(f"wheelhouse {args.dest}: {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

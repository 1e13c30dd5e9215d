"""Durable file writes: temporary file, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so that renames and creations in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: str | Path,
    parts: list[bytes | bytearray | memoryview] | list[bytes] | bytes | bytearray | memoryview,
    durable: bool = True,
) -> None:
    """Replace ``path`` with ``parts`` so that a crash leaves the old or the new file, whole.

    With ``durable`` the data and the rename are fsync'ed before returning.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pieces = [parts] if isinstance(parts, bytes | bytearray | memoryview) else parts
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        try:
            for part in pieces:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        # A full disk must not keep the partial copy: it would hold the space it lacks.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def write_group(files: list[tuple[Path, list[bytes | bytearray | memoryview]]]) -> None:
    """:func:`write_atomic` of several files at once, each directory fsync'ed once.

    Group commit: every file is written to its temporary, then each is
    fsync'ed and renamed, then each directory holding them is fsync'ed once;
    on return all of them are durable, and after a crash each is whole or
    absent (a failure removes every temporary: none is left half-written).
    """
    tmps: list[tuple[Path, Path]] = []
    fds: list[int] = []
    try:
        for path, parts in files:
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmps.append((tmp, path))
            fds.append(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640))
            for part in parts:
                view = memoryview(part)
                while view:
                    view = view[os.write(fds[-1], view) :]
        while fds:  # back to back: the journal commits of a group come close together
            os.fsync(fds[0])
            os.close(fds.pop(0))
        for tmp, path in tmps:
            os.replace(tmp, path)
    except BaseException:
        for fd in fds:
            os.close(fd)
        for tmp, _ in tmps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    for directory in dict.fromkeys(path.parent for _, path in tmps):
        fsync_dir(directory)


def write_json(path: str | Path, value: Any, durable: bool = True) -> None:
    """Atomically write ``value`` as JSON (see :func:`write_atomic`)."""
    write_atomic(path, json.dumps(value, indent=1, sort_keys=True).encode() + b"\n", durable)


def read_json(path: str | Path, default: Any = None) -> Any:
    """Read a JSON file written by :func:`write_json`; ``default`` if it does not exist."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default

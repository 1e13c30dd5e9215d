"""Where the time goes: py-spy samples of each Ferry daemon, sorted into causes.

``py-spy record --nonblocking`` samples a running daemon (root only) without
pausing it; the raw (collapsed-stack) output is reduced to shares of the
samples by cause, judged from the innermost Python frame whose source line
says what it waits on: compression, hashing, TLS, HTTP to storage, disk
reads, disk writes and fsync, and so on.  Samples of threads that are idle
(blocked in a wait the kernel reports as sleeping) are not taken by py-spy,
so the shares are of busy time.  Code running without the GIL (zstd,
xxhash, TLS) is still seen: its Python caller is on the stack.
"""

from __future__ import annotations

import collections
import linecache
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.data import HERE

ROOT = HERE.parent
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*):(?P<line>\d+)\)$")

# (cause, test on (function, file, source line)); the first that matches a frame,
# walking from the innermost frame outwards, names the sample's cause.
RULES: list[tuple[str, Any]] = [
    ("lock and condition waits", lambda f, p, c: p.endswith("threading.py") and "acquire" in c),
    ("compression (zstd)", lambda f, p, c: "compress" in c or "zstandard" in p),
    ("hashing (xxh3)", lambda f, p, c: "xxh" in c or "xxhash" in p or "hashlib" in c),
    ("TLS (ssl)", lambda f, p, c: p.endswith("ssl.py")),
    ("storage HTTP (Azure SDK)", lambda f, p, c: any(
        k in p for k in ("azure/", "http/client.py", "urllib3", "requests/"))),
    ("disk read (O_DIRECT)", lambda f, p, c: "preadv" in c or ".read(" in c and "blockio" in p),
    ("disk write + fsync", lambda f, p, c: any(
        k in c for k in ("fsync", "pwrite", "os.write(", "write_atomic", "ftruncate"))),
    ("zero detection", lambda f, p, c: f in ("zero_mask", "runs", "_extents")),
    ("trace_pipe reads and parsing", lambda f, p, c: p.endswith("tracefs.py")),
    ("socket I/O", lambda f, p, c: p.endswith("socket.py") or "recv" in c or "sendall" in c),
    ("JSON", lambda f, p, c: "json" in p and p.endswith(".py") and "/json/" in p),
    ("byte copies", lambda f, p, c: "b\"\".join" in c or "bytes(" in c or "join(" in c),
]  # fmt: skip


class PySpy:
    """``py-spy record`` of one process into a raw file, until :meth:`stop`."""

    def __init__(self, pid: int, out: Path, rate: int = 100) -> None:
        exe = Path(sys.executable).with_name("py-spy")
        self.out = out
        self.proc = subprocess.Popen(
            [str(exe), "record", "-p", str(pid), "-r", str(rate), "-f", "raw", "-o", str(out),
             "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> Path | None:
        """Stop sampling and write the file; its path, or None if py-spy failed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.out if self.out.exists() and self.out.stat().st_size else None


def _source(file: str, line: int) -> str:
    for base in ("", str(ROOT), os.path.dirname(os.__file__)):
        path = os.path.join(base, file) if base else file
        text = linecache.getline(path, line)
        if text:
            return text.strip()
    return ""


def _frames(stack: str) -> list[tuple[str, str, int, str]]:
    out = []
    for part in stack.split(";"):
        m = _FRAME.match(part)
        if m:
            line = int(m["line"])
            out.append((m["func"], m["file"], line, _source(m["file"], line)))
    return out


def cause(frames: list[tuple[str, str, int, str]]) -> str:
    """The cause of one sample (innermost frame first wins)."""
    for func, file, _line, code in reversed(frames):
        for name, test in RULES:
            if test(func, file, code):
                return name
    return "other Python"


def summarize(raw: Path, top: int = 10) -> dict[str, Any]:
    """Samples, shares by cause, and the busiest innermost frames and functions."""
    causes: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = _frames(stack)
        if not frames:
            continue
        total += n
        causes[cause(frames)] += n
        func, file, lineno, code = frames[-1]
        leaves[f"{func} ({_short(file)}:{lineno}) {code[:60]}"] += n
        for name in {f"{f} ({_short(p)})" for f, p, _, _ in frames}:
            inclusive[name] += n
    share = {k: v / total for k, v in causes.most_common()} if total else {}
    return {
        "samples": total,
        "causes": share,
        "top_leaves": [(k, v / total) for k, v in leaves.most_common(top)] if total else [],
        "top_inclusive": [(k, v / total) for k, v in inclusive.most_common(top)] if total else [],
    }


def _short(file: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", str(ROOT) + "/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file

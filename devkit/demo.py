"""``make demo``: migrate a live disk on the embedded default, and prove the copy.

1. Start Azurite and the three daemons (process server, master target, agent).
2. Make a source disk: a loop device with ext4 holding real files copied from
   this system (without root: an image file and the scan tracker).
3. Protect it while a writer keeps changing files; show progress.
4. Freeze the filesystem, snapshot the source, take a tag, stop the agent,
   thaw; wait until the target has applied the tag.
5. Verify: the target's digest equals the snapshot's, and ``e2fsck -fn``
   finds the target's filesystem clean.  Print throughput, RPO and phases.

Everything it made is removed at the end, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devkit.embedded import Embedded, EmbeddedError, FileWriter, copy_tree_sample, digest

MiB = 1 << 20


def say(message: str) -> None:
    """Print one progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(*cmd: str) -> str:
    """Run a system command; raise with its stderr on failure."""
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise EmbeddedError(detail=f"{' '.join(cmd)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


class Demo:
    """One run of the demo; ``close`` undoes everything."""

    def __init__(self, size: int, fill: int, rate: int, keep: bool) -> None:
        self.size, self.fill, self.rate, self.keep = size, fill, rate, keep
        self.root = os.geteuid() == 0
        self.base = Path(tempfile.mkdtemp(prefix="ferry-demo-"))
        self.loop: str | None = None
        self.mnt = self.base / "source-mnt"
        self.embedded: Embedded | None = None
        self.writer: FileWriter | None = None
        self.phases: dict[str, float] = {}

    # -- source -----------------------------------------------------------------------

    def make_source(self) -> str:
        image = self.base / "source.img"
        with open(image, "wb") as f:
            f.truncate(self.size)
        run(
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            str(image),
        )
        if not self.root:
            say(
                "not root: protecting an image file with the scan tracker (no loop device, no tracefs)"
            )
            return str(image)
        self.loop = run("losetup", "--find", "--show", "--direct-io=on", str(image))
        self.mnt.mkdir()
        run("mount", self.loop, str(self.mnt))
        say(f"source: {self.loop} ({self.size // MiB} MiB ext4) mounted on {self.mnt}")
        copied = copy_tree_sample(self.mnt, self.fill)
        os.sync()
        say(f"copied {copied / MiB:.0f} MiB of real files from /usr into the source")
        return self.loop

    # -- phases -------------------------------------------------------------------------

    def run(self) -> int:
        t_start = time.monotonic()
        device = self.make_source()
        self.embedded = Embedded(self.base / "ferry", tenant="demo", machine="web01")
        azurite = self.embedded.start_storage()
        say(f"Azurite serving on ports {azurite.ports}")
        target = self.base / "target.img"
        self.embedded.configure(
            [{"id": "web01-disk0", "device": device}],
            {"web01-disk0": str(target)},
            agent={"tracker": "auto" if self.root else "scan", "freeze_after": 10.0},
        )
        self.embedded.start_all()
        say("process server, master target and agent started; logs in " + str(self.embedded.base))
        if self.root:
            self.writer = FileWriter(self.mnt, self.rate)
            self.writer.start()
            say(f"writer started on the source (~{self.rate / MiB:.1f} MiB/s of file changes)")
        self.phases["setup"] = time.monotonic() - t_start

        t_sync = time.monotonic()
        self.wait_initial_sync()
        self.phases["initial sync"] = time.monotonic() - t_sync
        sync_rate = self.size / self.phases["initial sync"]

        t_steady = time.monotonic()
        rpo = self.measure_rpo(seconds=10)
        self.phases["steady replication"] = time.monotonic() - t_steady

        t_final = time.monotonic()
        expected = self.final_tag(device)
        self.phases["final tag"] = time.monotonic() - t_final

        t_verify = time.monotonic()
        ok = self.verify(str(target), expected)
        self.phases["verify"] = time.monotonic() - t_verify

        self.report(sync_rate, rpo, time.monotonic() - t_start)
        return 0 if ok else 1

    @property
    def live(self) -> Embedded:
        """The embedded deployment, made at the start of :meth:`run`."""
        if self.embedded is None:
            raise EmbeddedError(detail="the embedded deployment is not made yet")
        return self.embedded

    def progress_line(self) -> None:
        status = self.live.agent_status() or {}
        disks = status.get("disks") or [{}]
        d = disks[0]
        state = self.live.target_state("web01-disk0") or {}
        togo = d.get("bytes_to_go")
        shipped = d.get("bytes_shipped", 0)
        say(
            f"agent: {d.get('phase', 'starting'):<12} tracker={status.get('tracker', '?'):<7} "
            f"to go={'?' if togo is None else f'{togo / MiB:7.1f} MiB'} shipped={shipped / MiB:7.1f} MiB "
            f"backlog={d.get('backlog_batches', 0):2d} | target: gen={state.get('gen', '-')} "
            f"applied seq={state.get('applied_seq', '-')} staged={state.get('staged', 0)}"
        )

    def wait_initial_sync(self, timeout: float = 900) -> None:
        say("initial sync: every non-zero block of the source travels; zeros are skipped")
        deadline = time.monotonic() + timeout
        last_print = 0.0
        while time.monotonic() < deadline:
            self.live.check_alive()
            status = self.live.agent_status() or {}
            disk = (status.get("disks") or [{}])[0]
            state = self.live.target_state("web01-disk0") or {}
            applied = (state.get("last_tag") or {}).get("t0_mono_ns", -1)
            tag = disk.get("last_tag") or {}
            if (
                disk.get("phase") == "replicating"
                and tag
                and applied >= tag["t0_mono_ns"]
                and state.get("gen") == disk.get("gen")
            ):
                say("initial sync done: the target sits on its first recovery point")
                return
            if time.monotonic() - last_print > 1:
                self.progress_line()
                last_print = time.monotonic()
            time.sleep(0.2)
        raise EmbeddedError(detail="the initial sync did not finish in time")

    def measure_rpo(self, seconds: float) -> list[float]:
        say(f"steady replication for {seconds:.0f} s with the writer running; sampling RPO")
        samples = []
        deadline = time.monotonic() + seconds
        last_print = 0.0
        while time.monotonic() < deadline:
            state = self.live.target_state("web01-disk0") or {}
            tag = state.get("last_tag") or {}
            if tag.get("t0_wall"):
                samples.append(time.time() - tag["t0_wall"])
            if time.monotonic() - last_print > 2:
                self.progress_line()
                last_print = time.monotonic()
            time.sleep(0.1)
        return samples

    def final_tag(self, device: str) -> tuple[str, int]:
        """Freeze, snapshot the source, tag, stop the agent, thaw; wait for the target."""
        size = self.size
        if not self.root:
            tag = self.live.tag("crash")
            self.live.stop("agent")
            expected = digest(device, size)
        else:
            say("freezing the source filesystem to snapshot it at the tag")
            run("fsfreeze", "-f", str(self.mnt))
            try:
                expected = digest(device, size)
                tag = self.live.tag("crash", timeout=120)
                say(f"tag {tag['id']} taken and durable at the process server")
                self.live.stop("agent")
            finally:
                run("fsfreeze", "-u", str(self.mnt))
            if self.writer is not None:
                self.writer.stop.set()
        say(f"waiting for the target to apply tag {tag['id']}")
        last = [0.0]

        def tick() -> None:
            if time.monotonic() - last[0] > 1:
                state = self.live.target_state("web01-disk0") or {}
                say(f"target: applied seq={state.get('applied_seq')} staged={state.get('staged')}")
                last[0] = time.monotonic()

        applied_at = self.live.wait_applied(tag["id"], progress=tick)
        self.lag = applied_at - tag["t0_wall"]
        return expected, size

    def verify(self, target: str, expected: tuple[str, int]) -> bool:
        want, size = expected
        self.live.stop("master-target")
        got = digest(target, size)
        same = got == want
        say(
            f"target sha256 {got[:16]}… {'equals' if same else 'DIFFERS FROM'} the source snapshot {want[:16]}…"
        )
        fsck = subprocess.run(["e2fsck", "-fn", target], capture_output=True, text=True)
        clean = fsck.returncode == 0
        say(f"e2fsck -fn on the target: {'clean' if clean else 'ERRORS'} (exit {fsck.returncode})")
        if not clean:
            print(fsck.stdout[-2000:], file=sys.stderr)
        return same and clean

    def report(self, sync_rate: float, rpo: list[float], total: float) -> None:
        print()
        print("Ferry demo results")
        print(
            f"  disk size                 {self.size / MiB:.0f} MiB ({self.fill / MiB:.0f} MiB of files)"
        )
        print(
            f"  initial sync throughput   {sync_rate / MiB:.1f} MiB/s of disk (end to end, verified)"
        )
        if rpo and self.writer:
            q = sorted(rpo)
            print(
                f"  RPO under writes          p50 {statistics.median(q):.2f} s, "
                f"max {q[-1]:.2f} s ({len(q)} samples)"
            )
        if self.writer:
            print(
                f"  writer changed            {self.writer.written / MiB:.1f} MiB during the demo"
            )
        print(f"  final tag to applied      {self.lag:.2f} s")
        for name, seconds in self.phases.items():
            print(f"  {name:<25} {seconds:6.1f} s")
        print(f"  total                     {total:6.1f} s")

    def close(self) -> None:
        if self.writer:
            self.writer.stop.set()
        if self.embedded:
            self.embedded.close()
        if self.loop:
            subprocess.run(["fsfreeze", "-u", str(self.mnt)], capture_output=True)
            subprocess.run(["umount", str(self.mnt)], capture_output=True)
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
        if self.keep:
            say(f"kept {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m devkit.demo``."""
    parser = argparse.ArgumentParser(description="Ferry demo on the embedded default")
    parser.add_argument(
        "--size-mib", type=int, default=1024, help="source disk size (default 1024)"
    )
    parser.add_argument(
        "--fill-mib", type=int, default=400, help="real files to copy in (default 400)"
    )
    parser.add_argument(
        "--rate-mib", type=float, default=2.0, help="writer rate, MiB/s (default 2)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (logs) afterwards"
    )
    args = parser.parse_args(argv)
    demo = Demo(args.size_mib * MiB, args.fill_mib * MiB, int(args.rate_mib * MiB), args.keep)
    try:
        code = demo.run()
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        code = 130
    except Exception as exc:
        say(f"demo failed: {exc}")
        if demo.embedded:
            for name in ("agent", "process-server", "master-target"):
                tail = demo.embedded.log_tail(name, 8)
                if tail:
                    print(f"--- {name} log (last lines): {tail}", file=sys.stderr)
        code = 1
    finally:
        demo.close()
    print("demo " + ("succeeded" if code == 0 else "FAILED"))
    return code


if __name__ == "__main__":
    sys.exit(main())

"""The master target in server mode: disks, storage grant and commands from the configuration server.

``python -m mastertarget --server-credentials FILE`` loads the credentials
written at registration, fetches its settings (``tenant``, ``disks``,
``lease_seconds``; the state directory and segment key are local) and its
storage grant, and serves every listed disk.  A disk's target follows its
configuration (protect's ``targets``: a block device such as a data disk's
LUN, or an image file); one listed without a ``target`` is applied to
``<targets-dir>/<disk>.img`` (a sparse image; ``--targets-dir`` defaults to
``<state_dir>/targets``).  Each target is checked first
(mastertarget/targets.py): a bad one is not served and its one-line problem
is logged, sent with heartbeats and fails the ``protect`` command.  A lease held by
another master target is waited for (the server moved the disk here).

Test failovers go to ``<state_dir>/test-failover/<machine>/``, cutovers to
``<state_dir>/cutover/<machine>/`` (the VHDs and ``manifest.json``); a
cutover's VHDs are checked against the fenced targets' digests, by qemu-img
and by fsck.

Reports: every applied tag as a recovery point, and each disk's applied
state (``gen``, ``applied_seq``, ``last_tag``, ``resync_required_gen`` …)
every few seconds.  Commands (a master target serves many machines, so a
machine's command never stops it):

| command | effect |
|---|---|
| ``protect`` | renew the grant, fetch the settings again, serve newly listed disks |
| ``drain`` | done at once: every whole group that arrives is applied anyway |
| ``test-failover`` | clone the machine's disks at their tag into fixed VHDs |
| ``test-failover-cleanup`` | remove exactly what ``test-failover`` made |
| ``cutover`` | wait until every disk is fenced at the final tag; fixed VHDs, checked |
| ``resume-replication`` | lift the fence of a cutover that was not committed; serve the disks again |
| ``stop`` | exit cleanly after the group in hand, unless it names a machine |
| ``rotate-credentials`` | switch to the new token and save it in the credentials file |
"""

from __future__ import annotations

import logging
import os
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from ferry import __version__
from ferry.control.credentials import Credentials
from ferry.control.daemon import ManagedDaemon, start_up
from ferry.control.errors import CommandFailed
from ferry.control.reporting import Reporter
from ferry.diskio import device_size, sha256_of
from ferry.errors import FerryError
from ferry.naming import ID_RE
from ferry.process import StopFlag
from ferry.storage import Storage
from mastertarget import cutover, defaults, targets
from mastertarget.cutover import CutoverError
from mastertarget.service import Service
from mastertarget.settings import Settings

log = logging.getLogger("ferry.mastertarget")

REPORTED = (
    "gen",
    "applied_seq",
    "last_tag",
    "applied_at",
    "staged",
    "staged_bytes",
    "resync_required_gen",
    "reason",
    "bytes_applied",
    "fenced",
    "held",
    "journal",
    "verify",
)
"""The fields of a disk's state (see mastertarget.worker) sent in its report."""


class ManagedMasterTarget(ManagedDaemon):
    """One master target run as the configuration server directs."""

    kind = "master-target"

    def __init__(
        self,
        credentials: Credentials,
        local: dict[str, Any],
        targets: Path,
        stop: StopFlag,
        credentials_path: str | None = None,
    ) -> None:
        super().__init__(credentials, local, stop, credentials_path, Settings, self._adapt)
        self.targets = targets
        self.state_dir = Path(local["state_dir"])
        self.service: Service | None = None
        self.reporter = Reporter(self.client, self.metrics)
        self._lock = threading.Lock()
        self._storage: Storage | None = None
        self._keys: dict[str, bytes] = {}
        """The tenant's segment keys by id, shared with every disk worker and refreshed in place."""
        self._keys_at = 0.0
        self._disk_targets: dict[str, str] = {}
        self.target_problems: dict[str, str] = {}
        """Disks not served because their target failed its checks: disk id -> the one line."""

    def _adapt(self, raw: dict[str, Any]) -> dict[str, Any]:
        raw.setdefault("tenant", self.credentials.tenant)
        disks = raw.get("disks")
        if isinstance(disks, list):
            raw["disks"] = [self._with_target(d) for d in disks]
        return raw

    def _with_target(self, disk: Any) -> Any:
        if isinstance(disk, dict) and isinstance(disk.get("id"), str) and not disk.get("target"):
            return {**disk, "target": str(self.targets / f"{disk['id']}.img")}
        return disk

    def _checked_disks(self, raw: dict[str, Any]) -> dict[str, Any]:
        """``raw`` with only the disks whose target passes mastertarget.targets' checks.

        A disk whose target is wrong (a device that is missing, too small or
        mounted, a file outside the targets directory) is not served: its
        problem is logged once, kept for the heartbeat and the ``protect``
        command's outcome, and checked again on the next ``protect``.
        """
        disks: list[Any] = []
        taken: set[str] = set()
        problems: dict[str, str] = {}
        for disk in raw.get("disks") or []:
            if not (isinstance(disk, dict) and isinstance(disk.get("id"), str)):
                disks.append(disk)  # the settings' own checks refuse it
                continue
            try:
                disks.append({**disk, **targets.resolve(disk, self.targets, taken)})
            except FerryError as exc:
                problems[disk["id"]] = str(exc)
                if self.target_problems.get(disk["id"]) != str(exc):
                    log.error("disk %s is not served: %s", disk["id"], exc)
        self.target_problems = problems
        return {**raw, "disks": disks}

    # -- life ---------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until a stop (signal or ``stop`` command) or a disk fails; the exit status."""
        event: threading.Event = self.stop.event
        self.state_dir.mkdir(parents=True, exist_ok=True)
        started = start_up(self.client, self.source, event)
        if started is None:
            return 0
        self._storage, raw = started
        self._serve_listed(raw)
        with self.control_threads(self._storage, self.state_dir, self.reporter):
            while not event.wait(0.5):
                self._refresh_keys()
                service = self.service
                if service is not None and service.failed.is_set():
                    break
            service = self.service
            if service is not None:
                return service.run(until_idle=False)  # stops the disks, raises a disk's error
        return 0

    def _refresh_keys(self) -> None:
        """Learn new segment keys (a rotation) now and then; old ones stay for segments in flight."""
        if self.service is None or time.monotonic() - self._keys_at < defaults.KEY_REFRESH_EVERY:
            return
        self._keys_at = time.monotonic()
        try:
            raw = self.source.fetch_raw()
            if raw is not None:
                self._keys.update(self.source.build(raw).keyring())
        except FerryError as exc:
            log.warning("could not fetch the segment keys again: %s", exc)

    def _serve_listed(self, raw: dict[str, Any] | None) -> list[str]:
        """Start serving the disks ``raw`` lists that are not served yet; their ids."""
        if not raw or not raw.get("disks"):
            log.info("no disks are assigned to this master target yet; waiting for protect")
            return []
        raw = self._checked_disks(raw)
        if not raw["disks"]:
            return []
        settings = self.source.build(raw)
        with self._lock:
            if self.service is None:
                self._keys.update(settings.keyring())
                self._keys_at = time.monotonic()
                storage = self._granted()
                self.service = Service(
                    settings,
                    lambda: storage,
                    self._keys,
                    self.stop.event,
                    wait=True,
                    on_applied=self.reporter.recovery_point,
                )
            for disk in settings.disks:
                # An image file the server placed in a directory not made yet.
                if not os.path.exists(disk.target):
                    Path(disk.target).parent.mkdir(parents=True, exist_ok=True)
            added = [d.id for d in settings.disks if self.service.add(settings, d)]
            self._disk_targets.update({d.id: str(d.target) for d in settings.disks})
        if added:
            log.info("serving %s", ", ".join(added))
        return added

    def _granted(self) -> Storage:
        """The storage of the grant; it is fetched at start, before disks or commands."""
        if self._storage is None:
            raise CommandFailed(detail="the master target has not started yet")
        return self._storage

    # -- commands -----------------------------------------------------------------------

    def commands(self) -> dict[str, Any]:
        """The master target's own command handlers (stop and rotation: ManagedDaemon's)."""
        return {
            "protect": self.cmd_protect,
            "drain": self.cmd_drain,
            "test-failover": self.cmd_test_failover,
            "test-failover-cleanup": self.cmd_test_failover_cleanup,
            "cutover": self.cmd_cutover,
            "resume-replication": self.cmd_resume_replication,
        }

    def cmd_protect(self, _args: dict[str, Any]) -> str:
        """Fetch the settings again and serve newly listed disks (the grant is renewed first)."""
        self._granted().renew_grant()
        added = self._serve_listed(self.source.fetch_raw())
        if self.target_problems:
            raise CommandFailed(detail="; ".join(f"disk {d}: {p}" for d, p in sorted(
                self.target_problems.items())) + (f" (now serving {', '.join(added)})" if added else ""))  # fmt: skip
        served = self.service.serving() if self.service else []
        if added:
            return f"now serving {', '.join(added)}"
        return f"already serving {', '.join(served)}" if served else "no disks assigned"

    def cmd_drain(self, args: dict[str, Any]) -> str:
        """Nothing to hold back: whole groups are applied as they arrive."""
        return f"applying every whole group of {args.get('machine') or 'every disk'} as it arrives"

    def _targets(self, args: dict[str, Any]) -> dict[str, str]:
        disks = [d for d in args.get("disks") or [] if isinstance(d, str)]
        if not disks:
            raise CutoverError(detail=f"machine {args.get('machine')} names no disks")
        known = self._disk_targets
        return {disk: known.get(disk) or str(self.targets / f"{disk}.img") for disk in disks}

    def _out_dir(self, what: str, args: dict[str, Any]) -> Path:
        machine = str(args.get("machine") or "")
        if not ID_RE.match(machine):
            raise CutoverError(detail=f"{machine[:60]!r} is not a machine id")
        return self.state_dir / what / machine

    def cmd_test_failover(self, args: dict[str, Any]) -> dict[str, Any]:
        """Copy the machine's disks at one point (``point``, ``point_time`` or the newest) into
        fixed VHDs; replication goes on."""
        out = self._out_dir("test-failover", args)
        point, at = args.get("point") or None, cutover.parse_time(args.get("point_time"))
        record = cutover.test_failover(self.state_dir, args["machine"], self._targets(args), out,
                                       point=point, point_time=at)  # fmt: skip
        return {"dir": str(out), "disks": [
            {"id": d["id"], "vhd": d["vhd"], "tag": (d.get("tag") or {}).get("id"),
             "apply_held_s": d.get("apply_held_s")} for d in record["disks"]]}  # fmt: skip

    def cmd_test_failover_cleanup(self, args: dict[str, Any]) -> dict[str, Any]:
        """Remove exactly what the machine's test failover made."""
        removed = cutover.test_failover_cleanup(self._out_dir("test-failover", args))["removed"]
        return {"removed": len(removed)}

    def cmd_cutover(self, args: dict[str, Any]) -> dict[str, Any]:
        """Wait until every disk is fenced at the final tag, then make and check fixed VHDs.

        With ``point`` or ``point_time`` (a failover to an older point) the
        VHDs are made from the disks materialised at that point and checked
        by their filesystems (mastertarget.cutover.convert).

        Each VHD's data is checked against the source's digest the agent took
        after the final tag (``args.digests``; the fenced target's own when
        absent), with qemu-img and fsck (mastertarget.cutover.convert); the
        outcome names the VHDs and what they were checked against.
        """
        targets = self._targets(args)
        fenced = {disk: self._wait_fenced(disk, args.get("final_tag")) for disk in targets}
        digests = {}
        given_digests = args.get("digests")
        source: dict[str, Any] = given_digests if isinstance(given_digests, dict) else {}
        for disk, target in targets.items():
            given = source.get(disk)
            if isinstance(given, dict) and given.get("sha256") and given.get("size"):
                digests[disk] = {"size": int(given["size"]), "sha256": str(given["sha256"])}
            else:  # no source digest: at least the VHD must be the fenced target, byte for byte
                size = device_size(target)
                digests[disk] = {"size": size, "sha256": sha256_of(target, size)}
        against = "source" if all(isinstance(source.get(d), dict) for d in targets) else "target"
        spec = {
            "machine": args["machine"], "tenant": self.credentials.tenant,
            "out_dir": str(self._out_dir("cutover", args)),
            "final_tag": next(iter(fenced.values())), "disks": [{"id": d} for d in targets],
            "targets": targets, "digests": digests, "state_dir": str(self.state_dir),
            "point": args.get("point"), "point_time": args.get("point_time"),
        }  # fmt: skip
        manifest = cutover.convert(spec)
        if not manifest.get("verified"):
            failed = [d["id"] for d in manifest["disks"] if not d.get("verified")]
            raise CutoverError(detail=f"VHD checks failed for {', '.join(failed)}")
        return {"verified": True, "checked_against": against,
                "manifest": str(Path(spec["out_dir"]) / "manifest.json"),
                "vhds": [d["vhd"] for d in manifest["disks"]]}  # fmt: skip

    def cmd_resume_replication(self, args: dict[str, Any]) -> dict[str, Any]:
        """Lift the fence of a machine's disks after a cutover that was not committed; serve them.

        Refused when the machine's cutover here is complete (committed).  The
        outcome names each disk and the final tag it was fenced at.
        """
        disks = [d for d in args.get("disks") or [] if isinstance(d, str)]
        if not disks or self.service is None:
            raise CutoverError(detail=f"machine {args.get('machine')} has no disks served here")
        why = "replication resumed by the operator (cutover not committed)"
        out = self._out_dir("cutover", args)
        storage, tenant = self._granted(), self.credentials.tenant
        manifest = cutover.check_not_committed(out) or {}
        done = []
        unknown = sorted(set(disks) - set(self.service.serving()))
        if unknown:
            raise CutoverError(detail=f"disk {unknown[0]} is not served by this master target")
        for disk in disks:
            done.append(self.service.serve_again(disk, partial(cutover.unfence, self.state_dir,
                                                               storage, tenant, disk, why)))  # fmt: skip
        if out.is_dir():
            cutover.record_resume(out, {"at": time.time(), "why": why, "disks": done,
                                        "cutover_reason": manifest.get("reason")})  # fmt: skip
        log.info("replication of %s resumed: %s", args.get("machine"), done)
        return {"resumed": [{k: d.get(k) for k in ("disk", "changed", "was_fenced_at")}
                            for d in done]}  # fmt: skip

    def _wait_fenced(self, disk: str, final_tag: str | None) -> dict[str, Any]:
        """The tag ``disk`` was fenced at, once it is (at ``final_tag`` when one is named)."""
        deadline = time.monotonic() + defaults.CUTOVER_FENCE_WAIT
        while not self.stop.event.is_set() and time.monotonic() < deadline:
            fenced = cutover.read_cursor(self.state_dir, disk).get("fenced") or {}
            tag = fenced.get("tag") or {}
            if tag and final_tag not in (None, tag.get("id")):
                raise CutoverError(
                    detail=f"disk {disk} was fenced at tag {tag.get('id')}, not {final_tag}"
                )
            if tag:
                return tag
            time.sleep(0.5)
        raise CutoverError(detail=f"disk {disk} was not fenced at the final tag in time")

    # -- reports ------------------------------------------------------------------------

    def heartbeat(self) -> dict[str, Any]:
        """The status sent with each heartbeat."""
        service = self.service
        disks = service.board.snapshot() if service else {}
        return {
            "version": __version__,
            "state": "serving" if service else "waiting-for-protect",
            "disks": sorted(service.serving()) if service else [],
            "resync_required": sorted(
                d for d, s in disks.items() if s.get("resync_required_gen") is not None
            ),
            "target_problems": dict(self.target_problems),
        }

    def metrics(self) -> dict[str, dict[str, Any]]:
        """Each served disk's applied state, as its report."""
        service = self.service
        if service is None:
            return {}
        return {
            disk: {k: state.get(k) for k in REPORTED}
            for disk, state in service.board.snapshot().items()
        }


def run(credentials_path: str, local: dict[str, Any], targets: str | None, stop: StopFlag) -> int:
    """Server mode's entry: load the credentials and serve."""
    where = Path(targets) if targets else Path(local["state_dir"]) / defaults.TARGETS_SUBDIR
    return ManagedMasterTarget.serve(credentials_path, local, stop, targets=where)

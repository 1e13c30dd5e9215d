"""The recovery journal: older points materialise exactly, retention keeps what the policy says.

The worker runs in process against real Azurite (support.segments plays the
process server), with image-file targets; the machine-wide test drives the
real agent on two loop devices.
"""

from __future__ import annotations

import dataclasses
import gc
import random
import signal
import subprocess
import tracemalloc
from pathlib import Path

import pytest
from support import wait_for
from support.master_target import MasterTarget
from support.segments import DISK, SegmentShipper

from ferry.batch import Batch
from mastertarget import journal, layout, recovery
from mastertarget.cursor import Cursor
from mastertarget.cutover import CutoverError
from mastertarget.settings import DiskSettings, Settings
from mastertarget.worker import DiskWorker

KiB, MiB = 1 << 10, 1 << 20
NOW = 1_800_000_000.0


# -- the policy, on fabricated points ---------------------------------------------------------


def point(i: int, t: float, kind: str = "crash") -> dict:
    return {"id": f"p{i}", "kind": kind, "t0_wall": t}


def test_retention_keeps_exactly_what_the_policy_says():
    policy = journal.Policy(keep_all_s=600, thin_every_s=300, window_s=3600, budget_bytes=1 << 40)
    # One point every 40 s for two hours, one app-consistent point among the old ones.
    pts = [point(i, NOW - 7200 + 40 * i, "app" if i == 20 else "crash") for i in range(181)]
    kept = journal.retained(pts, NOW, policy)
    by_id = {p["id"]: p for p in pts}
    expected = []
    for i, p in enumerate(pts):
        age = NOW - p["t0_wall"]
        in_slice = [q for q in pts if q["t0_wall"] // 300 == p["t0_wall"] // 300]
        newest_of_slice = in_slice[-1]["id"] == p["id"]
        if i == len(pts) - 1 or age < 600 or (age < 3600 and newest_of_slice):
            expected.append(p["id"])
    assert kept == expected
    ages = [NOW - by_id[k]["t0_wall"] for k in kept]
    assert max(ages) < 3600, "nothing beyond the window"
    young = [p["id"] for p in pts if NOW - p["t0_wall"] < 600]
    assert set(young) <= set(kept), "every young point is kept"
    thinned = [k for k in kept if NOW - by_id[k]["t0_wall"] >= 600]
    slices = [by_id[k]["t0_wall"] // 300 for k in thinned]
    assert len(slices) == len(set(slices)), "one point per 5-minute slice"
    assert len(thinned) in (10, 11)  # 50 minutes of 5-minute slices, the edges partial
    # The app-consistent point: beyond the window here, so dropped; inside it, kept.
    assert "p20" not in kept
    pts[100]["kind"] = "app"
    assert "p100" in journal.retained(pts, NOW, policy)


def test_retention_always_keeps_the_targets_own_point():
    policy = journal.Policy(keep_all_s=0, thin_every_s=0, window_s=0, budget_bytes=0)
    pts = [point(i, NOW - 1000 + i) for i in range(5)]
    assert journal.retained(pts, NOW, policy) == ["p4"]


def test_a_running_journal_reports_the_points_a_restart_reads_from_its_records(
    tmp_path, monkeypatch
):
    # The journal follows its chain group by group instead of walking every record
    # each time: what it reports must stay what its files say, through the paths that
    # leave something else on disk (a record left by a crash, a group begun and
    # abandoned, thinning's merges, the budget).  Its report costs no walk either, and
    # must say what a walk of the chain says.
    monkeypatch.setattr(journal, "KEPT_REPORTED", 4)  # the list of older points gets cut
    clock = [NOW]
    policy = journal.Policy(
        keep_all_s=20.0, thin_every_s=5.0, window_s=200.0, budget_bytes=256 * KiB
    )
    live = journal.Journal(tmp_path, DISK, policy, now=lambda: clock[0])
    tag = {"id": "p0", "kind": "crash", "t0_wall": NOW}
    cursor = {"gen": 1, "applied_seq": 0, "last_tag": tag}
    live.open(cursor)
    rng = random.Random(7)
    image = bytearray(rng.randbytes(256 * KiB))

    def read(offset: int, length: int) -> bytes:
        return bytes(image[offset : offset + length])

    def group(seq: int, apply: bool = True) -> dict:
        to = {"gen": 1, "seq": seq, "tag": point(seq, clock[0])}
        extents = [(rng.randrange(0, 60) * 4 * KiB, 4 * KiB)]
        live.before_group(cursor, to, extents, read, len(image))
        if apply:
            for offset, length in extents:
                image[offset : offset + length] = rng.randbytes(length)
        return to

    def agrees(cursor: dict) -> None:
        assert live._clean_for == journal.signature(cursor)  # it follows without a walk
        assert live._chain(cursor) == journal.chain(live.records, cursor)
        again = journal.Journal(tmp_path, DISK, policy, now=lambda: clock[0])
        again.open(cursor)
        mine, read_back = live.state(cursor), again.state(cursor)
        assert mine == live._state_walked(cursor)
        assert read_back == again._state_walked(cursor)
        mine.pop("cut_short"), read_back.pop("cut_short")  # an alert, kept in memory only
        assert mine == read_back
        assert live.total_bytes == again.total_bytes

    seen = set()
    for seq in range(1, 240):
        clock[0] += 0.5
        if seq in (17, 160):  # a group begun and abandoned: the next group from here resets
            group(seq * 1000, apply=False)
        to = group(seq)
        if seq % 13 == 0:  # the worker restarted before applying: the record is kept as is
            group(seq)
        cursor = {"gen": 1, "applied_seq": seq, "last_tag": to["tag"]}
        live.after_group(cursor)
        agrees(cursor)
        state = live.state(cursor)
        seen |= {"merged"} if any(r.src["seq"] < r.dst["seq"] - 1 for r in live.records) else set()
        seen |= {"budget"} if "budget" in (live.cut_short or {}).get("reason", "") else set()
        seen |= {"cut"} if state["kept_truncated"] and len(state["kept"]) == 4 else set()
    assert seen == {"merged", "budget", "cut"}, seen
    assert state["points"] > 1 and state["all_since"]
    clock[0] += 100  # no writes for a while: every point, the target's own too, is older
    agrees(cursor)
    assert live.state(cursor)["all_since"] is None


def test_an_hour_of_points_costs_the_master_target_little_memory(tmp_path):
    # Every point of the last hour is kept, each with its record in the journal's index:
    # 14,400 per disk at four points a second.  A 30-minute soak saw the master target
    # grow by 0.75 MiB a minute with them (about 3 KiB a point, 45 MiB an hour per disk).
    # Measured here as the worker makes them (the cursor copied for every group, tags as
    # the agent writes them) and as a restart reads them back from their files.
    clock = [NOW]
    policy = journal.Policy(keep_all_s=3600, thin_every_s=300, window_s=86400, budget_bytes=1 << 40)
    image = bytes(64 * KiB)

    def tag(i: int) -> dict:
        return {"id": f"m1-{1_800_000_000_000_000_000 + i * 250_000_000}", "kind": "crash",
                "t0_mono_ns": 9_000_000_000_000 + i * 250_000_000, "t0_wall": NOW + i / 4,
                "frozen": [], "disks": [DISK]}  # fmt: skip

    def grown(make) -> float:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            made = make()
            gc.collect()
            return (tracemalloc.get_traced_memory()[0] - before) / len(made.records)
        finally:
            tracemalloc.stop()

    cursor = Cursor(tenant="t", disk=DISK, gen=1, applied_seq=1, last_tag=tag(0))

    def live() -> journal.Journal:
        nonlocal cursor
        jr = journal.Journal(tmp_path, DISK, policy, now=lambda: clock[0])
        jr.open(dataclasses.asdict(cursor))
        for i in range(1, 2001):
            clock[0] = NOW + i / 4
            to = {"gen": 1, "seq": i + 1, "tag": tag(i)}
            jr.before_group(dataclasses.asdict(cursor), to, [(i % 16 * 4 * KiB, 4 * KiB)],
                            lambda o, n: image[o : o + n], len(image))  # fmt: skip
            cursor = dataclasses.replace(cursor, applied_seq=i + 1, last_tag=to["tag"])
            jr.after_group(dataclasses.asdict(cursor))
        return jr

    def restarted() -> journal.Journal:
        jr = journal.Journal(tmp_path, DISK, policy, now=lambda: clock[0])
        jr.open(dataclasses.asdict(cursor))
        return jr

    per_point = grown(live)
    assert per_point < 1.5 * KiB, f"{per_point:.0f} bytes a point while running"
    per_point = grown(restarted)
    assert per_point < 2 * KiB, f"{per_point:.0f} bytes a point after a restart"


def test_overlay_lets_the_older_before_image_win():
    below = [(0, b"a" * 10), (20, b"b" * 10)]
    above = [(5, b"X" * 10), (28, b"Y" * 4)]
    out = journal.overlay(below, above)
    image = bytearray(b"." * 40)
    for offset, data in out:
        image[offset : offset + len(data)] = data
    assert bytes(image) == b"aaaaaXXXXXXXXXX.....bbbbbbbbYYYY........"
    offsets = [o for o, _ in out]
    assert offsets == sorted(offsets)
    ends = [o + len(d) for o, d in out]
    assert all(ends[i] < offsets[i + 1] for i in range(len(out) - 1)), "joined and disjoint"


# -- the worker writes the journal; every point materialises exactly -----------------------------


@pytest.fixture
def journaled(tmp_path, storage, tenant):
    """Factory for a DiskWorker of DISK with a journal policy; closed at teardown."""
    made = []

    def make(**policy) -> DiskWorker:
        settings = Settings(
            tenant=tenant,
            state_dir=tmp_path / "state",
            disks=[DiskSettings(DISK, tmp_path / "target.img")],
            allow_unsealed=True,
            **policy,
        )
        worker = DiskWorker(settings, settings.disks[0], storage)
        made.append(worker.open())
        return worker

    yield make
    for worker in made:
        worker.close()


def drain(worker: DiskWorker) -> None:
    for _ in range(100):
        if not worker.step():
            return
    raise AssertionError("the worker never went idle")


def start(ps: SegmentShipper, worker: DiskWorker) -> None:
    ps.ask_resync()
    drain(worker)


def apply_to(image: bytearray, batch: Batch) -> None:
    for offset, data, length in batch.pieces():
        image[offset : offset + length] = bytes(length) if data is None else data


def random_writes(rng: random.Random, size: int, count: int) -> list:
    writes = []
    for _ in range(count):
        n = rng.choice([4 * KiB, 16 * KiB, 64 * KiB])
        offset = rng.randrange(0, size - n) // 4096 * 4096
        writes.append((offset, rng.randbytes(n)) if rng.random() < 0.9 else (offset, n))
    return writes


def run_groups(ps, worker, size, groups, rng, t0=None, every=1.0, drain_every=1):
    """Apply ``groups`` groups of 1-3 batches; return {tag id: image at that tag}.

    The first group fills the disk with random bytes, so that before-images
    do not compress away.
    """
    model = bytearray(size)
    images = {}
    seq = worker.cursor.applied_seq
    for g in range(groups):
        batches = rng.randint(1, 3) if g else 1
        for b in range(batches):
            seq += 1
            writes = (
                random_writes(rng, size, rng.randint(1, 6)) if g else [(0, rng.randbytes(size))]
            )
            batch = ps.batch(1, seq, writes, tag=b == batches - 1)
            if batch.tag and t0 is not None:
                batch.tag["t0_wall"] = t0 + g * every
            ps.ship(batch)
            apply_to(model, batch)
        if (g + 1) % drain_every == 0 or g == groups - 1:
            drain(worker)
        images[batch.tag["id"]] = bytes(model)
    return images


def materialise_each(tmp_path, worker, images) -> list[str]:
    """Materialise every point the disk retains; assert each equals the target at its tag."""
    state_dir = worker.directory.parent
    points = recovery.disk_points(state_dir, DISK)
    assert points[-1]["id"] == worker.cursor.last_tag["id"]
    for p in points:
        out = tmp_path / "out" / f"{p['id']}.img"
        out.parent.mkdir(exist_ok=True)
        recovery.materialise_disk(state_dir, DISK, worker.target.path, out, p["id"])
        assert out.read_bytes() == images[p["id"]], f"point {p['id']} differs"
        out.unlink()
    return [p["id"] for p in points]


def test_every_retained_point_materialises_as_the_target_was_at_its_tag(
    journaled, storage, tenant, tmp_path
):
    size = 4 * MiB
    ps = SegmentShipper(storage, tenant, size)
    worker = journaled()
    start(ps, worker)
    images = run_groups(ps, worker, size, 12, random.Random(3))
    retained = materialise_each(tmp_path, worker, images)
    assert retained == list(images), "every point of the last hour is kept"
    records = journal.scan(layout.journal_dir(worker.directory.parent, DISK))
    assert len(records) == 11  # one per group after the first tag
    state = worker.state()["journal"]
    assert state["points"] == 12 and state["bytes"] == sum(r.size for r in records)


def test_thinning_merges_records_and_older_points_stay_exact(journaled, storage, tenant, tmp_path):
    size = 2 * MiB
    ps = SegmentShipper(storage, tenant, size)
    # Every point for 10 min, then one per 5 min for an hour.
    worker = journaled(journal_keep_all_minutes=10, journal_thin_every_minutes=5,
                       journal_window_hours=1)  # fmt: skip
    start(ps, worker)
    t0 = worker.journal.now() - 90 * 60  # one tag every 3 min, from 90 min ago
    images = run_groups(ps, worker, size, 31, random.Random(5), t0=t0, every=180.0, drain_every=8)
    # Time moves on past the newest point's slice: every run of thinned points is final.
    later = worker.journal.now() + 15 * 60
    worker.journal.now = lambda: later
    pts = [{"id": tid, "kind": "crash", "t0_wall": t0 + i * 180.0} for i, tid in enumerate(images)]
    expected = journal.retained(pts, later, worker.journal.policy)
    while True:  # merges are bounded per pass: run passes until nothing changes
        before = len(worker.journal.records)
        worker.journal.after_group(dataclasses.asdict(worker.cursor), force=True)
        if len(worker.journal.records) == before:
            break
    retained = materialise_each(tmp_path, worker, images)
    assert retained == expected
    assert len(retained) < 20, retained


def test_budget_cuts_retention_short_and_says_so(journaled, storage, tenant, tmp_path):
    size = 4 * MiB
    ps = SegmentShipper(storage, tenant, size)
    worker = journaled(journal_budget_mib=1)
    start(ps, worker)
    images = run_groups(ps, worker, size, 20, random.Random(7))
    worker.journal.after_group(dataclasses.asdict(worker.cursor), force=True)
    state = worker.state()["journal"]
    assert state["bytes"] <= 1 * MiB
    assert 1 < state["points"] < 20
    assert state["cut_short"] and "budget" in state["cut_short"]["reason"]
    materialise_each(tmp_path, worker, images)


def test_a_point_no_longer_retained_is_refused(journaled, storage, tenant, tmp_path):
    size = 1 * MiB
    ps = SegmentShipper(storage, tenant, size)
    worker = journaled(journal_budget_mib=0)
    start(ps, worker)
    images = run_groups(ps, worker, size, 3, random.Random(9))
    state_dir = worker.directory.parent
    oldest = list(images)[0]
    with pytest.raises(CutoverError, match="is not retained"):
        recovery.materialise(state_dir, "m", {DISK: worker.target.path}, tmp_path / "o", tag=oldest)
    made = recovery.materialise(state_dir, "m", {DISK: worker.target.path}, tmp_path / "o")
    assert made["point"]["id"] == list(images)[-1]
    assert (tmp_path / "o" / f"{DISK}.img").read_bytes() == images[made["point"]["id"]]


def test_journal_off_keeps_nothing(journaled, storage, tenant, tmp_path):
    size = 1 * MiB
    ps = SegmentShipper(storage, tenant, size)
    worker = journaled(journal=False)
    start(ps, worker)
    images = run_groups(ps, worker, size, 3, random.Random(1))
    assert not layout.journal_dir(worker.directory.parent, DISK).exists()
    assert recovery.disk_points(worker.directory.parent, DISK)[-1]["id"] == list(images)[-1]
    assert len(recovery.disk_points(worker.directory.parent, DISK)) == 1


# -- a kill -9 in the middle of the journal's write ----------------------------------------------


def write_config(path: Path, tenant: str, state_dir: Path, target: Path) -> Path:
    path.write_text(
        f'tenant = "{tenant}"\nstate_dir = "{state_dir}"\nallow_unsealed = true\n'
        f'[[disks]]\nid = "{DISK}"\ntarget = "{target}"\n'
    )
    return path


def _cursor_seq(state_dir: Path) -> int:
    return (journal.durable.read_json(layout.cursor_path(state_dir, DISK)) or {}).get(
        "applied_seq", 0
    )


def _kill_mid_write(daemon: MasterTarget, state_dir: Path, seq: int) -> bool:
    """Kill ``daemon`` as soon as an undo record is being written; True if it was."""
    journal_dir = layout.journal_dir(state_dir, DISK)

    def writing() -> bool:
        return any(journal_dir.glob(".*tmp*"))

    wait_for(lambda: writing() or _cursor_seq(state_dir) == seq, 60, "the journal write",
             interval=0.001)  # fmt: skip
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    return writing()


def test_kill_9_mid_journal_write_leaves_target_and_journal_agreeing(
    azurite, storage, tenant, tmp_path
):
    size, piece = 48 * MiB, 8 * MiB
    state_dir, target = tmp_path / "state", tmp_path / "target.img"
    config = write_config(tmp_path / "mt.toml", tenant, state_dir, target)
    ps = SegmentShipper(storage, tenant, size)
    rng = random.Random(11)
    model = bytearray(size)
    images: dict[str, bytes] = {}
    daemons = [MasterTarget(config, azurite.connection_string, tmp_path / "mt0.log")]
    try:
        ps.ask_resync()
        seq = kills = mid = 0
        for g in range(5):
            # Large, incompressible groups: the undo record takes a while to write.
            batches = []
            for b in range(2):
                seq += 1
                writes = [(rng.randrange(0, size - piece) // 4096 * 4096, rng.randbytes(piece // 2))
                          for _ in range(2)]  # fmt: skip
                batches.append(ps.batch(1, seq, writes, tag=b == 1))
            for batch in batches:
                ps.ship(batch)
                apply_to(model, batch)
            images[batches[-1].tag["id"]] = bytes(model)
            if g >= 2:
                mid += _kill_mid_write(daemons[-1], state_dir, seq)
                kills += 1
                log = tmp_path / f"mt{g}.log"
                daemons.append(MasterTarget(config, azurite.connection_string, log))
            wait_for(lambda n=seq: _cursor_seq(state_dir) == n, 120, f"group {g}")
        assert kills == 3 and mid >= 1, f"{mid} of the kills came mid-write"
        for p in recovery.disk_points(state_dir, DISK):
            out = tmp_path / "point.img"
            recovery.materialise_disk(state_dir, DISK, target, out, p["id"])
            assert out.read_bytes() == images[p["id"]], f"point {p['id']} differs after the kills"
        assert len(recovery.disk_points(state_dir, DISK)) == 5
        assert target.read_bytes() == bytes(model)
    finally:
        for daemon in daemons:
            daemon.kill()


# -- the checks of a materialised disk --------------------------------------------------------


@pytest.mark.root
def test_each_filesystem_of_a_materialised_disk_is_checked(tmp_path):
    whole, parted = tmp_path / "whole.img", tmp_path / "parted.img"
    for image in (whole, parted):
        with open(image, "wb") as f:
            f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(whole)], check=True)
    table = "label: gpt\nstart=2048, size=40960\nstart=43008, size=40960\n"
    subprocess.run(["sfdisk", "-q", str(parted)], input=table, text=True, check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={2048 * 512}", str(parted),
                    "20M"], check=True)  # fmt: skip
    assert [(c["filesystem"], c["clean"]) for c in recovery.check_filesystems(whole)] == [
        ("ext", True)
    ]
    checks = recovery.check_filesystems(parted)
    assert [(c["offset"], c["filesystem"], c["clean"]) for c in checks] == [
        (2048 * 512, "ext", True)
    ], "the partition with a filesystem is checked, the empty one skipped"
    # A damaged filesystem is reported, not hidden: zero its root directory's inode table.
    with open(parted, "r+b") as f:
        f.seek(2048 * 512 + 1024 + 4096)  # group descriptors follow the superblock
        f.write(bytes(4096))
    assert [c["clean"] for c in recovery.check_filesystems(parted)] == [False]
    blank = tmp_path / "blank.img"
    with open(blank, "wb") as f:
        f.truncate(8 * MiB)
    assert recovery.check_filesystems(blank)[0]["clean"] is None


def test_a_cutover_to_an_older_point_makes_its_vhds_from_that_point(
    journaled, storage, tenant, tmp_path
):
    from mastertarget import cutover

    size = 2 * MiB
    ps = SegmentShipper(storage, tenant, size)
    worker = journaled()
    start(ps, worker)
    images = run_groups(ps, worker, size, 4, random.Random(13))
    older, newest = list(images)[1], list(images)[-1]
    spec = {"machine": "m", "tenant": tenant, "out_dir": str(tmp_path / "co"),
            "final_tag": worker.cursor.last_tag, "disks": [{"id": DISK}],
            "targets": {DISK: worker.target.path}, "digests": {}, "point": older,
            "state_dir": str(worker.directory.parent)}  # fmt: skip
    manifest = cutover.convert(spec)
    assert manifest["verified"] and manifest["complete"], manifest
    vhd = Path(manifest["disks"][0]["vhd"])
    assert vhd.read_bytes()[:size] == images[older] != images[newest]

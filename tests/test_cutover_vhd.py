"""The cutover's plain Python: fixed VHDs, verification, manifests, test-failover clones."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from support.disks import LoopDisk, release_all

from ferry import diskio
from ferry import vhd as vhdfmt
from mastertarget import applylock, cutover

MiB = 1 << 20


def qemu_img() -> str:
    found = shutil.which("qemu-img")
    if not found:
        pytest.fail(
            "qemu-img is not installed (Debian package qemu-utils; `make setup` installs it)"
        )
    return found


def write_image(path: Path, size: int, chunks: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)
    return path


def sha256(path: Path, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


# -- the footer --------------------------------------------------------------------------


def test_footer_fields_follow_the_vhd_specification():
    footer = vhdfmt.vhd_footer(
        64 * MiB, timestamp=vhdfmt.VHD_EPOCH + 1234, disk_id=bytes(range(16))
    )
    assert len(footer) == 512
    assert footer[:8] == b"conectix"
    assert struct.unpack(">I", footer[8:12])[0] == 2  # features: reserved bit
    assert struct.unpack(">I", footer[12:16])[0] == 0x00010000  # format version
    assert struct.unpack(">Q", footer[16:24])[0] == 0xFFFFFFFFFFFFFFFF  # fixed: no dynamic header
    assert struct.unpack(">I", footer[24:28])[0] == 1234  # seconds since 2000-01-01
    assert footer[36:40] == b"Wi2k"
    assert struct.unpack(">QQ", footer[40:56]) == (64 * MiB, 64 * MiB)
    assert struct.unpack(">I", footer[60:64])[0] == 2  # disk type: fixed
    assert footer[68:84] == bytes(range(16))
    assert footer[84] == 0  # saved state
    assert footer[85:] == bytes(427)


def test_footer_checksum_is_the_ones_complement_of_the_byte_sum():
    footer = vhdfmt.vhd_footer(8 * MiB)
    stored = struct.unpack(">I", footer[64:68])[0]
    assert stored == (~(sum(footer) - sum(footer[64:68]))) & 0xFFFFFFFF
    assert vhdfmt.parse_footer(footer)["checksum"] == stored


def test_a_corrupted_footer_is_refused():
    footer = bytearray(vhdfmt.vhd_footer(8 * MiB))
    footer[50] ^= 1
    with pytest.raises(vhdfmt.VhdInvalid, match="checksum"):
        vhdfmt.parse_footer(bytes(footer))
    with pytest.raises(vhdfmt.VhdInvalid, match="cookie"):
        vhdfmt.parse_footer(b"x" * 8 + vhdfmt.vhd_footer(8 * MiB)[8:])


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (8 * MiB, (240, 4, 17)),  # small disks: 17 sectors per track, at least 4 heads
        (1 << 30, (2080, 16, 63)),
        (128 << 30, (65535, 16, 255)),  # capped at 65535 x 16 x 255 sectors
    ],
)
def test_geometry_follows_the_specification_table(size, expected):
    cylinders, heads, spt = vhdfmt.chs_geometry(size)
    assert (cylinders, heads, spt) == expected
    assert cylinders * heads * spt * 512 <= size


@pytest.mark.parametrize("mib", [3, 64, 1000, 40000])
def test_geometry_agrees_with_qemu(tmp_path, mib):
    # qemu rounds a size up to whole cylinders; at a size the geometry covers
    # exactly, its implementation of the specification's table must agree.
    cylinders, heads, spt = vhdfmt.chs_geometry(mib * MiB)
    exact = cylinders * heads * spt * 512
    made = tmp_path / "q.vhd"
    subprocess.run(
        [qemu_img(), "create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(made), str(exact)],
        check=True,
    )
    with open(made, "rb") as f:
        f.seek(-512, os.SEEK_END)
        theirs = vhdfmt.parse_footer(f.read()) if exact % MiB == 0 else _geometry(f.read())
    assert tuple(theirs["geometry"]) == (cylinders, heads, spt)


def _geometry(footer: bytes) -> dict[str, list[int]]:
    return {"geometry": list(struct.unpack(">HBB", footer[56:60]))}


def test_sizes_are_rounded_up_to_a_whole_mib():
    assert vhdfmt.vhd_size(MiB) == MiB
    assert vhdfmt.vhd_size(MiB + 512) == 2 * MiB
    assert vhdfmt.vhd_size(1) == MiB
    with pytest.raises(Exception, match="multiple of 512"):
        vhdfmt.vhd_footer(1000)


# -- writing and checking a VHD ----------------------------------------------------------


def test_image_becomes_a_fixed_vhd_that_qemu_img_accepts(tmp_path):
    size = 5 * MiB + 4096  # not a whole MiB: padded
    image = write_image(tmp_path / "disk.img", size, {0: b"boot" * 128, 3 * MiB: os.urandom(8192)})
    vhd = tmp_path / "disk.vhd"
    footer = vhdfmt.image_to_vhd(image, vhd, size)
    assert footer["current_size"] == 6 * MiB
    assert vhd.stat().st_size == 6 * MiB + 512
    info = json.loads(
        subprocess.run(
            [qemu_img(), "info", "-f", "vpc", "--output", "json", str(vhd)],
            check=True, capture_output=True, text=True,
        ).stdout
    )  # fmt: skip
    assert info["format"] == "vpc"
    assert info["virtual-size"] == 6 * MiB
    assert sha256(vhd, size) == sha256(image, size)
    assert diskio.sha256_of_range(vhd, size, 6 * MiB) is None  # padding is zeros


def test_holes_stay_holes(tmp_path):
    size = 64 * MiB
    image = write_image(tmp_path / "sparse.img", size, {32 * MiB: b"x" * 4096})
    vhd = tmp_path / "sparse.vhd"
    vhdfmt.image_to_vhd(image, vhd, size)
    assert vhd.stat().st_blocks * 512 < 4 * MiB


def test_verify_reports_a_digest_that_differs(tmp_path):
    size = 2 * MiB
    image = write_image(tmp_path / "a.img", size, {0: b"a" * 4096})
    vhd = tmp_path / "a.vhd"
    vhdfmt.image_to_vhd(image, vhd, size)
    good = cutover.verify_vhd(vhd, size, sha256(image, size))
    assert good["verified"] and good["checks"]["digest"] and good["checks"]["qemu"]
    bad = cutover.verify_vhd(vhd, size, "0" * 64)
    assert not bad["verified"] and not bad["checks"]["digest"]


def test_verify_runs_fsck_on_ext_filesystems(tmp_path):
    image = tmp_path / "fs.img"
    write_image(image, 16 * MiB, {})
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, env=_sbin_env())
    vhd = tmp_path / "fs.vhd"
    vhdfmt.image_to_vhd(image, vhd, 16 * MiB)
    result = cutover.verify_vhd(vhd, 16 * MiB, sha256(image, 16 * MiB))
    assert result["fsck"]["filesystem"] == "ext" and result["fsck"]["clean"] is True
    assert result["verified"]


def _sbin_env() -> dict[str, str]:
    return {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}


# -- the machine's manifest --------------------------------------------------------------


def test_convert_writes_a_manifest_and_is_idempotent_per_tag(tmp_path):
    size = 3 * MiB
    target = write_image(tmp_path / "t.img", size, {MiB: b"data" * 1024})
    spec = {
        "machine": "web01", "tenant": "demo", "out_dir": str(tmp_path / "out"),
        "final_tag": {"id": "web01-1"}, "vm": {"name": "web01"},
        "disks": [{"id": "web01-disk0"}], "targets": {"web01-disk0": str(target)},
        "digests": {"web01-disk0": {"size": size, "sha256": sha256(target, size)}},
    }  # fmt: skip
    first = cutover.convert(spec)
    assert first["changed"] and first["verified"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["disks"][0]["vhd"].endswith("web01-disk0.vhd")
    assert manifest["final_tag"]["id"] == "web01-1"
    mtime = (tmp_path / "out" / "web01-disk0.vhd").stat().st_mtime_ns
    second = cutover.convert(spec)
    assert not second["changed"]
    assert (tmp_path / "out" / "web01-disk0.vhd").stat().st_mtime_ns == mtime


# -- test failover clones ----------------------------------------------------------------


def fake_master_target(base: Path, disk: str, applied_seq: int, staged: dict[int, bool]) -> Path:
    """A master target state directory: a cursor and staged segments (only headers matter)."""
    state = base / "mt"
    (state / disk / "staging").mkdir(parents=True)
    cursor = {"tenant": "demo", "disk": disk, "gen": 1, "applied_seq": applied_seq,
              "last_tag": {"id": f"web01-{applied_seq}", "t0_mono_ns": applied_seq}}  # fmt: skip
    (state / disk / "cursor.json").write_text(json.dumps(cursor))
    for seq, tagged in staged.items():
        header = json.dumps({"tag": {"id": "x"} if tagged else None}).encode()
        data = b"FERRYSG1" + struct.pack(">I", len(header)) + header
        (state / disk / "staging" / f"{1:08d}-{seq:012d}.seg").write_bytes(data)
    return state


def test_clone_copies_the_target_at_its_tag(tmp_path):
    state = fake_master_target(tmp_path, "d0", 9, {10: False})
    target = write_image(tmp_path / "target.img", 2 * MiB, {0: b"t" * 512})
    result = cutover.clone_at_tag(state, "d0", target, tmp_path / "clone.img", 2 * MiB)
    assert result["tag"]["id"] == "web01-9"
    assert sha256(tmp_path / "clone.img", 2 * MiB) == sha256(target, 2 * MiB)


def _applying_group(state: Path, target: Path, release: threading.Event) -> threading.Thread:
    """Play a master target in the middle of a group: it holds apply.lock, and when released it
    writes the group's data and moves the cursor on, then lets go of the lock."""
    fd = os.open(state / "d0" / "apply.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)

    def finish() -> None:
        release.wait(10)
        with open(target, "r+b") as f:
            f.write(b"G" * 512)  # the rest of the group
        cursor = state / "d0" / "cursor.json"
        doc = json.loads(cursor.read_text())
        doc.update(applied_seq=doc["applied_seq"] + 1, last_tag={"id": "web01-next"})
        cursor.write_text(json.dumps(doc))
        os.close(fd)

    thread = threading.Thread(target=finish)
    thread.start()
    return thread


def test_clone_waits_for_the_group_in_hand_and_copies_the_tag_after_it(tmp_path):
    state = fake_master_target(tmp_path, "d0", 1, {})
    target = write_image(tmp_path / "target.img", MiB, {0: b"x" * 512})
    release = threading.Event()
    group = _applying_group(state, target, release)
    threading.Timer(0.3, release.set).start()
    result = cutover.clone_at_tag(state, "d0", target, tmp_path / "clone.img", MiB)
    group.join()
    assert result["tag"]["id"] == "web01-next" and result["applied_seq"] == 2
    assert (tmp_path / "clone.img").read_bytes()[:512] == b"G" * 512
    assert sha256(tmp_path / "clone.img", MiB) == sha256(target, MiB)
    assert (state / "d0" / "apply.lock").read_bytes() == b""  # the hold's note is gone


def test_clone_gives_up_when_one_group_takes_too_long(tmp_path):
    state = fake_master_target(tmp_path, "d0", 1, {})
    target = write_image(tmp_path / "target.img", MiB, {})
    release = threading.Event()
    group = _applying_group(state, target, release)
    try:
        with (
            pytest.raises(applylock.HoldTimeout, match="applying one group for over 0 s"),
            cutover.hold_applying(state, "d0", "test", wait=0.2),
        ):
            pass
    finally:
        release.set()
        group.join()
    assert not (tmp_path / "clone.img").exists()


def test_clone_refuses_a_disk_without_a_recovery_point_or_state(tmp_path):
    state = fake_master_target(tmp_path, "d0", 0, {})
    cursor = state / "d0" / "cursor.json"
    cursor.write_text(json.dumps({**json.loads(cursor.read_text()), "last_tag": None}))
    target = write_image(tmp_path / "target.img", MiB, {})
    with pytest.raises(cutover.CutoverError, match="no recovery point yet"):
        cutover.clone_at_tag(state, "d0", target, tmp_path / "clone.img", MiB)
    with pytest.raises(cutover.CutoverError, match="keeps no state for disk d9"):
        cutover.clone_at_tag(state, "d9", target, tmp_path / "clone.img", MiB)
    assert not (tmp_path / "clone.img").exists()


def test_test_failover_cleanup_removes_exactly_what_it_made(tmp_path):
    state = fake_master_target(tmp_path, "d0", 3, {})
    target = write_image(tmp_path / "target.img", 2 * MiB, {4096: b"z" * 4096})
    out = tmp_path / "tf" / "web01"
    out.mkdir(parents=True)
    (out / "operator-notes.txt").write_text("keep me")
    made = cutover.test_failover(state, "web01", {"d0": str(target)}, out)
    assert made["changed"] and Path(made["made"][0]).exists()
    assert vhdfmt.read_footer(made["made"][0])["current_size"] == 2 * MiB
    assert not cutover.test_failover(state, "web01", {"d0": str(target)}, out)["changed"]
    gone = cutover.test_failover_cleanup(out)
    assert sorted(Path(p).name for p in gone["removed"]) == ["d0.vhd", "test-failover.json"]
    assert sorted(p.name for p in out.iterdir()) == ["operator-notes.txt"]
    assert target.exists()
    assert not cutover.test_failover_cleanup(out)["changed"]


@pytest.mark.root
def test_devices_are_read_with_o_direct(tmp_path, monkeypatch):
    # A buffered read of a device with a mounted filesystem can return blocks
    # the filesystem has since rewritten (docs/design.md, invariant 2).
    image = write_image(tmp_path / "dev.img", 4 * MiB, {0: b"data" * 1024, 3 * MiB: b"tail"})
    disk = LoopDisk(image)
    loop = disk.device
    flags = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, f, *a: flags.append((p, f)) or real_open(p, f, *a))
    try:
        assert diskio.sha256_of(loop, 4 * MiB) == sha256(image, 4 * MiB)
        out = os.open(tmp_path / "copy.img", os.O_WRONLY | os.O_CREAT, 0o600)
        diskio.copy_sparse(loop, out, 4 * MiB)
        os.close(out)
    finally:
        release_all([disk])
    opened = [f for p, f in flags if p == loop]
    assert len(opened) == 2 and all(f & os.O_DIRECT for f in opened)
    assert sha256(tmp_path / "copy.img", 4 * MiB) == sha256(image, 4 * MiB)


def test_a_failed_test_failover_leaves_nothing_behind(tmp_path):
    state = fake_master_target(tmp_path, "d0", 3, {})
    (state / "d1").mkdir()  # a second disk with no recovery point yet
    target = write_image(tmp_path / "target.img", MiB, {})
    out = tmp_path / "tf"
    with pytest.raises(cutover.CutoverError, match="no recovery point"):
        cutover.test_failover(state, "web01", {"d0": str(target), "d1": str(target)}, out)
    assert list(out.iterdir()) == []

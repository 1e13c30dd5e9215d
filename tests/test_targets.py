"""A disk's target on the master target follows its configuration, checked before it is served:
a real loop device as a block-device target, image files in the targets directory."""

from __future__ import annotations

import os

import pytest

from ferry.errors import ConfigError, DeviceError
from ferry.settings import from_mapping
from mastertarget import targets
from mastertarget.settings import DiskSettings, Settings
from mastertarget.target import Target

MiB = 1 << 20


@pytest.mark.root
def test_a_loop_device_is_a_block_device_target_and_is_written(loopdisk, tmp_path):
    device = loopdisk(64 * MiB, fs=False).device
    taken: set[str] = set()
    entry = targets.resolve(
        {"id": "d0", "target": device, "kind": "device", "size": 64 * MiB},
        tmp_path / "targets", taken,
    )  # fmt: skip
    assert entry == {"id": "d0", "target": device, "kind": "device", "size": 64 * MiB}
    target = Target(entry["target"], entry["kind"]).open()
    try:
        assert target.is_device and target.size == 64 * MiB
        os.pwrite(target.fd, b"ferry" * 1000, 5 * MiB)
        target.sync()
    finally:
        target.close()
    with open(device, "rb") as f:
        f.seek(5 * MiB)
        assert f.read(5000) == b"ferry" * 1000
    # The same device for a second disk is refused.
    with pytest.raises(DeviceError, match="already the target of another disk"):
        targets.resolve({"id": "d1", "target": device, "kind": "device"},
                        tmp_path / "targets", taken)  # fmt: skip


@pytest.mark.root
def test_a_device_smaller_than_the_source_or_mounted_is_refused(loopdisk, tmp_path):
    small = loopdisk(32 * MiB, fs=False).device
    with pytest.raises(DeviceError) as caught:
        targets.resolve({"id": "d0", "target": small, "kind": "device",
                         "size": 64 * MiB}, tmp_path)  # fmt: skip
    assert str(caught.value) == (
        f"cannot use {small}: it holds {32 * MiB} bytes, the source disk has {64 * MiB}"
    )
    mounted = loopdisk(32 * MiB, fs=True)
    with pytest.raises(DeviceError, match=f"it is mounted at {mounted.mountpoint}"):
        targets.resolve({"id": "d0", "target": mounted.device, "kind": "device"}, tmp_path)


def test_a_missing_or_misplaced_device_is_one_clear_line(tmp_path):
    missing = "/dev/disk/azure/scsi1/lun63"
    with pytest.raises(DeviceError) as caught:
        targets.resolve({"id": "d0", "target": missing, "kind": "device"}, tmp_path)
    assert str(caught.value) == (
        f"cannot use {missing}: no such device (is the data disk attached?)"
    )
    elsewhere = tmp_path / "not-a-device"
    elsewhere.write_bytes(b"")
    with pytest.raises(DeviceError, match="a device target must be a path under /dev/"):
        targets.resolve({"id": "d0", "target": str(elsewhere), "kind": "device"}, tmp_path)
    with pytest.raises(DeviceError, match="not a block device"):
        targets.resolve({"id": "d0", "target": "/dev/null", "kind": "device"}, tmp_path)
    # A device target that vanished is never created as a file.
    with pytest.raises(DeviceError, match="No such file"):
        Target(missing, "device").open()
    assert not os.path.exists(missing)


def test_file_targets_stay_inside_the_targets_directory(tmp_path):
    root = tmp_path / "targets"
    default = targets.resolve({"id": "web01-disk0"}, root)
    assert default == {"id": "web01-disk0", "target": str(root / "web01-disk0.img"), "kind": "file"}
    nested = targets.resolve({"id": "d1", "target": str(root / "web01" / "d1.img")}, root)
    assert nested["target"] == str(root / "web01" / "d1.img") and (root / "web01").is_dir()
    with pytest.raises(ConfigError, match="outside the targets directory"):
        targets.resolve({"id": "d2", "target": str(tmp_path / "elsewhere.img")}, root)
    (root / "escape.img").symlink_to(tmp_path / "outside.img")
    with pytest.raises(ConfigError, match="outside the targets directory"):
        targets.resolve({"id": "d3", "target": str(root / "escape.img")}, root)
    with pytest.raises(ConfigError, match="target kind 'blob' is not one of device, file"):
        targets.resolve({"id": "d4", "kind": "blob"}, root)


def test_a_settings_file_names_the_kind_of_each_target(tmp_path):
    settings = Settings(tenant="demo", state_dir=tmp_path,
                        disks=[DiskSettings("d0", tmp_path / "d0.img", kind="tape")])  # fmt: skip
    assert settings.validate() == "disks[0].kind must be auto, device or file, not 'tape'"


def test_the_master_target_serves_only_the_disks_whose_target_passes(tmp_path):
    from ferry.control.credentials import Credentials
    from ferry.process import StopFlag
    from mastertarget.managed import ManagedMasterTarget

    credentials = Credentials("https://127.0.0.1:9", "demo", "mt-mt1", "c.demo.mt-mt1.x")
    daemon = ManagedMasterTarget(credentials, {"state_dir": str(tmp_path / "state")},
                                 tmp_path / "targets", StopFlag())  # fmt: skip
    lun = "/dev/disk/azure/scsi1/lun9"
    raw = {"tenant": "demo", "disks": [
        {"id": "d0", "target": lun, "kind": "device", "size": 1 << 30},
        {"id": "d1", "target": str(tmp_path / "targets" / "d1.img"), "kind": "file", "size": 1 << 20},
    ]}  # fmt: skip
    checked = daemon._checked_disks(raw)
    assert [d["id"] for d in checked["disks"]] == ["d1"]
    assert daemon.target_problems == {
        "d0": f"cannot use {lun}: no such device (is the data disk attached?)"
    }
    served = from_mapping({**checked, "state_dir": str(tmp_path)}, Settings)  # as served
    assert [(d.id, d.kind, d.size) for d in served.disks] == [("d1", "file", 1 << 20)]


def _write_and_compare(target: Target, size: int, pooled: bool = False) -> None:
    """Batches of long (O_DIRECT) and short (buffered) extents that overlap each other,
    including an unaligned tail and zeros: the target reads back exactly as written.

    ``pooled``: each payload lies in a page-aligned buffer, as the master target
    decompresses segments (long extents at aligned places in it are written from
    there, the others through the bounce buffer)."""
    from ferry.batch import DATA, ZERO, Batch
    from ferry.blockio import BufferPool

    pool = BufferPool(16 * MiB)

    expect = bytearray(size)
    rounds = [
        # a short buffered write, then a long one over it, then a short one inside that
        [(4096, 8192, DATA), (0, 1 * MiB, DATA), (512 * 1024, 4096, DATA)],
        # a long extent with an unaligned tail, zeros over part of it, a long one at the end
        [(2 * MiB, 5 * MiB + 1000, DATA), (3 * MiB, 64 * 1024, ZERO),
         (size - 2 * MiB, 2 * MiB, DATA)],
        # long extents over what the last batch wrote, one of them not 4 KiB-aligned
        [(2 * MiB + 512, 1 * MiB, DATA), (6 * MiB, 300 * 1024, DATA)],
    ]  # fmt: skip
    for seq, extents in enumerate(rounds, start=1):
        payload = bytearray()
        for offset, length, kind in extents:
            if kind == DATA:
                data = os.urandom(length)
                payload += data
                expect[offset : offset + length] = data
            else:
                expect[offset : offset + length] = bytes(length)
        held = pool.view(len(payload)) if pooled else None
        if held is not None:
            held[:] = payload
        batch = Batch(tenant="t", disk="d0", gen=1, seq=seq, disk_size=size,
                      extents=extents, payload=bytes(payload) if held is None else held)  # fmt: skip
        assert target.write_batch(batch) == sum(n for _, n, _ in extents)
        target.sync()
        # read back through the buffered descriptor, as the journal and verify do
        assert target.read(0, size) == bytes(expect), f"after batch {seq}"
    with open(target.path, "rb") as f:
        assert f.read() == bytes(expect)


@pytest.mark.parametrize("pooled", [False, True], ids=["bytes", "aligned-buffer"])
def test_long_extents_are_written_direct_and_read_back_with_the_rest(tmp_path, pooled):
    target = Target(tmp_path / "target.img", "file").open()
    try:
        assert target.direct_fd is not None, "O_DIRECT is refused on this filesystem"
        _write_and_compare(target, 16 * MiB, pooled)
        assert target.direct_fd is not None, "an O_DIRECT write was refused"
    finally:
        target.close()


def test_a_long_extent_at_an_aligned_place_is_written_without_a_copy(tmp_path):
    from ferry.batch import DATA, Batch
    from ferry.blockio import BufferPool

    data = os.urandom(2 * MiB)
    target = Target(tmp_path / "target.img", "file").open()
    try:
        payload = BufferPool(2 * MiB).view(2 * MiB)
        assert payload is not None
        payload[:] = data
        batch = Batch(tenant="t", disk="d0", gen=1, seq=1, disk_size=8 * MiB,
                      extents=[(4 * MiB, 2 * MiB, DATA)], payload=payload)  # fmt: skip
        target.write_batch(batch)
        assert target._bounce is None, "the extent was copied into the bounce buffer"
        target.sync()
        assert target.read(4 * MiB, 2 * MiB) == data
        other = os.urandom(2 * MiB)
        batch.seq, batch.payload = 2, other  # bytes: not at an address O_DIRECT takes
        target.write_batch(batch)
        assert target._bounce is not None
        target.sync()
        assert target.read(4 * MiB, 2 * MiB) == other
    finally:
        target.close()


@pytest.mark.root
def test_a_device_target_takes_long_extents_direct(loopdisk):
    device = loopdisk(16 * MiB, fs=False).device
    target = Target(device, "device").open()
    try:
        assert target.direct_fd is not None
        _write_and_compare(target, 16 * MiB)
    finally:
        target.close()

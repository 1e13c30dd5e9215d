"""Resuming replication after a cutover that was not committed: the master target's side."""

from __future__ import annotations

import fcntl
import json
import os

import pytest

from ferry import fence as fences
from mastertarget import cursor as cursors
from mastertarget import cutover, layout

FINAL = {"id": "1-42", "kind": "crash", "final": True, "t0_mono_ns": 42}


def fenced_disk(state_dir, storage, tenant: str, disk: str) -> None:
    """A disk as a cutover leaves it: the cursor fenced at the final tag, the fence record stored."""
    layout.disk_dir(state_dir, disk).mkdir(parents=True)
    cursors.save(layout.cursor_path(state_dir, disk), cursors.Cursor(
        tenant, disk, gen=1, applied_seq=42, last_tag=FINAL,
        fenced={"tag": FINAL, "reason": "final tag (cutover)", "at": 1.0},
    ))  # fmt: skip
    fences.write(storage, tenant, disk, FINAL)


def test_resume_lifts_the_fence_and_says_what_happened(storage, tenant, tmp_path):
    state, out = tmp_path / "mt", tmp_path / "cutover" / "web01"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({
        "machine": "web01", "final_tag": FINAL, "complete": False,
        "reason": "boot check failed: the guest stopped in emergency mode"}))  # fmt: skip
    fenced_disk(state, storage, tenant, "web01-disk0")
    done = cutover.resume(state, storage, tenant, ["web01-disk0"], out)
    assert done["changed"] and done["final_tag"] == "1-42"
    assert done["disks"] == [{"disk": "web01-disk0", "changed": True, "was_fenced_at": "1-42",
                              "fence_reason": "final tag (cutover)"}]  # fmt: skip
    cursor = cursors.load(layout.cursor_path(state, "web01-disk0"), tenant, "web01-disk0")
    assert cursor.fenced is None and cursor.resumed["tag"] == "1-42"
    assert (cursor.gen, cursor.applied_seq, cursor.last_tag) == (1, 42, FINAL)  # the history stays
    assert fences.read(storage, tenant, "web01-disk0") is None
    record = json.loads((out / cutover.RESUMED_RECORD).read_text())["resumed"]
    assert record[0]["cutover_reason"] == "boot check failed: the guest stopped in emergency mode"
    # Asked again: nothing left to change, and the record says so.
    again = cutover.resume(state, storage, tenant, ["web01-disk0"], out)
    assert not again["changed"] and again["disks"][0]["changed"] is False


def test_a_committed_cutover_or_a_served_disk_is_never_resumed(storage, tenant, tmp_path):
    state, out = tmp_path / "mt", tmp_path / "cutover"
    out.mkdir()
    fenced_disk(state, storage, tenant, "web01-disk0")
    (out / "manifest.json").write_text(json.dumps({"machine": "web01", "final_tag": FINAL,
                                                   "complete": True}))  # fmt: skip
    with pytest.raises(cutover.CutoverError) as caught:
        cutover.resume(state, storage, tenant, ["web01-disk0"], out)
    assert str(caught.value) == ("cutover: web01 was cut over at tag 1-42: a committed cutover is "
                                 "not resumed; protect the machine afresh to replicate it again")  # fmt: skip
    assert fences.read(storage, tenant, "web01-disk0") is not None  # untouched
    # A disk some process serves (its state lock held) is not changed under it.
    fd = os.open(layout.state_lock_path(state, "web01-disk0"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(cutover.CutoverError, match="being served by a master target"):
            cutover.resume(state, storage, tenant, ["web01-disk0"], None)
    finally:
        os.close(fd)
    cursor = cursors.load(layout.cursor_path(state, "web01-disk0"), tenant, "web01-disk0")
    assert cursor.fenced is not None


def test_the_command_line_prints_the_record(storage, tenant, tmp_path, azurite, capsys):
    state = tmp_path / "mt"
    fenced_disk(state, storage, tenant, "d0")
    os.environ["FERRY_TEST_RESUME_STORAGE"] = azurite.connection_string
    try:
        code = cutover.main(["resume", "--state-dir", str(state), "--tenant", tenant,
                             "--disk", "d0", "--storage-env", "FERRY_TEST_RESUME_STORAGE"])  # fmt: skip
    finally:
        del os.environ["FERRY_TEST_RESUME_STORAGE"]
    assert code == 0
    assert json.loads(capsys.readouterr().out)["disks"][0]["was_fenced_at"] == "1-42"

"""Boot mode from a disk's partition table (Azure generation 1 or 2), on tables sfdisk writes."""

from __future__ import annotations

import json

import pytest
from support.disks import GPT_BIOS_BOOT, GPT_ESP, GPT_LINUX, UEFI_TABLE, partitioned

from ferry import vhd as vhdfmt
from mastertarget import bootmode, cutover

MiB = 1 << 20
ESP, BIOS_BOOT, LINUX = GPT_ESP, GPT_BIOS_BOOT, GPT_LINUX


TABLES = {
    "mbr-grub": ("label: dos\ntype=83, bootable\n", "mbr", "bios", "V1"),
    "mbr-efi": ("label: dos\nsize=16MiB, type=ef\ntype=83\n", "mbr", "uefi", "V2"),
    "gpt-esp": (UEFI_TABLE, "gpt", "uefi", "V2"),
    "gpt-bios-grub": (f"label: gpt\nsize=1MiB, type={BIOS_BOOT}\ntype={LINUX}\n", "gpt", "bios",
                      "V1"),
    "gpt-hybrid": (f"label: gpt\nsize=1MiB, type={BIOS_BOOT}\nsize=16MiB, type={ESP}\n"
                   f"type={LINUX}\n", "gpt", "hybrid", "V1"),
    "gpt-data": (f"label: gpt\ntype={LINUX}\n", "gpt", "unknown", "V1"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TABLES))
def test_the_partition_table_says_how_the_disk_boots(tmp_path, name):
    script, table, mode, generation = TABLES[name]
    disk = partitioned(tmp_path / f"{name}.img", script)
    found = bootmode.detect(disk)
    assert (found["table"], found["boot_mode"], found["hyper_v_generation"]) == (
        table, mode, generation
    )  # fmt: skip
    assert ("warning" in found) == (mode == "unknown")
    # The cutover reads its fixed VHD, which must say the same.
    vhd = tmp_path / f"{name}.vhd"
    vhdfmt.image_to_vhd(disk, vhd, disk.stat().st_size)
    assert bootmode.detect(vhd) == found | ({"warning": found["warning"].replace(
        str(disk), str(vhd))} if "warning" in found else {})  # fmt: skip


def test_a_disk_without_a_partition_table_is_unknown_and_assumed_bios(tmp_path):
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(MiB))
    found = bootmode.detect(blank)
    assert found["table"] is None and found["hyper_v_generation"] == "V1"
    assert "assuming BIOS (V1)" in found["warning"]


def test_the_guest_settles_only_a_hybrid_disk(tmp_path):
    hybrid = bootmode.detect(partitioned(tmp_path / "h.img", TABLES["gpt-hybrid"][0]))
    assert bootmode.generation(hybrid, "uefi") == "V2"
    assert bootmode.generation(hybrid, "bios") == "V1"
    bios = bootmode.detect(partitioned(tmp_path / "b.img", TABLES["mbr-grub"][0]))
    assert bootmode.generation(bios, "uefi") == "V1"  # the table wins: no ESP to boot from


def test_the_manifest_names_the_generation_of_the_os_disk(tmp_path):
    os_disk = partitioned(tmp_path / "os.img", TABLES["gpt-esp"][0])
    data = partitioned(tmp_path / "data.img", TABLES["mbr-grub"][0])
    spec = {
        "machine": "uefi01", "tenant": "demo", "out_dir": str(tmp_path / "out"),
        "final_tag": {"id": "t1"}, "vm": {"name": "uefi01"},
        "disks": [{"id": "uefi01-os"}, {"id": "uefi01-data"}],
        "targets": {"uefi01-os": str(os_disk), "uefi01-data": str(data)},
    }  # fmt: skip
    manifest = cutover.convert(spec)
    assert manifest["complete"] and manifest["vm"]["hyper_v_generation"] == "V2"
    assert manifest["vm"]["boot"]["boot_mode"] == "uefi"
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["vm"]["hyper_v_generation"] == "V2"

"""How a disk boots, read from its partition table: BIOS (Azure generation 1) or UEFI (generation 2).

Azure boots a VM's OS disk either with a BIOS (``hyperVGeneration: V1``) or
with UEFI (``V2``); a disk that boots one way does not boot the other.  The
partition table says which way the source booted:

| table | partitions | boot mode | generation |
|---|---|---|---|
| MBR (no protective 0xEE entry) | an EFI system partition (type 0xEF) | uefi | V2 |
| MBR | anything else | bios | V1 |
| GPT | an EFI system partition, no BIOS boot partition | uefi | V2 |
| GPT | a BIOS boot partition (GRUB's core image), no ESP | bios | V1 |
| GPT | both (a hybrid image, as many cloud images are) | hybrid | V1, or V2 when the guest mounts its ESP |
| GPT | neither | unknown | V1 (with a warning) |

A hybrid disk boots either way; the guest's own fstab (``/boot/efi``
mounted, as adaptation finds it) tells which way it ran, and without it
generation 1 is the choice that needs nothing from the ESP.  The two tables
are read here with ``struct`` (a few fixed fields of the MBR and of the GPT
header and entries, per the UEFI specification, chapter 5): no partition
library on PyPI is maintained for this, and the host's kernel has no
partition parsers (docs: PLATFORM) so ``blkid`` on partitions cannot help.

    python -m mastertarget.bootmode disk.vhd     # {"table", "boot_mode", "hyper_v_generation", ...}
"""

from __future__ import annotations

import json
import struct
import sys
import uuid
from pathlib import Path
from typing import Any

SECTOR = 512
MBR_SIGNATURE = b"\x55\xaa"
MBR_PROTECTIVE = 0xEE
MBR_EFI = 0xEF
GPT_SIGNATURE = b"EFI PART"
ESP_GUID = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
BIOS_BOOT_GUID = uuid.UUID("21686148-6449-6e6f-744e-656564454649")
MAX_ENTRIES = 1024
"""More GPT entries than any real table has (128 is the usual count): a bound on what is read."""

GENERATION = {"uefi": "V2", "bios": "V1", "hybrid": "V1", "unknown": "V1"}


def _read(f: Any, offset: int, length: int) -> bytes:
    f.seek(offset)
    return f.read(length)


def mbr_types(sector0: bytes) -> list[int] | None:
    """The type bytes of the four primary MBR entries in use; None without an MBR signature."""
    if len(sector0) < SECTOR or sector0[510:512] != MBR_SIGNATURE:
        return None
    types = [sector0[446 + 16 * i + 4] for i in range(4)]
    return [t for t in types if t]


def gpt_types(f: Any, sector_size: int = SECTOR) -> list[uuid.UUID] | None:
    """The type GUIDs of the GPT's entries in use; None if there is no valid GPT header."""
    header = _read(f, sector_size, 92)
    if len(header) < 92 or header[:8] != GPT_SIGNATURE:
        return None
    entries_lba, count, size = struct.unpack_from("<QII", header, 72)
    if not (128 <= size <= 4096) or count > MAX_ENTRIES:
        return None
    table = _read(f, entries_lba * sector_size, count * size)
    types = []
    for i in range(len(table) // size):
        raw = table[i * size : i * size + 16]
        if raw != bytes(16):
            types.append(uuid.UUID(bytes_le=raw))
    return types


def detect(path: str | Path) -> dict[str, Any]:
    """The boot mode of the disk (or fixed VHD) at ``path`` and the generation Azure needs."""
    with open(path, "rb") as f:
        mbr = mbr_types(_read(f, 0, SECTOR))
        protective = mbr is not None and MBR_PROTECTIVE in mbr
        # The GPT header is in the second logical block: 512 bytes, or 4096 on a 4Kn disk.
        gpt = (gpt_types(f) or gpt_types(f, 4096)) if protective else None
    if mbr is None:
        table, mode = None, "unknown"
    elif gpt is None:
        table, mode = "mbr", "uefi" if MBR_EFI in mbr else "bios"
    else:
        table = "gpt"
        esp, bios = ESP_GUID in gpt, BIOS_BOOT_GUID in gpt
        mode = {(True, False): "uefi", (False, True): "bios", (True, True): "hybrid"}.get(
            (esp, bios), "unknown"
        )
    result: dict[str, Any] = {"table": table, "boot_mode": mode,
                              "hyper_v_generation": GENERATION[mode]}  # fmt: skip
    if mode == "unknown":
        result["warning"] = (
            f"{path}: no partition table says how it boots (no MBR signature, or a GPT with "
            "neither an EFI system partition nor a BIOS boot partition); assuming BIOS (V1)"
        )
    return result


def generation(disk: dict[str, Any], guest_mode: str | None) -> str:
    """The generation for a disk read by :func:`detect`, given the guest's own view if known.

    ``guest_mode`` is adaptation's ``boot_mode`` (``uefi`` when the guest
    mounts an ESP): it settles a hybrid disk, and only a hybrid one.
    """
    if disk["boot_mode"] == "hybrid" and guest_mode == "uefi":
        return "V2"
    return str(disk["hyper_v_generation"])


def main(argv: list[str] | None = None) -> int:
    """``python -m mastertarget.bootmode DISK``: one JSON object."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mastertarget.bootmode DISK", file=sys.stderr)
        return 2
    print(json.dumps(detect(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

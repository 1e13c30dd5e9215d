"""Upload a fixed VHD to a page blob through a SAS: how an Azure managed disk is filled.

Azure's direct upload to a managed disk (``create_option: upload``, then a
write SAS from grant-access) and a page blob behind a SAS take the same
writes: the blob is created at the VHD's full size (data plus footer, a
multiple of 512) and written with Put Page, at most 4 MiB each.  A page
blob reads zeros where nothing was written, so holes and all-zero ranges of
the VHD are skipped; the footer, the last 512 bytes, is always written::

    python -m mastertarget.upload --vhd web01-disk0.vhd --sas-url 'https://…/disk.vhd?sv=…'

The SAS URL is read from ``--sas-url-env`` (an environment variable) when
given, so it stays out of process listings.  Azurite implements page blobs
but not the 4 MiB limit: Ferry enforces it itself.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ferry.errors import Exit, FerryError, UsageError
from ferry.vhd import FOOTER_SIZE, SECTOR, read_footer

PUT_PAGE_MAX = 4 << 20
"""Largest Put Page Azure accepts, in bytes."""


class UploadError(FerryError):
    """upload: {detail}"""

    exit_code = Exit.CUTOVER


def data_ranges(fd: int, size: int, chunk: int):
    """``(offset, length)`` of each chunk of ``fd`` below ``size`` that may hold data (not a hole)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            start = offset  # no SEEK_DATA here: read everything
        if start >= size:
            return
        start -= start % SECTOR
        try:
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError:
            end = size
        end += -end % SECTOR
        for at in range(start, end, chunk):
            yield at, min(chunk, end - at)
        offset = end


def upload_vhd(vhd: str | Path, sas_url: str, chunk: int = PUT_PAGE_MAX) -> dict[str, Any]:
    """Create the page blob at ``sas_url`` and write the VHD into it; what was written."""
    from azure.core.exceptions import AzureError
    from azure.storage.blob import BlobClient

    if chunk > PUT_PAGE_MAX or chunk % SECTOR:
        raise UsageError(detail=f"a Put Page is a multiple of 512 bytes up to 4 MiB, not {chunk}")
    footer = read_footer(vhd)  # a fixed VHD, a whole number of MiB, or VhdInvalid
    size = footer["file_size"]
    blob = BlobClient.from_blob_url(sas_url)
    started, puts, written = time.monotonic(), 0, 0
    try:
        blob.create_page_blob(size)
        with open(vhd, "rb") as f:
            for offset, length in data_ranges(f.fileno(), size - FOOTER_SIZE, chunk):
                data = os.pread(f.fileno(), length, offset)
                if data.count(0) == len(data):
                    continue
                blob.upload_page(data, offset=offset, length=length)
                puts, written = puts + 1, written + length
            blob.upload_page(os.pread(f.fileno(), FOOTER_SIZE, size - FOOTER_SIZE),
                             offset=size - FOOTER_SIZE, length=FOOTER_SIZE)  # fmt: skip
    except AzureError as exc:
        raise UploadError(detail=f"{vhd} to {blob.url.split('?')[0]}: {exc}".splitlines()[0])
    return {
        "vhd": str(vhd), "blob": blob.url.split("?")[0], "size": size,
        "puts": puts + 1, "bytes_written": written + FOOTER_SIZE,
        "seconds": round(time.monotonic() - started, 1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mastertarget.upload``: what was written, as JSON."""
    from ferry.process import run_main

    parser = argparse.ArgumentParser(
        prog="python -m mastertarget.upload", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--vhd", required=True)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--sas-url", help="the page blob's URL with a write SAS")
    where.add_argument("--sas-url-env", help="environment variable holding that URL")
    args = parser.parse_args(argv)

    def body() -> int:
        url = args.sas_url or os.environ.get(args.sas_url_env, "")
        if not url:
            raise UsageError(detail=f"environment variable {args.sas_url_env} is not set")
        print(json.dumps(upload_vhd(args.vhd, url)))
        return 0

    return run_main("upload", body)


if __name__ == "__main__":
    sys.exit(main())

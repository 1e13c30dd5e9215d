"""Upload a fixed VHD to a page blob through a SAS: how an Azure managed disk is filled.

Azure's direct upload to a managed disk (``create_option: upload``, then a
write SAS from grant-access) and a page blob behind a SAS take the same
writes: the blob is created at the VHD's full size (data plus footer, a
multiple of 512) and written with Put Page, at most 4 MiB each.  A page
blob reads zeros where nothing was written, so holes and all-zero ranges of
the VHD are skipped; the footer, the last 512 bytes, is always written::

    python -m mastertarget.upload --vhd web01-disk0.vhd --sas-url 'https://…/disk.vhd?sv=…'

The SAS URL is read from ``--sas-url-env`` (an environment variable) when
given, so it stays out of process listings; with ``--connection-string-env``
(and ``--container``, ``--blob``) a write SAS for that one blob, valid for
6 hours, is made from the account key first (the cutover's Azure provider).  Azurite implements page blobs
but not the 4 MiB limit: Ferry enforces it itself.
"""

from __future__ import annotations

import argparse
import datetime
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


SAS_LIFETIME = 6 * 3600
"""Seconds a write SAS made for one upload stays valid: long enough for a large disk."""


def blob_sas_url(connection_string: str, container: str, name: str) -> str:
    """A short-lived read/create/write SAS URL for one blob, made with the account's key.

    The container is created if it does not exist.  This is what the cutover's
    Azure provider gives the upload: the VHD travels through a SAS scoped to
    its one blob, as through a managed disk's grant-access SAS.
    """
    from azure.core.exceptions import AzureError, ResourceExistsError
    from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas

    fields = dict(p.split("=", 1) for p in connection_string.split(";") if "=" in p)
    if not fields.get("AccountName") or not fields.get("AccountKey"):
        raise UsageError(detail="the connection string names no AccountName and AccountKey")
    service = BlobServiceClient.from_connection_string(connection_string)
    try:
        service.create_container(container)
    except ResourceExistsError:
        pass
    except AzureError as exc:
        raise UploadError(detail=f"cannot create container {container}: {exc}".splitlines()[0])
    sas = generate_blob_sas(
        fields["AccountName"], container, name, account_key=fields["AccountKey"],
        permission=BlobSasPermissions(read=True, create=True, write=True),
        expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=SAS_LIFETIME),
    )  # fmt: skip
    return f"{service.get_blob_client(container, name).url}?{sas}"


def _url(args: argparse.Namespace) -> str:
    """The page blob's SAS URL the command line names, one way or another."""
    if args.sas_url:
        return str(args.sas_url)
    env = args.sas_url_env or args.connection_string_env
    value = os.environ.get(env, "").strip()
    if not value:
        raise UsageError(detail=f"environment variable {env} is not set")
    if args.sas_url_env:
        return value
    if not args.container:
        raise UsageError(detail="--connection-string-env needs --container")
    return blob_sas_url(value, args.container, args.blob or Path(args.vhd).name)


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
    where.add_argument(
        "--connection-string-env",
        help="environment variable holding the storage account's connection string: a write "
        "SAS for --container/--blob is made from it",
    )
    parser.add_argument("--container", help="with --connection-string-env")
    parser.add_argument("--blob", help="with --connection-string-env (default: the VHD's name)")
    args = parser.parse_args(argv)

    def body() -> int:
        print(json.dumps(upload_vhd(args.vhd, _url(args))))
        return 0

    return run_main("upload", body)


if __name__ == "__main__":
    sys.exit(main())

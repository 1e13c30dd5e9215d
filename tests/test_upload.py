"""A fixed VHD uploaded to a page blob through a SAS (Azurite), as a managed disk is filled."""

from __future__ import annotations

import datetime
import os
import uuid

import pytest
from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas

from ferry import vhd as vhdfmt
from mastertarget import upload

MiB = 1 << 20


def blob_sas_url(connection_string: str, container: str, name: str) -> str:
    fields = dict(part.split("=", 1) for part in connection_string.split(";") if "=" in part)
    service = BlobServiceClient.from_connection_string(connection_string)
    service.create_container(container)
    sas = generate_blob_sas(
        fields["AccountName"], container, name, account_key=fields["AccountKey"],
        permission=BlobSasPermissions(read=True, create=True, write=True),
        expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1),
    )  # fmt: skip
    return f"{service.get_blob_client(container, name).url}?{sas}"


def test_a_vhd_lands_in_a_page_blob_byte_for_byte_skipping_zeros(azurite, tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(13 * MiB)
        f.write(os.urandom(9 * MiB))  # spans more than two Put Pages of 4 MiB
        f.seek(12 * MiB + 4096)
        f.write(b"tail" * 1024)
    vhd = tmp_path / "disk.vhd"
    vhdfmt.image_to_vhd(image, vhd, 13 * MiB)
    url = blob_sas_url(azurite.connection_string, "u" + uuid.uuid4().hex[:12], "disk.vhd")
    done = upload.upload_vhd(vhd, url)
    assert done["size"] == 13 * MiB + 512
    assert done["puts"] == 5  # 4 + 4 + 1 MiB of data, the MiB with the tail, the footer
    from azure.storage.blob import BlobClient

    blob = BlobClient.from_blob_url(url)
    assert blob.get_blob_properties().blob_type == "PageBlob"
    assert blob.download_blob().readall() == vhd.read_bytes()
    written = [(r.start, r.end) for r in blob.list_page_ranges()]
    assert all(end < 9 * MiB or start >= 12 * MiB for start, end in written)  # zeros not sent
    assert vhdfmt.parse_footer(blob.download_blob(offset=13 * MiB, length=512).readall())


def test_puts_over_4_mib_and_files_that_are_not_vhds_are_refused(azurite, tmp_path):
    with pytest.raises(Exception, match="up to 4 MiB"):
        upload.upload_vhd(tmp_path / "x.vhd", "http://127.0.0.1:1/c/b", chunk=8 * MiB)
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * 2 * MiB)
    with pytest.raises(vhdfmt.VhdInvalid, match="cookie"):
        upload.upload_vhd(raw, "http://127.0.0.1:1/c/b")

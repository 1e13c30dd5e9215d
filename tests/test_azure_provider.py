"""The cutover's Azure provider up to the ARM call: VHDs uploaded through a SAS (Azurite page
blobs, for real), then the deployment's parameters checked against the ARM template's shape."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient
from support.disks import UEFI_TABLE, partitioned

from ferry.errors import UsageError
from mastertarget import azuredeploy, cutover

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "roles" / "cutover" / "files" / "vm-from-vhds.arm.json"
MiB = 1 << 20
ARM_TYPES = {"string": str, "array": list, "object": dict, "int": int, "bool": bool}


def committed_cutover(tmp_path: Path) -> dict:
    """A committed cutover of a UEFI machine with two disks (no guest: no adaptation, no boot)."""
    os_disk = partitioned(tmp_path / "os.img", UEFI_TABLE, 24 * MiB)
    with open(os_disk, "r+b") as f:  # some data in the root partition
        f.seek(20 * MiB)
        f.write(os.urandom(MiB))
    data = tmp_path / "data.img"
    data.write_bytes(os.urandom(3 * MiB) + bytes(2 * MiB))
    spec = {
        "machine": "web01", "tenant": "demo", "out_dir": str(tmp_path / "cutover"),
        "final_tag": {"id": "t9"}, "vm": {"name": "web01"}, "provider": "azure",
        "disks": [{"id": "web01-disk0"}, {"id": "web01-disk1"}],
        "targets": {"web01-disk0": str(os_disk), "web01-disk1": str(data)},
    }  # fmt: skip
    manifest = cutover.convert(spec)
    assert manifest["complete"] and manifest["provider"] == "azure"
    return manifest


def upload_all(manifest: dict, connection_string: str, container: str) -> list[dict]:
    """``python -m mastertarget.upload`` as the role runs it: a SAS made from the account key."""
    env = {**os.environ, "FERRY_UPLOAD_STORAGE": connection_string}
    done = []
    for disk in manifest["disks"]:
        out = subprocess.run(
            [sys.executable, "-m", "mastertarget.upload", "--vhd", disk["vhd"],
             "--connection-string-env", "FERRY_UPLOAD_STORAGE", "--container", container,
             "--blob", f"web01/{Path(disk['vhd']).name}"],
            env=env, capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        done.append(json.loads(out.stdout))
    return done


def referenced(template: dict) -> set[str]:
    """Names of the parameters the template's expressions use."""
    return set(re.findall(r"parameters\('([A-Za-z0-9_]+)'\)", json.dumps(template)))


def check_against_template(template: dict, given: dict) -> None:
    """What ARM itself checks of the parameters before it deploys anything."""
    declared = template["parameters"]
    assert set(given) <= set(declared), set(given) - set(declared)
    missing = [n for n, p in declared.items() if "defaultValue" not in p and n not in given]
    assert not missing, missing
    for name, wrapped in given.items():
        assert set(wrapped) == {"value"}, name
        value, spec = wrapped["value"], declared[name]
        assert isinstance(value, ARM_TYPES[spec["type"]]), (name, value)
        if "allowedValues" in spec:
            assert value in spec["allowedValues"], (name, value)
        for bound, check in (("minLength", lambda v, n: len(v) >= n),
                             ("maxLength", lambda v, n: len(v) <= n)):  # fmt: skip
            if bound in spec:
                assert check(value, spec[bound]), (name, bound)


def test_the_template_uses_only_parameters_it_declares():
    template = json.loads(TEMPLATE.read_text())
    assert referenced(template) == set(template["parameters"])
    disk = next(r for r in template["resources"] if r["type"] == "Microsoft.Compute/disks")
    assert disk["properties"]["creationData"]["createOption"] == "Import"
    assert "hyperVGeneration" in disk["properties"]


def test_a_committed_cutover_is_uploaded_and_becomes_the_deployments_parameters(azurite, tmp_path):
    manifest = committed_cutover(tmp_path)
    container = "c" + uuid.uuid4().hex[:12]
    uploads = upload_all(manifest, azurite.connection_string, container)
    # The page blobs are the VHDs, byte for byte: what Azure imports as managed disks.
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    for disk, done in zip(manifest["disks"], uploads, strict=True):
        blob = service.get_blob_client(container, f"web01/{Path(disk['vhd']).name}")
        assert blob.get_blob_properties().blob_type == "PageBlob"
        assert blob.download_blob().readall() == Path(disk["vhd"]).read_bytes()
        assert "sig=" not in done["blob"]  # no SAS in what is recorded
    account = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/st"
    subnet = (
        "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v/subnets/s"
    )
    given = azuredeploy.parameters(manifest, uploads, "Standard_D2s_v5", subnet, account)
    check_against_template(json.loads(TEMPLATE.read_text()), given)
    assert given["hyperVGeneration"]["value"] == "V2"  # the OS disk's GPT has an ESP
    assert [d["name"] for d in given["disks"]["value"]] == [
        "web01-web01-disk0",
        "web01-web01-disk1",
    ]
    assert [d["sourceUri"] for d in given["disks"]["value"]] == [u["blob"] for u in uploads]
    # The role's command line gives the same.
    manifest_path = tmp_path / "cutover" / "manifest.json"
    out = subprocess.run(
        [sys.executable, "-m", "mastertarget.azuredeploy", "parameters", "--manifest",
         str(manifest_path), "--uploads-json", json.dumps(uploads), "--vm-size",
         "Standard_D2s_v5", "--subnet-id", subnet, "--storage-account-id", account,
         "--names-json", json.dumps({"web01-disk0": "disk-web01-os"})],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    named = json.loads(out.stdout)
    check_against_template(json.loads(TEMPLATE.read_text()), named)
    assert named["disks"]["value"][0]["name"] == "disk-web01-os"


def test_no_vm_is_made_from_an_uncommitted_cutover_or_a_missing_upload(tmp_path):
    manifest = committed_cutover(tmp_path)
    with pytest.raises(UsageError, match="was not uploaded"):
        azuredeploy.parameters(manifest, [], "Standard_D2s_v5", "s", "a")
    failed = manifest | {"complete": False, "reason": "boot check failed: kernel panicked"}
    with pytest.raises(UsageError, match="not complete .boot check failed"):
        azuredeploy.parameters(failed, [], "Standard_D2s_v5", "s", "a")
    with pytest.raises(UsageError, match="not a valid managed disk name"):
        azuredeploy.disk_name("web01", "d0", {"d0": "bad name!"})

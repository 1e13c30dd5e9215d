"""The cutover's Azure provider, up to the one call it cannot make here: the ARM deployment.

After a committed cutover (VHDs verified, adapted, boot-checked:
mastertarget/cutover.py), each VHD is uploaded to a page blob through a SAS
(mastertarget/upload.py); then one ARM deployment of
``roles/cutover/files/vm-from-vhds.arm.json`` imports each blob as a managed
disk (the OS disk with the ``hyperVGeneration`` its partition table calls
for, mastertarget/bootmode.py) and creates the VM with them attached.  This
module builds that deployment's parameters from the manifest and the
uploads, so everything before the call is plain data that the tests check
against the template; the role hands them to ``azure_rm_deployment``::

    python -m mastertarget.azuredeploy parameters --manifest manifest.json \\
        --uploads-json '[{...}, ...]' --vm-size Standard_D2s_v5 --subnet-id /subscriptions/... \\
        --storage-account-id /subscriptions/.../storageAccounts/ferrycutover

Nothing secret goes into the parameters: ``sourceUri`` is the blob's URL
without its SAS (ARM reads the blob with the storage account's own access,
``storageAccountId``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from ferry.errors import UsageError

DISK_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,78}[A-Za-z0-9_]$")
"""Azure's rule for a managed disk's name: 1-80 letters, digits, _ . -, not ending in . or -."""


def disk_name(vm_name: str, disk_id: str, names: dict[str, str] | None = None) -> str:
    """The managed disk made from ``disk_id``'s VHD: as named by the operator, else ``<vm>-<disk>``."""
    name = (names or {}).get(disk_id) or f"{vm_name}-{disk_id}"
    if not DISK_NAME_RE.match(name):
        raise UsageError(detail=f"{name!r} is not a valid managed disk name (1-80 letters, "
                         "digits, _ . -, not ending in . or -)")  # fmt: skip
    return name


def parameters(
    manifest: dict[str, Any],
    uploads: list[dict[str, Any]],
    vm_size: str,
    subnet_id: str,
    storage_account_id: str,
    disk_sku: str = "Premium_LRS",
    names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The deployment parameters (``{name: {"value": ...}}``) for a committed cutover.

    ``uploads`` are :func:`mastertarget.upload.upload_vhd` results, one per
    VHD of the manifest.  A manifest that is not complete is refused: only a
    committed cutover becomes a VM.
    """
    if not manifest.get("complete"):
        raise UsageError(detail=f"the cutover of {manifest.get('machine')} is not complete "
                         f"({manifest.get('reason')}): no VM is made from it")  # fmt: skip
    by_vhd = {Path(u["vhd"]).name: u for u in uploads}
    vm = manifest.get("vm") or {}
    vm_name = vm.get("name") or manifest["machine"]
    disks = []
    for disk in manifest["disks"]:  # in LUN order, the OS disk first
        upload = by_vhd.get(Path(disk["vhd"]).name)
        if upload is None:
            raise UsageError(detail=f"{disk['vhd']} was not uploaded")
        if upload["size"] != disk["vhd_file_size"]:
            raise UsageError(detail=f"{upload['blob']} holds {upload['size']} bytes, "
                             f"{disk['vhd']} {disk['vhd_file_size']}")  # fmt: skip
        disks.append({"name": disk_name(vm_name, disk["id"], names),
                      "sourceUri": upload["blob"].split("?")[0]})  # fmt: skip
    values = {
        "vmName": vm_name, "vmSize": vm_size, "subnetId": subnet_id,
        "hyperVGeneration": vm.get("hyper_v_generation") or "V1",
        "storageAccountId": storage_account_id, "diskSku": disk_sku, "disks": disks,
    }  # fmt: skip
    return {name: {"value": value} for name, value in values.items()}


def main(argv: list[str] | None = None) -> int:
    """``python -m mastertarget.azuredeploy parameters ...``: the parameters as JSON."""
    from ferry.process import run_main

    parser = argparse.ArgumentParser(
        prog="python -m mastertarget.azuredeploy", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parameters", help="the ARM deployment's parameters for a cutover")
    p.add_argument("--manifest", required=True)
    p.add_argument("--uploads-json", required=True, help="the uploads' results, a JSON array")
    p.add_argument("--vm-size", required=True)
    p.add_argument("--subnet-id", required=True)
    p.add_argument("--storage-account-id", required=True)
    p.add_argument("--disk-sku", default="Premium_LRS")
    p.add_argument("--names-json", default="{}", help='{"disk id": "managed disk name"}')
    args = parser.parse_args(argv)

    def body() -> int:
        manifest = json.loads(Path(args.manifest).read_text())
        result = parameters(manifest, json.loads(args.uploads_json), args.vm_size,
                            args.subnet_id, args.storage_account_id, args.disk_sku,
                            json.loads(args.names_json))  # fmt: skip
        print(json.dumps(result))
        return 0

    return run_main("azuredeploy", body)


if __name__ == "__main__":
    sys.exit(main())

"""Guest adaptation: make a machine's cut-over disks ready to boot in Azure.

Runs on the master target's host, on the fixed VHDs a cutover or test
failover made (never on the source, never on the replicas)::

    python -m mastertarget.adapt --disk web01-disk0.vhd --disk web01-disk1.vhd \\
        [--dry-run] --report adapt.json

The disks are opened together in one libguestfs appliance
(mastertarget/guestfs.py), the operating system is found by inspection and
its filesystems mounted as its fstab has them (partitions, LVM, XFS).  Each
step below looks, decides and (unless ``--dry-run``) changes; every change
it makes or would make is one entry of the report:

- ``fstab``: entries naming a device path become ``UUID=``; entries whose
  UUID or label no disk holds are reported (the machine would not boot).
- ``agent``: the Ferry mobility agent, its units and its state are removed.
- ``network``: DHCP on the first NIC (eth0) for ifupdown, systemd-networkd
  or netplan, whichever the guest uses; other configurations are set aside
  (``*.ferry-orig``), and MAC-pinned udev names removed.
- ``grub``: the kernel command line gains ``console=ttyS0,115200`` and
  ``net.ifnames=0``, root by UUID; grub.cfg is regenerated inside the guest.
- ``initramfs``: hv_vmbus, hv_storvsc, hv_netvsc are listed for the
  initramfs (initramfs-tools or dracut), which is rebuilt inside the guest.
- ``azure-agent``: walinuxagent (or waagent) and cloud-init are enabled
  where installed.

Running it twice changes nothing the second time.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mastertarget import defaults
from mastertarget.guestfs import Guestfish, GuestfsError, inspect_and_mount

Change = dict[str, Any]


def change(step: str, path: str, detail: str, done: bool) -> Change:
    return {"step": step, "path": path, "detail": detail, "done": done}


class Adapter:
    """The steps of one adaptation, sharing the appliance and what was learnt."""

    def __init__(self, g: Guestfish, facts: dict[str, Any], dry_run: bool) -> None:
        self.g, self.facts, self.dry_run = g, facts, dry_run
        self.changes: list[Change] = []
        self.warnings: list[str] = []

    def note(self, step: str, path: str, detail: str) -> None:
        self.changes.append(change(step, path, detail, not self.dry_run))

    def write(self, step: str, path: str, text: str, detail: str) -> None:
        self.note(step, path, detail)
        if not self.dry_run:
            self.g.write(path, text)

    def set_aside(self, step: str, path: str, why: str) -> None:
        self.note(step, path, f"moved to {path}.ferry-orig: {why}")
        if not self.dry_run:
            self.g.run("mv", path, f"{path}.ferry-orig")

    # -- fstab ------------------------------------------------------------------------

    def fstab(self) -> None:
        text = self.g.read("/etc/fstab")
        if text is None:
            self.warnings.append("the guest has no /etc/fstab")
            return
        known = self.filesystem_ids()
        mounted = self.facts["mountpoints"]
        lines, edited = [], []
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 2 or fields[0].startswith("#"):
                lines.append(line)
                continue
            spec, mountpoint = fields[0], fields[1]
            new = self._fstab_spec(spec, mountpoint, mounted, known, fields)
            if new != spec:
                edited.append(f"{spec} -> {new} ({mountpoint})")
                line = line.replace(spec, new, 1)
            lines.append(line)
        if edited:
            self.write("fstab", "/etc/fstab", "\n".join(lines) + "\n", "; ".join(edited))

    def _fstab_spec(
        self, spec: str, mountpoint: str, mounted: dict, known: dict, fields: list[str]
    ) -> str:
        kind, _, value = spec.partition("=")
        if kind in ("UUID", "LABEL", "PARTUUID") and value:
            if kind in known and value.strip('"') not in known[kind]:
                nofail = len(fields) > 3 and "nofail" in fields[3].split(",")
                self.warnings.append(
                    f"fstab: {spec} ({mountpoint}) is on none of the machine's disks"
                    + ("; it is nofail" if nofail else ": the machine will not boot past it")
                )
            return spec
        if not spec.startswith("/dev/") or self._stable_path(spec):
            return spec
        device = mounted.get(mountpoint)
        uuid = (self.g.attempt("vfs-uuid", device) or "").strip() if device else ""
        if not uuid:
            self.warnings.append(f"fstab: {spec} ({mountpoint}) has no filesystem UUID; left as is")
            return spec
        return f"UUID={uuid}"

    def _stable_path(self, spec: str) -> bool:
        """LVM and device-mapper names and by-uuid/by-label links survive the move."""
        if spec.startswith(("/dev/mapper/", "/dev/disk/by-uuid/", "/dev/disk/by-label/")):
            return True
        return spec in self.facts.setdefault("lvs", self.g.lines("lvs"))

    def filesystem_ids(self) -> dict[str, set[str]]:
        """The UUIDs and labels of every filesystem on the disks."""
        ids: dict[str, set[str]] = {"UUID": set(), "LABEL": set()}
        for device in self.g.mapping("list-filesystems"):
            for kind, command in (("UUID", "vfs-uuid"), ("LABEL", "vfs-label")):
                found = self.g.attempt(command, device)
                if found and found.strip():
                    ids[kind].add(found.strip())
        return ids

    # -- the Ferry agent ----------------------------------------------------------------

    def agent(self) -> None:
        for pattern in defaults.ADAPT_AGENT_PATHS:
            for path in self.g.glob(pattern):
                path = path.rstrip("/")
                self.note("agent", path, "removed (the Ferry mobility agent has no place here)")
                if not self.dry_run:
                    self.g.run("rm-rf", path)

    # -- network ------------------------------------------------------------------------

    def network(self) -> None:
        for rules in self.g.glob("/etc/udev/rules.d/70-persistent-net.rules"):
            self.set_aside("network", rules, "it pins interface names to the old MAC addresses")
        if self.g.glob("/etc/netplan/*.yaml"):
            return self._netplan()
        if self._networkd_enabled():
            return self._networkd()
        if self.g.flag("is-file", "/etc/network/interfaces"):
            return self._ifupdown()
        self.warnings.append(
            "network: no ifupdown, systemd-networkd or netplan configuration found; "
            "configure DHCP on eth0 before the machine is started in Azure"
        )

    def _netplan(self) -> None:
        ours = "/etc/netplan/50-ferry-azure.yaml"
        want = "network:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp4: true\n"
        for path in self.g.glob("/etc/netplan/*.yaml"):
            if path != ours:
                self.set_aside("network", path, "netplan: DHCP on eth0 replaces it")
        if self.g.read(ours) != want:
            self.write("network", ours, want, "netplan: DHCP on eth0")

    def _networkd_enabled(self) -> bool:
        wants = "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
        return bool(self.g.glob(wants)) and bool(self.g.glob("/etc/systemd/network/*.network"))

    def _networkd(self) -> None:
        ours = "/etc/systemd/network/10-ferry-azure.network"
        theirs = [p for p in self.g.glob("/etc/systemd/network/*.network") if p != ours]
        if any(_networkd_dhcp_on_eth0(self.g.read(p) or "") for p in theirs):
            return  # the guest already asks for DHCP on eth0, and nothing static there
        for path in theirs:
            self.set_aside("network", path, "systemd-networkd: DHCP on eth0 replaces it")
        want = "[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n"
        if self.g.read(ours) != want:
            self.write("network", ours, want, "systemd-networkd: DHCP on eth0")

    def _ifupdown(self) -> None:
        text = self.g.read("/etc/network/interfaces") or ""
        if re.search(r"^\s*iface\s+eth0\s+inet\s+dhcp", text, re.M) and " static" not in text:
            return
        want = (
            "# Written by Ferry's cutover: DHCP on the first NIC (Azure).\n"
            "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n\n"
            "allow-hotplug eth0\niface eth0 inet dhcp\n"
        )
        self.set_aside("network", "/etc/network/interfaces", "ifupdown: DHCP on eth0 replaces it")
        self.write("network", "/etc/network/interfaces", want, "ifupdown: DHCP on eth0")

    # -- bootloader and serial console --------------------------------------------------

    def grub(self) -> None:
        path = "/etc/default/grub"
        text = self.g.read(path)
        if text is None:
            self.warnings.append("grub: no /etc/default/grub; kernel command line left as is")
            return
        new, said = _grub_defaults(text)
        config = self._grub_cfg()
        stale = config is not None and _grub_cfg_stale(self.g.read(config) or "")
        if new != text:
            self.write("grub", path, new, "; ".join(said))
        if new != text or stale:
            self.note("grub", config or "/boot/grub/grub.cfg", "regenerated inside the guest "
                      + ("(root by UUID, serial console)" if stale else "from /etc/default/grub"))  # fmt: skip
            if not self.dry_run:
                self._update_grub(config)

    def _grub_cfg(self) -> str | None:
        for path in ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg"):
            if self.g.flag("is-file", path, "followsymlinks:true"):
                return path
        return None

    def _update_grub(self, config: str | None) -> None:
        tool = "grub2-mkconfig" if config == "/boot/grub2/grub.cfg" else "grub-mkconfig"
        self.g.shell(f"{tool} -o {config or '/boot/grub/grub.cfg'} 2>&1")
        written = self.g.read(config or "/boot/grub/grub.cfg") or ""
        if _grub_cfg_stale(written):
            self.warnings.append("grub: the regenerated grub.cfg still lacks root=UUID or ttyS0")

    # -- initramfs ----------------------------------------------------------------------

    def initramfs(self) -> None:
        kernels = [p.rsplit("/", 2)[-2] for p in self.g.glob("/lib/modules/*/modules.dep")]
        if not kernels:
            self.warnings.append("initramfs: no kernel modules found in /lib/modules")
            return
        self._hyperv_present(kernels)
        if self.g.flag("is-file", "/etc/initramfs-tools/modules"):
            return self._initramfs_tools()
        if self.g.glob("/usr/bin/dracut") or self.g.glob("/usr/sbin/dracut"):
            return self._dracut()
        self.warnings.append("initramfs: neither initramfs-tools nor dracut; Hyper-V drivers unset")

    def _hyperv_present(self, kernels: list[str]) -> None:
        for kernel in kernels:
            listed = self.g.shell(
                f"grep -hoE '/(hv_vmbus|hv_storvsc|hv_netvsc)\\.ko' /lib/modules/{kernel}/modules.dep "
                f"/lib/modules/{kernel}/modules.builtin 2>/dev/null || true"
            )
            missing = [m for m in defaults.HYPERV_MODULES if f"/{m}.ko" not in listed]
            if missing:
                self.warnings.append(f"initramfs: kernel {kernel} has no {', '.join(missing)}")

    def _initramfs_tools(self) -> None:
        path = "/etc/initramfs-tools/modules"
        text = self.g.read(path) or ""
        listed = {line.split()[0] for line in text.splitlines() if line.split() and line[0] != "#"}
        missing = [m for m in defaults.HYPERV_MODULES if m not in listed]
        if not missing:
            return
        new = text + ("" if text.endswith("\n") or not text else "\n")
        new += "# Hyper-V (Azure), added by Ferry's cutover\n" + "".join(f"{m}\n" for m in missing)
        self.write("initramfs", path, new, f"added {', '.join(missing)}")
        # Debian's MODULES=most often has them in already: then rebuilding (minutes under
        # TCG) changes nothing, and the list keeps them in every later rebuild.
        lacking = self._initrds_lacking()
        if not lacking:
            return
        self.note("initramfs", ", ".join(lacking), "rebuilt inside the guest (update-initramfs)")
        if not self.dry_run:
            self.g.shell("update-initramfs -u -k all 2>&1")
            for initrd, missing in self._initrds_lacking().items():
                self.warnings.append(
                    f"initramfs: {initrd} lacks {', '.join(missing)} after rebuild"
                )

    def _initrds_lacking(self) -> dict[str, list[str]]:
        """Each initramfs that lacks a Hyper-V module, and which."""
        lacking = {}
        for initrd in self.g.glob("/boot/initrd.img-*"):
            found = set(re.findall(r"hv_vmbus|hv_storvsc|hv_netvsc", self._initrd_listing(initrd)))
            missing = sorted(set(defaults.HYPERV_MODULES) - found)
            if missing:
                lacking[initrd] = missing
        return lacking

    def _initrd_listing(self, initrd: str) -> str:
        """The file list of an initramfs: on this host if it has lsinitramfs (native speed,
        where the appliance is emulated), else inside the guest."""
        tool = shutil.which("lsinitramfs")
        if not tool:
            return self.g.shell(f"lsinitramfs {initrd} || true")
        with tempfile.TemporaryDirectory(prefix="ferry-initrd-") as tmp:
            local = Path(tmp) / "initrd"
            self.g.run("download", initrd, str(local))
            listed = subprocess.run([tool, str(local)], capture_output=True, text=True)
            return listed.stdout

    def _dracut(self) -> None:
        path = "/etc/dracut.conf.d/50-ferry-hyperv.conf"
        want = f'add_drivers+=" {" ".join(defaults.HYPERV_MODULES)} "\n'
        if self.g.read(path) == want:
            return
        self.write("initramfs", path, want, f"dracut adds {', '.join(defaults.HYPERV_MODULES)}")
        self.note("initramfs", "/boot/initramfs-*", "rebuilt inside the guest (dracut)")
        if not self.dry_run:
            self.g.shell("dracut -f --regenerate-all 2>&1")

    # -- Azure guest agent ----------------------------------------------------------------

    def azure_agent(self) -> None:
        found = []
        for unit in ("walinuxagent.service", "waagent.service", "cloud-init.service"):
            if not self._unit_installed(unit):
                continue
            found.append(unit)
            if self._unit_enabled(unit):
                continue
            self.note("azure-agent", unit, "enabled")
            if not self.dry_run:
                self.g.shell(f"systemctl enable {unit} 2>&1")
        if not found:
            self.warnings.append(
                "azure-agent: neither walinuxagent nor cloud-init is installed; the VM will run "
                "but Azure will not see it provisioned (install walinuxagent on the source)"
            )

    def _unit_installed(self, unit: str) -> bool:
        dirs = ("/lib/systemd/system", "/usr/lib/systemd/system", "/etc/systemd/system")
        return any(self.g.glob(f"{d}/{unit}") for d in dirs)

    def _unit_enabled(self, unit: str) -> bool:
        return bool(self.g.glob(f"/etc/systemd/system/*.wants/{unit}"))


def _networkd_dhcp_on_eth0(text: str) -> bool:
    name = re.search(r"^\s*Name\s*=\s*(.+)$", text, re.M)
    dhcp = re.search(r"^\s*DHCP\s*=\s*(yes|true|ipv4|both)\s*$", text, re.M | re.I)
    static = re.search(r"^\s*Address\s*=", text, re.M)
    return bool(name and "eth0" in name[1].split() and dhcp and not static)


def _grub_defaults(text: str) -> tuple[str, list[str]]:
    """``/etc/default/grub`` with the serial console, eth0 naming and root by UUID."""
    said: list[str] = []
    # A shell file: the last assignment wins, and only it is edited.
    found = ([None] + list(re.finditer(r'^GRUB_CMDLINE_LINUX="([^"]*)"', text, re.M)))[-1]
    args = found[1].split() if found else []
    for arg, why in (
        (defaults.SERIAL_CONSOLE, "serial console on ttyS0"),
        ("net.ifnames=0", "the first NIC is eth0"),
    ):
        key = arg.split("=")[0] + ("=ttyS0" if arg.startswith("console=") else "=")
        if not any(a.startswith(key) for a in args):
            args.append(arg)
            said.append(f"kernel command line gains {arg} ({why})")
    line = f'GRUB_CMDLINE_LINUX="{" ".join(args)}"'
    head, tail = (text[: found.start()], text[found.end() :]) if found else (text, "")
    text = head + line + tail if found else head.rstrip("\n") + f"\n{line}\n"
    if re.search(r"^GRUB_DISABLE_LINUX_UUID=true", text, re.M):
        text = re.sub(r"^GRUB_DISABLE_LINUX_UUID=true.*$", "GRUB_DISABLE_LINUX_UUID=false", text,
                      flags=re.M)  # fmt: skip
        said.append("root by UUID (GRUB_DISABLE_LINUX_UUID=false)")
    if not re.search(r"^GRUB_TERMINAL=", text, re.M):
        text = text.rstrip("\n") + '\nGRUB_TERMINAL="serial console"\n'
        text += 'GRUB_SERIAL_COMMAND="serial --speed=115200"\n'
        said.append("GRUB menu on the serial console too")
    return text, said


def _grub_cfg_stale(text: str) -> bool:
    """Whether a kernel entry of grub.cfg boots a device name or lacks the serial console."""
    kernels = [line for line in text.splitlines() if line.strip().startswith("linux")]
    return any("root=/dev/sd" in k or "root=/dev/vd" in k or "ttyS0" not in k for k in kernels)


STEPS = ("fstab", "agent", "network", "grub", "initramfs", "azure_agent")


def adapt(disks: list[str | Path], dry_run: bool = False, fmt: str = "vpc") -> dict[str, Any]:
    """Adapt the machine on ``disks`` (its OS disk first); the report of what changed."""
    started = time.monotonic()
    with Guestfish([(d, fmt) for d in disks], readonly=dry_run) as g:
        facts = inspect_and_mount(g)
        adapter = Adapter(g, facts, dry_run)
        for step in STEPS:
            getattr(adapter, step)()
        # Azure boots a UEFI guest only as a generation 2 VM (hyperVGeneration V2).
        uefi = "/boot/efi" in facts["mountpoints"] or g.glob("/boot/efi/EFI/*")
        boot_mode = "uefi" if uefi else "bios"
        if not dry_run:
            g.run("sync")
            g.run("umount-all")
        launch_s = g.launch_s
    facts["boot_mode"] = boot_mode
    for mountpoint, why in facts["unmounted"].items():
        adapter.warnings.append(f"could not mount {mountpoint}: {why}")
    return {
        "disks": [str(d) for d in disks], "dry_run": dry_run,
        "os": {k: facts[k] for k in ("type", "distro", "product", "version", "root", "boot_mode")},
        "hyper_v_generation": "V2" if boot_mode == "uefi" else "V1",
        "changes": adapter.changes, "warnings": adapter.warnings,
        "launch_s": round(launch_s, 1), "duration_s": round(time.monotonic() - started, 1),
    }  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mastertarget.adapt", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--disk", action="append", required=True,
                        help="a disk of the machine (fixed VHD), the OS disk first; repeat")  # fmt: skip
    parser.add_argument(
        "--dry-run", action="store_true", help="list what would change, touch nothing"
    )
    parser.add_argument("--format", default="vpc", help="disk format for QEMU (default vpc)")
    parser.add_argument("--report", help="also write the report (JSON) to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mastertarget.adapt``: the report as one JSON object."""
    from ferry.process import run_main

    args = _parser().parse_args(argv)

    def body() -> int:
        report = adapt(args.disk, args.dry_run, args.format)
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report))
        return 0

    return run_main("adapt", body)


__all__ = ["GuestfsError", "adapt", "main"]

if __name__ == "__main__":
    sys.exit(main())

"""The lab image: a Debian 12 server built from Debian's packages, cached by recipe.

Two raw disks, kept pristine in the cache (``lab.cache``; every boot writes to
its own qcow2 overlay):

- ``system.raw`` (3 GiB, MBR): partition 1 is /boot (ext4), partition 2 is /
  (ext4), both in fstab by UUID, GRUB in the MBR.
- ``data.raw`` (1 GiB): a whole-disk LVM PV, VG ``data``, LV ``srv`` with XFS
  mounted at /srv/data by UUID.

How it is built, and why this way: this host's kernel has no partition
parsers and no device-mapper, so nothing here is mounted. ``debootstrap``
fills a directory, ``mkfs.ext4 -d`` turns it into filesystem images, and
``sfdisk`` + ``dd`` lay those into the disk file at the partition offsets.
What needs a kernel (grub-install, LVM, XFS) runs inside the
guest on a first boot (``firstboot.sh``) started with the image's own kernel and
initrd passed to QEMU. That uses the very kernel and tools a cut-over copy
will boot with and proves the image boots before it is cached; libguestfs
would boot a second appliance kernel to do the same, and hangs here unless
forced to TCG anyway.

This module and ``firstboot.sh`` are the recipe: ``lab.cache`` hashes them,
so any change here builds a new image. Keep everything else out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from lab import qemu
from lab.errors import BuildFailed

SUITE = "bookworm"
PACKAGES = (
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "grub-pc",
    "initramfs-tools",
    "python3",
    "python3-venv",
    "lvm2",
    "xfsprogs",
    "e2fsprogs",
    "util-linux",
    "iproute2",
    "procps",
    "sudo",
    "rsync",
)
"""Installed by debootstrap --variant=minbase: what the brief of issue #14 lists, plus udev
(/dev/disk/by-id), dbus (systemd's bus), iproute2 and procps (ip, ps) and rsync (Ansible's
synchronize copies Ferry's source into the guest with it)."""

MIB = 1 << 20
SYSTEM_SIZE = 3072 * MIB
BOOT_OFFSET = 1 * MIB
"""Partition 1 starts at 1 MiB, leaving the MBR gap GRUB's core image lives in."""
BOOT_SIZE = 256 * MIB
DATA_SIZE = 1024 * MIB

HOSTNAME = "ferry-lab"
HOST_ALIAS = "ferry-host"
"""The guest's name for the build host (see machine.GUEST_HOST_ADDRESS); use it in certificates."""

FIRST_BOOT_SECONDS = 900
"""How long the first boot (grub-install, LVM, XFS under TCG) may take."""

HERE = Path(__file__).resolve().parent
RECIPE_FILES = (HERE / "image.py", HERE / "firstboot.sh")
"""What the recipe hash covers (with SUITE and PACKAGES)."""


def build(work: Path, log) -> dict:
    """Build the image's files into the empty directory work; returns the build's facts."""
    tree, boot = work / "tree", work / "boot"
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ferry-lab",
         "-f", str(work / "id_ed25519"), step="ssh key")  # fmt: skip
    started = time.monotonic()
    try:
        _run("debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
             SUITE, str(tree), debian_mirror(), step="debootstrap",
             env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip
    finally:
        _unmount_below(tree)  # debootstrap leaves /proc and /sys mounted when it fails
    debootstrap_s = time.monotonic() - started
    log(f"  debootstrap: {debootstrap_s:.0f} s")
    uuids = {"root": str(uuid.uuid4()), "boot": str(uuid.uuid4())}
    _configure(tree, uuids, (work / "id_ed25519.pub").read_text())
    # /boot is its own filesystem: move it out of the root tree before mkfs.
    (tree / "boot").rename(boot)
    (tree / "boot").mkdir()
    shutil.copy(_only(boot, "vmlinuz-*"), work / "vmlinuz")
    _make_system_disk(work / "system.raw", tree, boot, uuids)
    shutil.rmtree(tree)
    with open(work / "data.raw", "wb") as f:
        f.truncate(DATA_SIZE)
    started = time.monotonic()
    _first_boot(work, boot, uuids["root"])
    first_boot_s = time.monotonic() - started
    log(f"  first boot (grub, LVM, XFS): {first_boot_s:.0f} s")
    return {
        "recipe": work.name.split(".")[0],
        "suite": SUITE,
        "packages": list(PACKAGES),
        "uuids": uuids,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "debootstrap_s": round(debootstrap_s, 1),
        "first_boot_s": round(first_boot_s, 1),
    }


def debian_mirror() -> str:
    """The Debian URI this machine's apt uses (deb822 sources first, then sources.list)."""
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.exists():
        for stanza in deb822.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines() if ":" in line and line[0] != "#"
            )
            if SUITE in fields.get("Suites", "").split():
                return fields["URIs"].split()[0]
    for line in Path("/etc/apt/sources.list").read_text().splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
            return words[1]
    raise BuildFailed(step="apt sources", detail=f"no Debian {SUITE} source configured")


def _configure(tree: Path, uuids: dict, public_key: str) -> None:
    """Host-side settings: identity, fstab, network, SSH access, console and boot."""
    (tree / "etc/hostname").write_text(f"{HOSTNAME}\n")
    (tree / "etc/hosts").write_text(
        f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n10.0.2.100 {HOST_ALIAS}\n"
    )
    (tree / "etc/fstab").write_text(
        f"UUID={uuids['root']} / ext4 errors=remount-ro 0 1\n"
        f"UUID={uuids['boot']} /boot ext4 defaults 0 2\n"
    )
    (tree / "etc/systemd/network/10-eth0.network").write_text(
        "[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n"
    )
    ssh_dir = tree / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(public_key)
    (ssh_dir / "authorized_keys").chmod(0o600)
    # No reverse DNS (the guest has none) and keys only.
    (tree / "etc/ssh/sshd_config.d/ferry-lab.conf").write_text(
        "UseDNS no\nPasswordAuthentication no\n"
    )
    # The kernel and GRUB talk on the serial console, which QEMU logs to a file.
    with open(tree / "etc/default/grub", "a") as f:
        f.write(
            "\n# ferry lab\nGRUB_TIMEOUT=1\n"
            'GRUB_CMDLINE_LINUX_DEFAULT=""\n'
            'GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200 net.ifnames=0"\n'
            'GRUB_TERMINAL="console serial"\n'
            'GRUB_SERIAL_COMMAND="serial --speed=115200"\n'
        )
    shutil.copy(HERE / "firstboot.sh", tree / "usr/local/sbin/ferry-lab-firstboot")
    (tree / "etc/systemd/system/ferry-lab-firstboot.service").write_text(
        "[Unit]\nDescription=Ferry lab first boot\n"
        "After=systemd-udev-settle.service local-fs.target\n\n"
        "[Service]\nType=oneshot\nExecStart=/usr/local/sbin/ferry-lab-firstboot\n"
        "StandardOutput=journal+console\nStandardError=journal+console\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    # `systemctl enable` in a chroot only makes symlinks: no running systemd needed.
    _run("chroot", str(tree), "systemctl", "enable", "--quiet",
         "systemd-networkd", "ferry-lab-firstboot", step="systemctl enable")  # fmt: skip
    # Nothing to fetch (the guest has no route out): keep apt's timers quiet.
    _run("chroot", str(tree), "systemctl", "mask", "--quiet",
         "apt-daily.timer", "apt-daily-upgrade.timer", step="systemctl mask")  # fmt: skip
    # Again now that fstab and the hostname are in place; natively here, since
    # under TCG in the guest it takes over ten minutes. MODULES=most (Debian's
    # default) keeps it bootable on other virtual hardware, e.g. after cut-over.
    _run("chroot", str(tree), "update-initramfs", "-u", "-k", "all", step="update-initramfs")


def _make_system_disk(disk: Path, tree: Path, boot: Path, uuids: dict) -> None:
    """MBR with /boot and /, each filesystem made from a directory and copied in at its offset."""
    root_offset = BOOT_OFFSET + BOOT_SIZE
    with open(disk, "wb") as f:
        f.truncate(SYSTEM_SIZE)
    table = (
        "label: dos\n"
        f"start={BOOT_OFFSET // 512}, size={BOOT_SIZE // 512}, type=83, bootable\n"
        f"start={root_offset // 512}, type=83\n"
    )
    _run("sfdisk", "--quiet", str(disk), input=table, step="sfdisk")
    for name, src, offset, size in (
        ("boot", boot, BOOT_OFFSET, BOOT_SIZE),
        ("root", tree, root_offset, SYSTEM_SIZE - root_offset),
    ):
        part = disk.with_name(f"{name}.ext4")
        with open(part, "wb") as f:
            f.truncate(size)
        _run("mkfs.ext4", "-q", "-F", "-L", name, "-U", uuids[name], "-d", str(src),
             str(part), step=f"mkfs.ext4 {name}")  # fmt: skip
        _run("dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={offset // MIB}",
             "conv=notrunc,sparse", "status=none", step=f"dd {name}")  # fmt: skip
        part.unlink()


def _first_boot(work: Path, boot: Path, root_uuid: str) -> None:
    """Boot once with the image's kernel and initrd; firstboot.sh provisions and powers off."""
    console = work / "firstboot-console.log"
    accel = qemu.accelerator(work / "vmlinuz", work.parent)
    cmd = [qemu.binary(), *qemu.common_args(accel, 1024, 1, console), "-no-reboot", "-nic", "none"]
    cmd += qemu.disk_args(work / "system.raw", "raw", "ferry-sys")
    cmd += qemu.disk_args(work / "data.raw", "raw", "ferry-data")
    cmd += ["-kernel", str(_only(boot, "vmlinuz-*")), "-initrd", str(_only(boot, "initrd.img-*"))]
    cmd += ["-append", f"root=UUID={root_uuid} ro console=ttyS0 net.ifnames=0 panic=-1"]
    try:
        subprocess.run(
            cmd,
            check=True,
            capture_output=True,
            timeout=FIRST_BOOT_SECONDS,
            preexec_fn=qemu.die_with_parent,
        )
    except subprocess.TimeoutExpired:
        raise BuildFailed(step="first boot", detail=f"no poweroff in {FIRST_BOOT_SECONDS} s")
    except subprocess.CalledProcessError as e:
        raise BuildFailed(step="first boot", detail=e.stderr.decode(errors="replace").strip())
    finally:
        log_copy = work.parent / "last-firstboot-console.log"
        if console.exists():
            shutil.copy(console, log_copy)
    if "FERRY-LAB-FIRSTBOOT-OK" not in console.read_text(errors="replace"):
        raise BuildFailed(step="first boot", detail=f"provisioning failed; see {log_copy}")


def _only(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        raise BuildFailed(step="image files", detail=f"expected one {pattern} in {directory}")
    return found[0]


def _run(*cmd: str, step: str, input: str | None = None, env=None) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, input=input, env=env)
    except FileNotFoundError:
        raise BuildFailed(step=step, detail=f"{cmd[0]} is not installed (make system-deps)")
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or e.stdout or "").strip().splitlines()[-3:]
        raise BuildFailed(step=step, detail=" / ".join(tail) or f"exit status {e.returncode}")


def _unmount_below(path: Path) -> None:
    """Unmount whatever a failed debootstrap left mounted under path (deepest first)."""
    prefix = str(path.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)

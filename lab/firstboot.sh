#!/bin/sh
# First boot of a freshly built lab image (runs once, as a systemd unit, inside the guest).
#
# The build host's kernel has no partition parsers and no device-mapper, so
# what needs a real kernel happens here, on the guest's own kernel and tools:
# the bootloader, and LVM and XFS on the data disk. (The initramfs is made on
# the host, in the chroot: under TCG mkinitramfs takes over ten minutes.)
# The host reads the markers below on the serial console.
set -eu
trap 'echo FERRY-LAB-FIRSTBOOT-FAILED; systemctl poweroff --no-block' EXIT
set -x

sys=/dev/disk/by-id/virtio-ferry-sys
data=/dev/disk/by-id/virtio-ferry-data
udevadm settle
test -b "$sys" && test -b "$data"

# A real BIOS bootloader in the MBR gap, so copies of this disk boot by themselves.
grub-install --target=i386-pc "$sys"
update-grub

# Data disk: the whole disk is the PV (a common layout the agent must handle);
# extents are left free in the VG for LVM snapshot scenarios.
pvcreate -y "$data"
vgcreate -y data "$data"
lvcreate -y -n srv -L 896M data
mkfs.xfs -q -L srv /dev/data/srv
uuid=$(blkid -s UUID -o value /dev/data/srv)
mkdir -p /srv/data
echo "UUID=$uuid /srv/data xfs defaults 0 2" >>/etc/fstab
mount /srv/data

systemctl disable ferry-lab-firstboot.service
mkdir -p /var/lib/ferry-lab
touch /var/lib/ferry-lab/provisioned
sync
trap - EXIT
echo FERRY-LAB-FIRSTBOOT-OK
systemctl poweroff --no-block

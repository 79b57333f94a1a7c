#!/bin/sh
# The main job, end to end: front a real block device through ublk, use a
# filesystem through /dev/ublkb0 while the server serves it, detach, and
# check that the real device holds every byte.
# Usage: demo.sh <block-device>   (needs root, ublk_drv and dbdctl in PATH)
set -e
DISK=${1:?usage: demo.sh <block-device>}
MNT=$(mktemp -d)
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step modprobe ublk_drv
step dbdctl attach "$DISK" 0
step dbdctl info 0
step mkfs.ext4 -q -F /dev/ublkb0
step mount /dev/ublkb0 "$MNT"
step dd if=/dev/urandom of="$MNT/data" bs=1M count=16 status=none
sum=$(sha256sum < "$MNT/data")
echo "sha256 of the file written through /dev/ublkb0: $sum"
step umount "$MNT"
step dbdctl detach 0
step e2fsck -fn "$DISK"
step mount -o ro "$DISK" "$MNT"
got=$(sha256sum < "$MNT/data")
echo "sha256 of the file read from the real device:   $got"
umount "$MNT"
[ "$sum" = "$got" ] && echo "OK: every byte written through the front device is on $DISK"

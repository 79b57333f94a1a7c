#!/bin/sh
# The main job, end to end: front a real block device through ublk, use a
# filesystem through /dev/ublkb0 while the server serves it, back it up
# (a snapshot with its COW file on the volume itself, a full image, an
# incremental update of the image), detach, and check that the real device
# holds every byte.
# Usage: demo.sh <block-device> [image-path]   (needs root, ublk_drv and dbdctl in PATH)
set -e
DISK=${1:?usage: demo.sh <block-device> [image-path]}
IMG=${2:-/tmp/backup.img}
MNT=$(mktemp -d)
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step modprobe ublk_drv
step dbdctl attach "$DISK" 0
step dbdctl info 0
step mkfs.ext4 -q -F -b 4096 /dev/ublkb0   # 4 KiB blocks: the COW file lives on this filesystem
step mount /dev/ublkb0 "$MNT"
step dd if=/dev/urandom of="$MNT/data" bs=1M count=16 status=none
sum=$(sha256sum < "$MNT/data")
echo "sha256 of the file written through /dev/ublkb0: $sum"

# A backup: snapshot (COW file on the volume itself, as dattobd does it),
# full image, then an incremental round that copies only changed blocks.
step dbdctl setup-snapshot /dev/ublkb0 "$MNT/.datto1" 0
step dd if=/dev/urandom of="$MNT/after-snapshot" bs=1M count=8 status=none
step dd if=/dev/datto0 of="$IMG" bs=1M status=none
step dbdctl transition-to-incremental 0
step dd if=/dev/urandom of="$MNT/next-day" bs=1M count=8 status=none
step dbdctl transition-to-snapshot "$MNT/.datto2" 0
step dbdctl update-img /dev/datto0 "$MNT/.datto1" "$IMG"
step cmp "$IMG" /dev/datto0
echo "OK: the image, updated with only the changed blocks, equals the new snapshot"
step e2fsck -fn "$IMG"
step rm "$MNT/.datto1"
step dbdctl destroy 0
rm -f "$IMG"

step umount "$MNT"
step dbdctl detach 0
step e2fsck -fn "$DISK"
step mount -o ro "$DISK" "$MNT"
got=$(sha256sum < "$MNT/data")
echo "sha256 of the file read from the real device:   $got"
umount "$MNT"
[ "$sum" = "$got" ] && echo "OK: every byte written through the front device is on $DISK"

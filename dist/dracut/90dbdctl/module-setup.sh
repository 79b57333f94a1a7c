#!/bin/bash
# dbdctl's dracut module: when a volume is attached at boot (the root
# volume: dbdctl attach --at-boot), the initramfs carries dbdctl, ublk_drv
# and that volume's state file, and dbdctl-root.sh attaches it before the
# root filesystem is mounted.

check() {
	[ -n "$(/usr/sbin/dbdctl boot-files 2>/dev/null)" ] || return 255
	return 0
}

depends() {
	return 0
}

installkernel() {
	instmods ublk_drv
}

install() {
	inst_simple /usr/sbin/dbdctl
	inst_multiple -o systemd-run readlink
	local f
	for f in $(/usr/sbin/dbdctl boot-files); do
		inst_simple "$f"
	done
	inst_hook pre-mount 10 "$moddir/dbdctl-root.sh"
}

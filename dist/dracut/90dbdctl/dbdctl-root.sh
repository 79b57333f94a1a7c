#!/bin/sh
# dracut pre-mount hook: if the root device is attached at boot, dbdctl
# attaches it with the tracking its boot record names, and sysroot.mount
# mounts the front device instead. The server runs in a scope of its own
# (systemd-run) so that stopping this hook's service leaves it running;
# its argv[0] ('@dbdctl') spares it at the switch to the real root and at
# shutdown.
type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh

rootdev=$(readlink -f "$(getarg root= | sed -e 's,^block:,,' -e 's,^UUID=,/dev/disk/by-uuid/,' -e 's,^LABEL=,/dev/disk/by-label/,' -e 's,^PARTUUID=,/dev/disk/by-partuuid/,')")
[ -b "$rootdev" ] || return 0
modprobe ublk_drv 2>/dev/null
mkdir -p /run/dbdctl/log
if front=$(DBDCTL_LOG_DIR=/run/dbdctl/log systemd-run --scope --quiet --unit=dbdctl-boot /usr/sbin/dbdctl boot-attach "$rootdev"); then
	if [ -n "$front" ]; then
		mkdir -p /run/systemd/system/sysroot.mount.d
		printf '[Mount]\nWhat=%s\n' "$front" >/run/systemd/system/sysroot.mount.d/dbdctl.conf
		systemctl daemon-reload
		info "dbdctl: $rootdev is served as $front"
	fi
else
	warn "dbdctl: $rootdev could not be attached; booting from it directly (see /run/dbdctl/log)"
fi

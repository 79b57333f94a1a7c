#!/bin/sh
# dracut pre-mount hook: if the root device is attached at boot, dbdctl
# attaches it with the tracking its boot record names, and sysroot.mount
# mounts the front device instead.
#
# In a systemd initrd the server must outlive this hook's service and the
# isolate to initrd-switch-root.target: it runs in a transient service of
# its own that the isolate leaves alone (IgnoreOnIsolate) and that stopping
# never kills: KillMode=process kills only the main process, boot-attach,
# long gone by then (KillMode=none, which systemd deprecates, would say the
# same). Its argv[0] ('@dbdctl') spares it at the switch to the real root
# and at shutdown. Its standard output is the front device to mount; what it says
# besides goes to the journal. sysroot.mount then mounts the front device,
# and systemd-fsck-root.service checks it instead of the device beneath,
# which the server holds.
type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh

# This file is sourced: dracut's own variables (root) stay as they are.
dbd_root=$(getarg root=)
case "$dbd_root" in
block:*) dbd_root=${dbd_root#block:} ;;
UUID=*) dbd_root=/dev/disk/by-uuid/${dbd_root#UUID=} ;;
LABEL=*) dbd_root=/dev/disk/by-label/${dbd_root#LABEL=} ;;
PARTUUID=*) dbd_root=/dev/disk/by-partuuid/${dbd_root#PARTUUID=} ;;
esac
rootdev=$(readlink -f "$dbd_root")
if [ -b "$rootdev" ]; then
	modprobe ublk_drv 2>/dev/null
	mkdir -p /run/dbdctl/log
	rm -f /run/dbdctl/boot-front
	if command -v systemd-run >/dev/null 2>&1; then
		systemd-run --quiet --unit=dbdctl-boot --setenv=DBDCTL_LOG_DIR=/run/dbdctl/log \
			--property=Type=oneshot --property=RemainAfterExit=yes --property=DefaultDependencies=no \
			--property=KillMode=process --property=IgnoreOnIsolate=yes \
			--property=StandardOutput=file:/run/dbdctl/boot-front --property=StandardError=journal \
			/usr/sbin/dbdctl boot-attach "$rootdev"
	else
		DBDCTL_LOG_DIR=/run/dbdctl/log /usr/sbin/dbdctl boot-attach "$rootdev" >/run/dbdctl/boot-front
	fi
	status=$?
	front=$(cat /run/dbdctl/boot-front 2>/dev/null)
	if [ "$status" -eq 0 ] && [ -n "$front" ]; then
		mkdir -p /run/systemd/system/sysroot.mount.d
		printf '[Mount]\nWhat=%s\n' "$front" >/run/systemd/system/sysroot.mount.d/dbdctl.conf
		mkdir -p /run/systemd/system/systemd-fsck-root.service.d
		printf '[Service]\nExecStart=\nExecStart=/usr/lib/systemd/systemd-fsck %s\n' "$front" \
			>/run/systemd/system/systemd-fsck-root.service.d/dbdctl.conf
		systemctl daemon-reload 2>/dev/null
		# Without systemd, dracut's mount hook mounts $root.
		command -v systemd-run >/dev/null 2>&1 || root="block:$front"
		info "dbdctl: $rootdev is served as $front"
	elif [ "$status" -ne 0 ]; then
		warn "dbdctl: $rootdev could not be attached; booting from it directly (see /run/dbdctl/log)"
	fi
fi

#!/bin/sh
# dbdctl's post-install script, for both .deb (postinst: "configure" [old
# version]) and .rpm (%post: 1 on install, 2 on upgrade).
#
# Loads ublk_drv now (modules-load.d loads it at every boot), lets systemd
# see the unit and enables it on a first install only, so an administrator
# who disabled it keeps it disabled. Nothing is restarted: restarting
# dbdctl.service would detach every device. Running servers keep the old
# binary until their device is next attached.
set -e
first=false
case "$1" in
configure) [ -z "$2" ] && first=true ;;
1) first=true ;;
esac
modprobe ublk_drv 2>/dev/null || echo "dbdctl: could not load ublk_drv now (kernel 6.0 or newer with CONFIG_BLK_DEV_UBLK is needed)" >&2
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || true
fi
if $first && command -v systemctl >/dev/null 2>&1; then
	systemctl enable dbdctl.service || true
fi
exit 0

#!/bin/sh
# dbdctl's pre-remove script, for both .deb (prerm: "remove" or "upgrade")
# and .rpm (%preun: 0 on erase, 1 on upgrade).
#
# On removal (not upgrade) the unit is disabled but not stopped: stopping
# it would detach every device, and a mounted volume's device must stay.
# Devices keep being served until they are detached; their records in
# /var/lib/dbdctl stay for a later reinstall.
set -e
case "$1" in
remove | 0) ;;
*) exit 0 ;;
esac
if command -v systemctl >/dev/null 2>&1; then
	systemctl disable dbdctl.service || true
fi
if [ -n "$(ls /var/lib/dbdctl/*.json 2>/dev/null)" ]; then
	echo "dbdctl: devices recorded in /var/lib/dbdctl stay as they are (served until detached; reload-all brings them back after a reinstall)" >&2
fi
exit 0

package guest

import (
	"fmt"
	"os"
	"strings"
	"testing"
)

// TestCowOnVolume: dattobd's default layout, the COW file on the volume
// being snapshotted. The snapshot is exact while the filesystem keeps
// changing (its COW data never goes through the filesystem), backups carry
// no COW data (the file's blocks read as zeros in the snapshot), the
// changed-block list is read through the filesystem by update-img, the
// store cannot grow into blocks the snapshot needs, a server killed with
// the snapshot open comes back with it, and reload-incremental finds the
// file by its path relative to the mount point with the volume unmounted.
func TestCowOnVolume(t *testing.T) {
	ensureScratch(t)
	must(t, "modprobe", "loop")
	// Old data everywhere, as on any used disk: a new COW file's blocks
	// hold it in the previous image, and read as zeros in the snapshot.
	junk(t, diskFio)
	front, m, dir := tracked(t, diskFio, 11, "onvol")
	mnt := "/mnt11"
	mountFront(t, front, mnt)
	sh(t, "dd if=/dev/urandom of="+mnt+"/before bs=1M count=16 2>/dev/null && sync")
	before := sh(t, "sha256sum < "+mnt+"/before")

	must(t, dbdctl, "setup-snapshot", "-f", "96", front, mnt+"/.datto1", m)
	snap := "/dev/datto" + m
	// The live filesystem keeps changing under the open snapshot.
	sh(t, "dd if=/dev/urandom of="+mnt+"/before bs=1M count=16 conv=notrunc,fsync 2>/dev/null")
	sh(t, "dd if=/dev/urandom of="+mnt+"/after bs=1M count=16 conv=fsync 2>/dev/null")
	checkOneLineError(t, run(t, dbdctl, "expand-cow-file", "16", m), "snapshot still needs")

	// A server killed with the snapshot open comes back with it.
	pid := serverPID(t, 11)
	kill(t, pid)
	waitNewServer(t, 11, pid)
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(snap); err == nil {
			break
		}
		sh(t, "sleep 0.1")
	}

	image := dir + "/img"
	must(t, "dd", "if="+snap, "of="+image, "bs=1M")
	must(t, "e2fsck", "-fn", image)
	sh(t, "mkdir -p /media/onvol && mount -o ro,noload,loop "+image+" /media/onvol")
	got := sh(t, "sha256sum < /media/onvol/before")
	_, afterErr := os.Stat("/media/onvol/after")
	zeros := run(t, "/usr/bin/cmp", "-n", "1048576", "/media/onvol/.datto1", "/dev/zero")
	sh(t, "umount /media/onvol")
	if got != before {
		t.Errorf("the image's file differs from the file at the snapshot instant")
	}
	if afterErr == nil {
		t.Errorf("a file created after the snapshot is in the image")
	}
	if zeros.code != 0 {
		t.Errorf("the COW file carries data in the image: %s", zeros.stdout+zeros.stderr)
	}

	must(t, dbdctl, "transition-to-incremental", m)
	sh(t, "dd if=/dev/urandom of="+mnt+"/inc bs=1M count=8 conv=fsync 2>/dev/null")
	marked, changed := incrementalRound(t, m, mnt+"/.datto1", mnt+"/.datto2", image)
	t.Logf("COW file on the volume: %d blocks marked, %d changed", marked, changed)
	must(t, "rm", mnt+"/.datto1")
	must(t, dbdctl, "transition-to-incremental", m)

	// Dormant across a detach; reloaded with the volume unmounted, by the
	// path relative to its mount point (dattobd's convention).
	sh(t, "dd if=/dev/urandom of="+mnt+"/inc2 bs=1M count=8 conv=fsync 2>/dev/null")
	must(t, "umount", mnt)
	must(t, dbdctl, "detach", m)
	out := must(t, dbdctl, "reload-incremental", diskFio, ".datto2", m)
	if !strings.Contains(out, mnt+"/.datto2") {
		t.Errorf("reload-incremental said %q", out)
	}
	must(t, "mount", front, mnt)
	sh(t, "dd if=/dev/urandom of="+mnt+"/inc3 bs=1M count=8 conv=fsync 2>/dev/null")
	marked, changed = incrementalRound(t, m, mnt+"/.datto2", mnt+"/.datto3", image)
	t.Logf("after a reload with the volume unmounted: %d blocks marked, %d changed", marked, changed)
	must(t, "umount", mnt)
	must(t, "e2fsck", "-fn", front)
	must(t, "mount", front, mnt)
}

// junk fills a device with non-zero bytes (mkfs does not clear free space
// on a device that cannot discard, and neither does a reused disk).
func junk(t *testing.T, dev string) {
	t.Helper()
	sh(t, "{ yes dbdctl-old-data || :; } | head -c "+fmt.Sprint(sizeOf(t, dev))+" > "+dev+" && sync")
}

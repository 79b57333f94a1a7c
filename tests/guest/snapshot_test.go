package guest

import (
	"fmt"
	"os"
	"strings"
	"testing"
)

// diskScratch holds COW files and images: a filesystem other than the
// tracked device's, as this release requires.
const diskScratch = "/dev/vdd"

func ensureScratch(t *testing.T) {
	t.Helper()
	if r := run(t, "mountpoint", "-q", "/scratch"); r.code == 0 {
		return
	}
	must(t, "mkdir", "-p", "/scratch")
	must(t, "mkfs.ext4", "-q", "-F", diskScratch)
	must(t, "mount", "-t", "ext4", diskScratch, "/scratch")
}

// tracked attaches disk as minor with a fresh scratch directory for its COW
// files and images, and destroys any tracking at the end of the test.
func tracked(t *testing.T, disk string, minor int, name string) (front, m, dir string) {
	t.Helper()
	ensureUblk(t)
	ensureScratch(t)
	m = fmt.Sprint(minor)
	front = attach(t, disk, minor)
	dir = "/scratch/" + name
	must(t, "rm", "-rf", dir)
	must(t, "mkdir", "-p", dir)
	// Runs last: images and COW files would fill the scratch disk.
	t.Cleanup(func() { run(t, "rm", "-rf", dir) })
	t.Cleanup(func() { run(t, dbdctl, "destroy", m) })
	return front, m, dir
}

// fsKind describes how to make, check and mount one filesystem type.
type fsKind struct {
	name, mkfs, mkfsForce, check string
	checkArgs                    []string
	roOpts                       string // mount options for a read-only image (no journal replay)
}

var ext4 = fsKind{"ext4", "mkfs.ext4", "-F", "e2fsck", []string{"-fn"}, "ro,noload"}
var xfs = fsKind{"xfs", "mkfs.xfs", "-f", "xfs_repair", []string{"-n"}, "ro,norecovery,nouuid"}

func (k fsKind) fsck(t *testing.T, dev string) {
	t.Helper()
	st, err := os.Stat(dev)
	if err != nil || !st.Mode().IsRegular() || k.name != "xfs" {
		must(t, k.check, append(k.checkArgs, dev)...)
		return
	}
	// A frozen XFS is consistent but keeps its lazy superblock counters in
	// the log, which xfs_repair -n reports until the log is replayed. Check
	// a copy after replaying its log, as xfs_repair itself advises.
	sh(t, fmt.Sprintf(`
		cp %[1]s %[1]s.check
		mkdir -p /media/check
		mount -t xfs -o loop,nouuid %[1]s.check /media/check
		umount /media/check
		xfs_repair -n -f %[1]s.check
		rm %[1]s.check
	`, dev))
}

// TestBackupLoop runs dattobd's whole backup loop with real filesystems and
// real clients: snapshot a mounted, busy filesystem, image it with dd and
// qemu-img, check and mount the image, then bring it up to date twice with
// transition-to-snapshot + update-img and compare it byte for byte.
func TestBackupLoop(t *testing.T) {
	ensureUblk(t)
	ensureScratch(t)
	must(t, "modprobe", "loop")
	for i, k := range []fsKind{ext4, xfs} {
		disk := []string{diskFio, diskExt4}[i]
		t.Run(k.name, func(t *testing.T) { backupLoop(t, k, disk, 4+i) })
	}
}

func backupLoop(t *testing.T, k fsKind, disk string, minor int) {
	m := fmt.Sprint(minor)
	dir := "/scratch/" + k.name
	must(t, "rm", "-rf", dir)
	must(t, "mkdir", "-p", dir, "/media/img")
	must(t, k.mkfs, "-q", k.mkfsForce, disk)
	front := attach(t, disk, minor)
	must(t, "mount", "-t", k.name, front, "/mnt")
	t.Cleanup(func() {
		run(t, "umount", "/media/img")
		run(t, dbdctl, "destroy", m)
		run(t, "umount", "/mnt")
	})
	sh(t, `
		mkdir -p /mnt/data
		i=0; while [ $i -lt 50 ]; do dd if=/dev/urandom of=/mnt/data/f$i bs=4k count=$((i % 7 + 1)) 2>/dev/null; i=$((i+1)); done
		dd if=/dev/urandom of=/mnt/data/big bs=1M count=8 2>/dev/null
		sync
		(cd /mnt && find data -type f | sort | xargs sha256sum) > `+dir+`/before.sums
	`)

	// The snapshot instant: the mounted filesystem is frozen around it.
	out := must(t, dbdctl, "setup-snapshot", disk, dir+"/cow1", m)
	if !strings.Contains(out, "/dev/datto"+m) {
		t.Fatalf("setup-snapshot said %q", out)
	}
	snap := "/dev/datto" + m
	// Keep writing while the snapshot is open.
	sh(t, `
		dd if=/dev/urandom of=/mnt/data/big bs=1M count=8 conv=notrunc 2>/dev/null
		rm /mnt/data/f1 /mnt/data/f2
		dd if=/dev/urandom of=/mnt/data/new bs=1M count=2 2>/dev/null
		sync
	`)
	doc := info(t, m)
	if doc.Devices[0].Mode != "snapshot" || doc.Devices[0].State == nil || *doc.Devices[0].State != 3 {
		t.Fatalf("info after setup-snapshot: %+v", doc.Devices[0])
	}
	// Image the snapshot two ways; both must be identical.
	img := dir + "/image.raw"
	must(t, "dd", "if="+snap, "of="+img, "bs=1M")
	must(t, "qemu-img", "convert", "-O", "raw", snap, dir+"/image2.raw")
	must(t, "cmp", img, dir+"/image2.raw")
	must(t, "rm", dir+"/image2.raw")
	k.fsck(t, img)
	// The image shows the pre-snapshot content, none of the later writes.
	must(t, "mount", "-t", k.name, "-o", "loop,"+k.roOpts, img, "/media/img")
	sh(t, `cd /media/img && sha256sum -c `+dir+`/before.sums >/dev/null && test ! -e data/new`)
	must(t, "umount", "/media/img")

	// Two incremental rounds.
	prev := dir + "/cow1"
	for round := 2; round <= 3; round++ {
		must(t, dbdctl, "transition-to-incremental", m)
		sh(t, fmt.Sprintf(`
			dd if=/dev/urandom of=/mnt/data/round%d bs=1M count=3 2>/dev/null
			dd if=/dev/urandom of=/mnt/data/big bs=4k count=17 seek=%d conv=notrunc 2>/dev/null
			rm -f /mnt/data/f%d
			sync
		`, round, round*100, round+3))
		next := fmt.Sprintf("%s/cow%d", dir, round)
		must(t, dbdctl, "transition-to-snapshot", next, m)
		out := must(t, dbdctl, "update-img", snap, prev, img)
		if !strings.Contains(out, "blocks changed") {
			t.Errorf("update-img summary missing: %q", out)
		}
		must(t, "cmp", img, snap)
		must(t, "rm", prev)
		prev = next
	}
	k.fsck(t, img)
	must(t, dbdctl, "destroy", m)
	if _, err := os.Stat(prev); err == nil {
		t.Errorf("destroy left the current COW file %s", prev)
	}
	must(t, "umount", "/mnt")
	detach(t, minor)
}

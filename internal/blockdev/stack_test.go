package blockdev

import (
	"testing"

	"golang.org/x/sys/unix"
)

// On the host: the filesystem holding the test's files is found on its
// device, and is one per superblock.
func TestMountsAndFilesystemsOn(t *testing.T) {
	mounts, err := Mounts()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[uint64]bool{}
	for _, m := range mounts {
		if seen[m.Dev] {
			t.Errorf("superblock %d:%d listed twice", unix.Major(m.Dev), unix.Minor(m.Dev))
		}
		seen[m.Dev] = true
	}
	var st unix.Stat_t
	if err := unix.Stat(t.TempDir(), &st); err != nil {
		t.Fatal(err)
	}
	dev := uint64(st.Dev)
	if nameOf(dev) == "" {
		t.Skipf("the test directory's filesystem (%d:%d) is not on a block device", unix.Major(dev), unix.Minor(dev))
	}
	fss, err := FilesystemsOn(dev)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, m := range fss {
		found = found || m.Dev == dev
	}
	if !found {
		t.Errorf("FilesystemsOn(%d:%d) = %+v misses the filesystem mounted from it", unix.Major(dev), unix.Minor(dev), fss)
	}
	if s := Stack(dev); len(s) == 0 || s[0] != dev {
		t.Errorf("Stack(%d:%d) = %v", unix.Major(dev), unix.Minor(dev), s)
	}
	_, others, err := Users(dev)
	if err != nil {
		t.Fatal(err)
	}
	if len(others) != 0 {
		t.Errorf("Users sees unknown users of a mounted device: %v", others)
	}
}

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

// MountOf finds the filesystem of a path by its mount; on the host, the
// test directory's is the one mounted from its st_dev (not btrfs here:
// the guest's TestStackedFilesystems covers btrfs, whose st_dev differs).
func TestMountOf(t *testing.T) {
	dir := t.TempDir()
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	m, err := MountOf(dir)
	if err != nil {
		t.Fatal(err)
	}
	if m.FSType != "btrfs" && m.Dev != uint64(st.Dev) {
		t.Errorf("MountOf(%s) = %+v, want the filesystem of device %d:%d", dir, m, unix.Major(uint64(st.Dev)), unix.Minor(uint64(st.Dev)))
	}
	if _, err := MountOf(dir + "/missing"); err == nil {
		t.Error("MountOf a missing path succeeded")
	}
}

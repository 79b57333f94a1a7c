package blockdev

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// What lives on a device: the devices stacked on it (device-mapper, md,
// found through sysfs "holders") and the filesystems on any of them,
// btrfs included (its superblocks have anonymous device numbers; it is
// found through the devices its sysfs directory lists).

// Mount is one filesystem mounted on the host (one per superblock).
type Mount struct {
	Point  string // where it is mounted (its first mount point)
	Dev    uint64 // the superblock's device number (st_dev of its files)
	FSType string
	Source string // the mount source (a device path for block filesystems)
}

// Mounts lists the host's mounted filesystems, one per superblock, from
// /proc/self/mountinfo.
func Mounts() ([]Mount, error) {
	var out []Mount
	seen := map[uint64]bool{}
	err := eachMount(func(_ uint64, m Mount) bool {
		if !seen[m.Dev] {
			seen[m.Dev] = true
			out = append(out, m)
		}
		return true
	})
	return out, err
}

// MountOf returns the filesystem path is on. It is found through the
// path's mount (statx's mount ID), not its st_dev: a btrfs file's st_dev
// is its subvolume's, which is not the superblock's device number that
// mountinfo (and so Mounts and FilesystemsOn) gives.
func MountOf(path string) (Mount, error) {
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, path, unix.AT_SYMLINK_NOFOLLOW, unix.STATX_MNT_ID, &stx); err != nil {
		return Mount{}, fmt.Errorf("statx %s: %w", path, err)
	}
	if stx.Mask&unix.STATX_MNT_ID == 0 {
		return Mount{}, fmt.Errorf("statx %s: the kernel gives no mount ID", path)
	}
	var found Mount
	ok := false
	err := eachMount(func(id uint64, m Mount) bool {
		if id == stx.Mnt_id {
			found, ok = m, true
			return false
		}
		return true
	})
	if err == nil && !ok {
		err = fmt.Errorf("mount %d of %s is not in /proc/self/mountinfo", stx.Mnt_id, path)
	}
	return found, err
}

// eachMount calls fn with every line of /proc/self/mountinfo (its mount
// ID and what it mounts) until fn returns false.
func eachMount(fn func(id uint64, m Mount) bool) error {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root mountpoint options... - fstype source superoptions
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" {
				sep = i
				break
			}
		}
		if len(fields) < 5 || sep < 0 || sep+2 >= len(fields) {
			continue
		}
		var id uint64
		var major, minor uint32
		if _, err := fmt.Sscanf(fields[0], "%d", &id); err != nil {
			continue
		}
		if _, err := fmt.Sscanf(fields[2], "%d:%d", &major, &minor); err != nil {
			continue
		}
		m := Mount{Point: unescapeOctal(fields[4]), Dev: unix.Mkdev(major, minor), FSType: fields[sep+1], Source: unescapeOctal(fields[sep+2])}
		if !fn(id, m) {
			break
		}
	}
	return sc.Err()
}

// Stack returns rdev and every device stacked on it, transitively (the
// sysfs holders of each).
func Stack(rdev uint64) []uint64 {
	out := []uint64{rdev}
	seen := map[uint64]bool{rdev: true}
	for i := 0; i < len(out); i++ {
		entries, _ := os.ReadDir(sysfsDir(out[i]) + "holders")
		for _, e := range entries {
			if h, ok := devOfName(e.Name()); ok && !seen[h] {
				seen[h] = true
				out = append(out, h)
			}
		}
	}
	return out
}

// devOfName is the device number of the block device the kernel names name.
func devOfName(name string) (uint64, bool) {
	data, err := os.ReadFile(filepath.Join("/sys/class/block", name, "dev"))
	if err != nil {
		return 0, false
	}
	var major, minor uint32
	if _, err := fmt.Sscanf(strings.TrimSpace(string(data)), "%d:%d", &major, &minor); err != nil {
		return 0, false
	}
	return unix.Mkdev(major, minor), true
}

// nameOf is the kernel's name of block device rdev (e.g. "ublkb0", "dm-3").
func nameOf(rdev uint64) string {
	if t := sysfsName(rdev); t != "" {
		return filepath.Base(t)
	}
	return ""
}

// FilesystemsOn returns the filesystems that live on rdev: on it, on a
// device stacked on it, or btrfs with one of those as a member device.
func FilesystemsOn(rdev uint64) ([]Mount, error) {
	mounts, err := Mounts()
	if err != nil {
		return nil, err
	}
	stack := map[uint64]bool{}
	names := map[string]bool{}
	for _, d := range Stack(rdev) {
		stack[d] = true
		if n := nameOf(d); n != "" {
			names[n] = true
		}
	}
	var out []Mount
	for _, m := range mounts {
		if stack[m.Dev] || (m.FSType == "btrfs" && btrfsOn(m, names)) {
			out = append(out, m)
		}
	}
	return out, nil
}

// btrfsOn reports whether the btrfs m has one of the named devices among
// its members.
func btrfsOn(m Mount, names map[string]bool) bool {
	for _, n := range btrfsMembers(m) {
		if names[n] {
			return true
		}
	}
	return false
}

// Top returns the devices of rdev's stack that nothing is stacked on.
func Top(rdev uint64) []uint64 {
	var out []uint64
	for _, d := range Stack(rdev) {
		if entries, _ := os.ReadDir(sysfsDir(d) + "holders"); len(entries) == 0 {
			out = append(out, d)
		}
	}
	return out
}

// Opened reports whether someone holds block device rdev open exclusively
// (a mount, a device stacked on it, another program): an O_EXCL open of
// it fails with EBUSY.
func Opened(rdev uint64) bool {
	name := nameOf(rdev)
	if name == "" {
		return false
	}
	fd, err := unix.Open("/dev/"+name, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		return errors.Is(err, unix.EBUSY)
	}
	unix.Close(fd)
	return false
}

// Users says who uses rdev, through everything stacked on it: the
// filesystems on it (FilesystemsOn) and the devices at the top of its
// stack that something other than a mounted filesystem holds open (a
// program using the device raw, a virtual machine, swap). Freezing the
// filesystems makes the device consistent only when others is empty.
func Users(rdev uint64) (filesystems []Mount, others []string, err error) {
	filesystems, err = FilesystemsOn(rdev)
	if err != nil {
		return nil, nil, err
	}
	covered := map[string]bool{}
	for _, m := range filesystems {
		if m.FSType == "btrfs" {
			for _, n := range btrfsMembers(m) {
				covered[n] = true
			}
		} else if n := nameOf(m.Dev); n != "" {
			covered[n] = true
		}
	}
	for _, top := range Top(rdev) {
		if n := nameOf(top); n != "" && !covered[n] && Opened(top) {
			others = append(others, "/dev/"+n)
		}
	}
	return filesystems, others, nil
}

// btrfsMembers lists the member devices of the btrfs mounted as m.
func btrfsMembers(m Mount) []string {
	var src unix.Stat_t
	if unix.Stat(m.Source, &src) != nil {
		return nil
	}
	source := nameOf(uint64(src.Rdev))
	fsids, _ := os.ReadDir("/sys/fs/btrfs")
	for _, fsid := range fsids {
		members, _ := os.ReadDir(filepath.Join("/sys/fs/btrfs", fsid.Name(), "devices"))
		var names []string
		has := false
		for _, d := range members {
			names = append(names, d.Name())
			has = has || d.Name() == source
		}
		if has {
			return names
		}
	}
	return []string{source}
}

package blockdev

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// MountPoint returns where the block device rdev is mounted, or "".
func MountPoint(rdev uint64) string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	defer f.Close()
	want := fmt.Sprintf("%d:%d", unix.Major(rdev), unix.Minor(rdev))
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root mountpoint ...
		fields := strings.Fields(sc.Text())
		if len(fields) >= 5 && fields[2] == want {
			return unescapeOctal(fields[4])
		}
	}
	return ""
}

// sysfsName is the kernel's name for the device path under /sys/devices
// (e.g. ".../block/ublkb0/ublkb0p1"), or "".
func sysfsName(rdev uint64) string {
	target, err := os.Readlink(strings.TrimSuffix(sysfsDir(rdev), "/"))
	if err != nil {
		return ""
	}
	return target
}

// IsUblk reports whether rdev belongs to a ublk block device (or one of
// its partitions).
func IsUblk(rdev uint64) bool { return strings.Contains(sysfsName(rdev), "/ublkb") }

// IsPartitionOf reports whether rdev is a partition of the disk whose
// kernel name is disk (e.g. "ublkb0").
func IsPartitionOf(rdev uint64, disk string) bool {
	return strings.Contains(sysfsName(rdev), "/"+disk+"/")
}

// unescapeOctal undoes mountinfo's \ooo escapes (space, tab, newline, backslash).
func unescapeOctal(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// DMName is the device-mapper name of rdev (e.g. "vg-root"), or "" when
// rdev is not a device-mapper device.
func DMName(rdev uint64) string {
	b, err := os.ReadFile(sysfsDir(rdev) + "dm/name")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// Node is the device node of rdev that devtmpfs keeps (e.g. "/dev/dm-3"),
// found through sysfs: it exists without udev, unlike /dev/mapper names.
func Node(rdev uint64) (string, error) {
	name := nameOf(rdev)
	if name == "" {
		return "", fmt.Errorf("block device %d:%d is not in sysfs", unix.Major(rdev), unix.Minor(rdev))
	}
	return "/dev/" + name, nil
}

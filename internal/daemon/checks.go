package server

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/ublk"
	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// ParseMinor accepts a decimal minor in 0..MaxMinor, as dattobd does.
func ParseMinor(s string) (int, error) {
	if s == "" {
		return 0, errors.New("minor is empty")
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return 0, fmt.Errorf("minor %q is not a number", s)
		}
	}
	n, err := strconv.Atoi(s)
	if err != nil || n > MaxMinor {
		return 0, fmt.Errorf("minor %s is out of range 0..%d", s, MaxMinor)
	}
	return n, nil
}

// CheckAttach refuses an attach that cannot work, before anything changes,
// with a message that names the problem.
func CheckAttach(path string, minor int) error {
	if minor < 0 || minor > MaxMinor {
		return fmt.Errorf("minor %d is out of range 0..%d", minor, MaxMinor)
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("%s does not exist", path)
		}
		return fmt.Errorf("%s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return fmt.Errorf("%s is not a block device", path)
	}
	if _, err := os.Stat(ublk.ControlPath); err != nil {
		return ublk.ErrNoUblk
	}
	if isUblkDisk(uint64(st.Rdev)) {
		return fmt.Errorf("%s is a ublk device itself; attach the real device instead", path)
	}
	if resp, err := Call(minor, Request{Op: "info"}, 5*time.Second); err == nil && resp.Device != nil {
		return fmt.Errorf("minor %d is taken: %s is attached as %s", minor, resp.Device.BlockDevice, resp.Device.FrontDevice)
	}
	for _, p := range []string{fmt.Sprintf("/dev/ublkb%d", minor), fmt.Sprintf("/dev/ublkc%d", minor)} {
		if _, err := os.Stat(p); err == nil {
			return fmt.Errorf("minor %d is taken: %s already exists (if its server died, `dbdctl detach %d` removes it)", minor, p, minor)
		}
	}
	for _, d := range ListDevices() {
		var dst unix.Stat_t
		if unix.Stat(d.BlockDevice, &dst) == nil && dst.Rdev == st.Rdev {
			return fmt.Errorf("%s is already attached as minor %d (%s)", path, d.Minor, d.FrontDevice)
		}
	}
	if mnt := MountPoint(uint64(st.Rdev)); mnt != "" {
		return fmt.Errorf("%s is mounted on %s; unmount it, attach, then mount %s instead",
			path, mnt, fmt.Sprintf("/dev/ublkb%d", minor))
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("%s is in use (held by another driver or program, e.g. LVM, RAID or swap)", path)
		}
		return fmt.Errorf("open %s: %w", path, err)
	}
	unix.Close(fd)
	return nil
}

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

// isUblkDisk reports whether rdev belongs to a ublk block device.
func isUblkDisk(rdev uint64) bool {
	target, err := os.Readlink(fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(rdev), unix.Minor(rdev)))
	if err != nil {
		return false
	}
	return strings.Contains(target, "/ublkb")
}

// RemoveOrphan deletes the ublk device of minor when its server has died
// (killed, crashed) and left the kernel object behind: without a server the
// kernel has already stopped the block device, but the id stays taken until
// someone deletes it. It reports whether there was an orphan to remove, and
// refuses a device that a live process still serves.
func RemoveOrphan(minor int) (bool, error) {
	if _, err := os.Stat(fmt.Sprintf("/dev/ublkc%d", minor)); err != nil {
		return false, nil
	}
	ctrl, err := ublk.OpenControl()
	if err != nil {
		return false, err
	}
	defer ctrl.Close()
	info, err := ctrl.DevInfo(uint32(minor))
	if err != nil {
		if errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, err
	}
	if info.UblksrvPID > 0 && processAlive(int(info.UblksrvPID)) && info.State == uapi.DevLive {
		return false, fmt.Errorf("minor %d is served by another program (pid %d), not by dbdctl", minor, info.UblksrvPID)
	}
	// STOP is harmless on a dead device and needed on a quiesced one.
	ctrl.Stop(uint32(minor))
	if err := ctrl.Delete(uint32(minor)); err != nil {
		return false, fmt.Errorf("delete orphaned ublk device %d: %w", minor, err)
	}
	os.Remove(SocketPath(minor))
	return true, nil
}

func processAlive(pid int) bool {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(data), ')')
	return i > 0 && i+2 < len(data) && data[i+2] != 'Z'
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

package daemon

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/internal/blockdev"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/insert"
	"github.com/dbdublk/dbdublk/internal/kmod"
	"github.com/dbdublk/dbdublk/internal/linux"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/internal/state"
	"github.com/dbdublk/dbdublk/ublk"
	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// ensureUblk loads ublk_drv where /dev/ublk-control is missing, as
// `modprobe ublk_drv` would; a kernel that has no ublk driver at all gets
// one line naming the way out.
func ensureUblk() error {
	if _, err := os.Stat(ublk.ControlPath); err == nil {
		return nil
	}
	if err := kmod.Load("ublk_drv"); err != nil {
		if errors.Is(err, kmod.ErrNotShipped) {
			return noUblkDriver(kmod.Release())
		}
		return fmt.Errorf("ublk is not available: %s is missing and loading ublk_drv failed: %v", ublk.ControlPath, err)
	}
	// devtmpfs makes the node as the driver registers; allow it a moment.
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(ublk.ControlPath); err == nil {
			return nil
		}
	}
	return ublk.ErrNoUblk
}

// noUblkDriver is the running kernel's release when it has no ublk driver
// to load (Debian 12's own kernels, say). It is ublk.ErrNoUblk to callers.
type noUblkDriver string

func (r noUblkDriver) Error() string {
	return fmt.Sprintf("this kernel (%s) has no ublk driver (ublk_drv); boot one that has: Linux >= 6.4 built with CONFIG_BLK_DEV_UBLK, e.g. Debian 13's, or on Debian 12 the backports kernel (apt install -t bookworm-backports linux-image-amd64)", string(r))
}

func (noUblkDriver) Is(target error) bool { return target == ublk.ErrNoUblk }

// CheckAttach refuses an attach that cannot work, before anything changes,
// with a message that names the problem.
func CheckAttach(path string, m dattobd.Minor) error {
	rdev, err := blockdev.Rdev(path)
	if err != nil {
		return err
	}
	if err := ensureUblk(); err != nil {
		return err
	}
	if blockdev.IsUblk(rdev) {
		return fmt.Errorf("%s is a ublk device itself; attach the real device instead", path)
	}
	if d, err := protocol.For(m).Info(); err == nil {
		return fmt.Errorf("minor %d is taken: %s is attached as %s", m, d.BlockDevice, d.FrontDevice)
	}
	for _, p := range []string{m.FrontPath(), m.FrontCharPath()} {
		if _, err := os.Stat(p); err == nil {
			return fmt.Errorf("minor %d is taken: %s already exists (if its server died, `dbdctl detach %d` removes it)", m, p, m)
		}
	}
	for _, d := range protocol.ListDevices() {
		if other, err := blockdev.Rdev(d.BlockDevice); err == nil && other == rdev {
			return fmt.Errorf("%s is already attached as minor %d (%s)", path, d.Minor, d.FrontDevice)
		}
	}
	if blockdev.MountPoint(rdev) == "/" {
		// Not even live under device-mapper: a server inserted under /
		// would be stopped at shutdown with / still on it.
		return fmt.Errorf("%s is the root volume, mounted on /; attach it from boot: dbdctl attach --at-boot %s %d, then reboot", path, path, m)
	}
	if blockdev.DMName(rdev) != "" && blockdev.Opened(rdev) {
		// In use: the front device goes in under it (live.go).
		return checkInsertable(path, rdev)
	}
	if mnt := blockdev.MountPoint(rdev); mnt != "" {
		return fmt.Errorf("%s is mounted on %s; unmount it, attach, then mount %s instead (only a device-mapper volume, e.g. an LVM logical volume, can be attached while mounted; the root volume is attached from boot with attach --at-boot)",
			path, mnt, m.FrontPath())
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

// checkInsertable refuses a live insertion under the device-mapper volume
// at path that cannot work, before anything changes (insert.Inspect).
func checkInsertable(path string, rdev uint64) error {
	c, err := linux.OpenDMControl()
	if err != nil {
		return err
	}
	defer c.Close()
	if _, _, err := insert.Inspect(c, rdev, blockdev.IsUblk); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// RemoveOrphan deletes the ublk device of minor when its server has died
// (killed, crashed) and left the kernel object behind: without a server the
// kernel has already stopped the block device, but the id stays taken until
// someone deletes it. It reports whether there was an orphan to remove, and
// refuses a device that a live process still serves.
func RemoveOrphan(m dattobd.Minor) (bool, error) {
	if _, err := os.Stat(m.FrontCharPath()); err != nil {
		return false, nil
	}
	ctrl, err := ublk.OpenControl()
	if err != nil {
		return false, err
	}
	defer ctrl.Close()
	id := m.FrontID()
	info, err := ctrl.DevInfo(id)
	if err != nil {
		if errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, err
	}
	if info.UblksrvPID > 0 && processAlive(int(info.UblksrvPID)) && info.State == uapi.DevLive {
		return false, fmt.Errorf("minor %d is served by another program (pid %d), not by dbdctl", m, info.UblksrvPID)
	}
	// STOP is harmless on a dead device and needed on a quiesced one.
	ctrl.Stop(id)
	if err := ctrl.Delete(id); err != nil {
		return false, fmt.Errorf("delete orphaned ublk device %d: %w", id, err)
	}
	os.Remove(protocol.SocketPath(m))
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

// Unserved lists the minors whose front device is in the kernel with no
// server answering for it: recovering (a supervisor is starting a new
// server), held (its I/O waits for a server nobody starts: attach recovers
// it, detach removes it) or orphaned (dead: detach removes it).
func Unserved() []protocol.DeviceInfo {
	ctrl, err := ublk.OpenControl()
	if err != nil {
		return nil
	}
	defer ctrl.Close()
	var out []protocol.DeviceInfo
	for i := 0; i <= dattobd.MaxMinor; i++ {
		m := dattobd.Minor(i)
		if _, err := os.Stat(m.FrontCharPath()); err != nil {
			continue
		}
		if _, err := protocol.For(m).Info(); !errors.Is(err, protocol.ErrNotAttached) {
			continue // served (or answering something)
		}
		info, err := ctrl.DevInfo(m.FrontID())
		if err != nil {
			continue
		}
		d := protocol.DeviceInfo{Minor: m, State: dattobd.StateAttached, FrontDevice: m.FrontPath(), Status: protocol.StatusOrphaned}
		switch {
		case protocol.Supervised(m):
			d.Status = protocol.StatusRecovering
		case info.State == uapi.DevQuiesced:
			d.Status = protocol.StatusHeld
		}
		if r, ok := state.Find(m); ok {
			d.BlockDevice, d.Mode, d.CowFile = r.BlockDevice, r.Mode, r.CowFile
			if r.Failure != nil {
				d.Error = -r.Failure.Errno
			}
		}
		out = append(out, d)
	}
	return out
}

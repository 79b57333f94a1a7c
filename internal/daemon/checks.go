package daemon

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/internal/blockdev"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/ublk"
	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// CheckAttach refuses an attach that cannot work, before anything changes,
// with a message that names the problem.
func CheckAttach(path string, m dattobd.Minor) error {
	rdev, err := blockdev.Rdev(path)
	if err != nil {
		return err
	}
	if _, err := os.Stat(ublk.ControlPath); err != nil {
		return ublk.ErrNoUblk
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
	if mnt := blockdev.MountPoint(rdev); mnt != "" {
		return fmt.Errorf("%s is mounted on %s; unmount it, attach, then mount %s instead", path, mnt, m.FrontPath())
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

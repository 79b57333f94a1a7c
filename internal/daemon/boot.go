package daemon

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/blockdev"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/internal/state"
)

// The root volume, served from boot. The initramfs starts the server (and
// its supervisor) before the root filesystem is mounted, from the record
// kept in the volume's boot record (state.Boot), and mounts the front
// device as /. Such a server
//   - runs as "@dbdctl", which systemd spares when the initramfs hands over
//     and in its last killing spree at shutdown (protocol.BootArgv0);
//   - follows the switch to the real root (followSwitchRoot), so that every
//     path it uses from then on (state directory, COW files, its helpers)
//     is the running system's, and brings the state file there in step
//     with its boot record once / is writable (keepFileInStep);
//   - never detaches: / is never unmounted. At shutdown, once / is
//     read-only, the system-shutdown hook ends it in place (endInPlace):
//     its COW file is closed clean and every later write is refused, so
//     the next boot resumes the tracking with nothing missed.

// switchRootPoll is how often a boot server looks for the switch to the
// real root.
const switchRootPoll = 250 * time.Millisecond

// followSwitchRoot waits until PID 1's root is no longer this process's
// (the initramfs has handed over to the real root), then moves this
// process there (chroot into PID 1's root) and calls then. It gives up
// when stop is closed. /proc is reached through a descriptor opened now:
// the initramfs moves its /proc into the real root before it hands over,
// so from then on this process's root has none.
func followSwitchRoot(logf func(string, ...any), stop <-chan struct{}, then func()) {
	proc, err := unix.Open("/proc", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		logf("cannot follow the switch to the real root: open /proc: %v", err)
		return
	}
	defer unix.Close(proc)
	tick := time.NewTicker(switchRootPoll)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		var own, init unix.Stat_t
		if unix.Stat("/", &own) != nil || unix.Fstatat(proc, "1/root", &init, 0) != nil {
			continue
		}
		if own.Dev == init.Dev && own.Ino == init.Ino {
			continue
		}
		if err := unix.Fchdir(proc); err != nil {
			logf("follow the switch to the real root: %v", err)
			return
		}
		if err := unix.Chroot("1/root"); err != nil {
			logf("follow the switch to the real root: chroot: %v", err)
			return
		}
		if err := unix.Chdir("/"); err != nil {
			logf("follow the switch to the real root: chdir: %v", err)
		}
		logf("followed the switch to the real root")
		if then != nil {
			then()
		}
		return
	}
}

// fileBehindRetry is how often a boot server tries again to bring the
// state file in step with its boot record (while / is read-only).
const fileBehindRetry = 2 * time.Second

// writeBootRecord writes r, a boot server's record: the boot record must
// be written, the state file may lag (in the initramfs it is not the
// running system's; early in boot / is read-only): keepFileInStep catches
// it up. Caller holds recMu.
func (s *Server) writeBootRecord(r state.Record) error {
	if err := state.Write(r); err != nil {
		if !errors.Is(err, unix.EROFS) {
			return err
		}
		if !s.fileBehind {
			s.log.Printf("%s is read-only: minor %d's record is in its boot record; the state file follows once / is writable", state.Dir, s.cfg.Minor)
		}
		s.fileBehind = true
	}
	return nil
}

// keepFileInStep writes the state file of a boot server whenever it lags
// behind the boot record, until the server detaches.
func (s *Server) keepFileInStep() {
	s.every(fileBehindRetry, func() bool {
		s.recMu.Lock()
		defer s.recMu.Unlock()
		if !s.fileBehind {
			return true
		}
		if err := state.WriteFile(s.lastRecord); err == nil {
			s.fileBehind = false
			s.log.Printf("state file %s is in step with the boot record", state.Path(s.cfg.Minor))
		}
		return true
	})
}

// switchedRoot is what a boot server does once in the real root: its
// state file there is older than its boot record, and its helper is
// still in the initramfs.
func (s *Server) switchedRoot() {
	// A helper started in the initramfs would resolve paths there: the
	// next one starts here.
	s.closeFrontFS()
	s.recMu.Lock()
	s.fileBehind = true
	s.recMu.Unlock()
}

// startBoot starts what a boot server runs besides serving.
func (s *Server) startBoot() {
	if !s.cfg.Boot {
		return
	}
	go followSwitchRoot(s.log.Printf, s.detached, s.switchedRoot)
	go s.keepFileInStep()
}

// withBootRecord adds the boot record's extents, if the server has one, to
// those a snapshot shows as zeros: the server writes it on the device
// directly, untracked, as it does its COW files, so no image could follow
// it.
func (s *Server) withBootRecord(extents []cow.Extent) []cow.Extent {
	if s.boot == nil {
		return extents
	}
	return append(append([]cow.Extent(nil), extents...), s.boot.Extents...)
}

// endInPlace ends a boot server's tracking at shutdown, its volume still
// mounted: only once every filesystem on the front device is read-only
// (nothing more will be written), the tracker is sealed (later writes
// fail, none goes untracked), the COW file is closed clean and the real
// device flushed. The device goes on serving reads until the machine
// stops; the next boot resumes the tracking as a reload does.
func (s *Server) endInPlace() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dev == nil {
		return protocol.Errorf(protocol.ErrDetaching, "minor %d is detaching", s.cfg.Minor)
	}
	if s.boot == nil {
		return fmt.Errorf("minor %d was not attached at boot: only the root volume's device ends in place; detach it", s.cfg.Minor)
	}
	if s.sealed {
		return nil
	}
	rdev, err := blockdev.Rdev(s.FrontPath())
	if err != nil {
		return err
	}
	mounts, err := blockdev.FilesystemsOn(rdev)
	if err != nil {
		return err
	}
	for _, m := range mounts {
		var st unix.Statfs_t
		if err := unix.Statfs(m.Point, &st); err != nil || st.Flags&unix.ST_RDONLY == 0 {
			return protocol.Errorf(protocol.ErrInUse, "%s on %s is still writable: tracking goes on (the next boot recovers it from its write-intent record)", m.Point, s.FrontPath())
		}
	}
	s.stopSnapshotDevice()
	prev, err := s.trk.Seal()
	if err != nil {
		return err
	}
	s.sealed = true
	if prev.Mode.Tracking() && s.snap != nil {
		s.closeDormant(prev, "the next boot will recover it", fmt.Sprintf("%s mode is dormant at shutdown: %%s closed clean; the next boot resumes it", prev.Mode))
	}
	if err := unix.Fsync(s.bdev.FD()); err != nil {
		s.log.Printf("flush %s: %v", s.cfg.BlockDevice, err)
	}
	s.log.Printf("%s ends in place: writes are refused from now on", s.FrontPath())
	return nil
}

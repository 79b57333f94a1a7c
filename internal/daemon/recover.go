package server

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/ublk"
	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// Recovery: every front device is created with ublk user recovery (and
// reissue), so when its server dies the kernel keeps /dev/ublkb<minor>,
// holds the I/O in flight and waits for a new server. Starting a server
// for the same device and minor again (the supervisor does, or a service
// manager running attach --foreground) takes the device over: the mounted
// filesystem sees a pause, no I/O error, and every acknowledged write is
// on the device already (a write is acknowledged only after the real
// device took it).

// Recoverable reports whether minor's front device waits for a new server
// and the state file says it fronts path: then attaching path as minor
// again recovers it instead of creating a device.
func Recoverable(path string, minor int) (Persisted, bool) {
	ctrl, err := ublk.OpenControl()
	if err != nil {
		return Persisted{}, false
	}
	defer ctrl.Close()
	if _, ok := ublk.Recoverable(ctrl, uint32(minor)); !ok {
		return Persisted{}, false
	}
	states, _ := LoadStates()
	for _, p := range states {
		if p.Minor == minor && sameBlockDevice(p.BlockDevice, path) {
			return p, true
		}
	}
	return Persisted{}, false
}

// WaitRecoverable is Recoverable for a server that just died: the kernel
// quiesces its device shortly after (a work item), so it waits up to
// timeout for that, and answers false at once for a device that is gone.
func WaitRecoverable(path string, minor int, timeout time.Duration) bool {
	ctrl, err := ublk.OpenControl()
	if err != nil {
		return false
	}
	deadline := time.Now().Add(timeout)
	for {
		info, err := ctrl.DevInfo(uint32(minor))
		switch {
		case err != nil || info.State == uapi.DevDead:
			ctrl.Close()
			return false
		case info.State == uapi.DevQuiesced:
			ctrl.Close()
			_, ok := Recoverable(path, minor)
			return ok
		case time.Now().After(deadline):
			ctrl.Close()
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func sameBlockDevice(a, b string) bool {
	var sa, sb unix.Stat_t
	return unix.Stat(a, &sa) == nil && unix.Stat(b, &sb) == nil &&
		sa.Mode&unix.S_IFMT == unix.S_IFBLK && sa.Rdev == sb.Rdev
}

// recoverTracking resumes the tracking the dead server had. The machine
// did not restart (the kernel still holds the device), so the COW file's
// page cache holds everything the dead server wrote: a snapshot's index
// entries are written through (cow.RecoverSnapshot trusts them), and an
// incremental file replays its write-intent record. If tracking cannot be
// resumed, the device is still served (its filesystem must not fail) and
// tracking is marked failed: the next backup must be a full one.
func (s *Server) recoverTracking(p Persisted) {
	if p.Mode == "passthrough" || p.Mode == "" {
		return
	}
	cache := p.CacheBytes
	if cache <= 0 {
		cache = DefaultCacheBytes
	}
	var err error
	switch p.Mode {
	case "incremental":
		err = s.reload(Reload{Mode: ModeIncremental, CowFile: p.CowFile, CacheBytes: cache, FallocMiB: p.FallocMiB, Extents: p.CowExtents, resume: true})
	case "snapshot":
		err = s.reload(Reload{Mode: ModeSnapshot, CowFile: p.CowFile, CacheBytes: cache, FallocMiB: p.FallocMiB, Extents: p.CowExtents, PrevExtents: p.PrevCowExtents, resume: true})
	default:
		err = fmt.Errorf("unknown mode %q in %s", p.Mode, StatePath(p.Minor))
	}
	if err == nil {
		s.snap.relative = p.CowRelative
	}
	if err != nil {
		s.recoverFailed = true
		s.trk.fail(syscall.EIO, fmt.Errorf("cannot resume %s mode from %s after the server died: %w; the device is served untracked and the next backup must be full", p.Mode, p.CowFile, err))
	}
}

// removeDeadSnapshotDevice deletes the snapshot device a dead server left
// (it has no recovery: its readers got errors when the server died).
func (s *Server) removeDeadSnapshotDevice() {
	id := uint32(snapshotIDBase + s.cfg.Minor)
	if _, err := os.Stat(fmt.Sprintf("/dev/ublkc%d", id)); err != nil {
		return
	}
	s.ctrl.Stop(id)
	if err := s.ctrl.Delete(id); err != nil && !errors.Is(err, unix.ENODEV) {
		s.log.Printf("delete the dead server's snapshot device %d: %v", id, err)
	}
}

package daemon

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/blockdev"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/failpoint"
	"github.com/dbdublk/dbdublk/internal/state"
	"github.com/dbdublk/dbdublk/ublk"
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
func Recoverable(path string, m dattobd.Minor) (state.Record, bool) {
	ctrl, err := ublk.OpenControl()
	if err != nil {
		return state.Record{}, false
	}
	defer ctrl.Close()
	if _, ok := ublk.Recoverable(ctrl, m.FrontID()); !ok {
		return state.Record{}, false
	}
	if r, ok := state.Find(m); ok && blockdev.Same(r.BlockDevice, path) {
		return r, true
	}
	return state.Record{}, false
}

// quiescePoll is how often the supervisor asks the kernel whether a dead
// server's device waits for a new one.
const quiescePoll = 20 * time.Millisecond

// Opening the real device after a server died: the dead server's
// io_uring, with O_DIRECT requests in flight, is torn down asynchronously
// and holds the device open exclusively until it is, which can take a
// while on a busy machine. The new server waits it out.
const (
	busyWait      = 2 * time.Minute
	busyFirstWait = 50 * time.Millisecond
	busyMaxPause  = 2 * time.Second
)

// openAfterDeath opens the real device for a server taking over from a
// dead one, retrying while it is still held (each try logged).
func (s *Server) openAfterDeath(path string) (*blockdev.Device, error) {
	deadline := time.Now().Add(busyWait)
	pause := busyFirstWait
	for try := 1; ; try++ {
		d, err := blockdev.Open(path)
		if err == nil || !errors.Is(err, blockdev.ErrBusy) || time.Now().After(deadline) {
			return d, err
		}
		s.log.Printf("open %s, try %d: still held by the dead server (%v); trying again in %v", path, try, err, pause)
		time.Sleep(pause)
		pause = min(2*pause, busyMaxPause)
	}
}

// startRecovered takes over the front device of a server that died, with
// the tracking it had, then recreates its snapshot device.
func (s *Server) startRecovered(prev state.Record) error {
	s.log.Printf("ublk device %d is waiting for its server: recovering it (%s mode recorded)", s.cfg.Minor.FrontID(), prev.Mode)
	s.removeDeadSnapshotDevice()
	s.lastRecord = prev
	s.recoverTracking(prev)
	dev, err := ublk.Recover(s.ctrl, s.cfg.Minor.FrontID(), s.bdev.Size(), s.trk, s.log.Printf)
	if err != nil {
		return err
	}
	s.dev = dev
	if err := s.dev.Start(); err != nil {
		return err
	}
	if len(prev.Frozen) > 0 {
		// Only now: thawing writes to the device, held until it serves.
		s.thawLeftFrozen(prev.Frozen)
	}
	if s.live != nil {
		s.resumeLive()
	}
	if s.mode() == dattobd.Snapshot {
		if err := s.startSnapshotDevice(); err != nil {
			s.log.Printf("recreate the snapshot device: %v", err)
		}
	}
	if err := s.persist(); err != nil {
		// The device must keep serving; the old record still names the
		// tracking, which the COW file itself keeps or refuses.
		s.log.Printf("%v", err)
	}
	go s.checkpointLoop()
	s.startBoot()
	s.log.Printf("recovered %s as %s", s.cfg.BlockDevice, s.FrontPath())
	if failpoint.Check("recover/exit") != nil {
		// A test's stand-in for a server that crashes whenever it takes
		// the device over: the supervisor must give up, not loop.
		go func() { time.Sleep(200 * time.Millisecond); os.Exit(3) }()
	}
	return nil
}

// recoverTracking resumes the tracking the dead server had. The machine
// did not restart (the kernel still holds the device), so the COW file's
// page cache holds everything the dead server wrote: a snapshot's index
// entries are written through (cow.ResumeSnapshot trusts them), and an
// incremental file replays its write-intent record. If tracking cannot be
// resumed (or had failed already), the device is still served (its
// filesystem must not fail) and tracking is failed for good, in the state
// file and in the COW file: the next backup must be a full one, and no
// reload after a reboot replays an old record over the untracked writes.
func (s *Server) recoverTracking(r state.Record) {
	if r.Failure != nil {
		s.failure, s.failedMode, s.failedCow, s.failedIno = r.Failure, r.Mode, r.CowFile, r.CowInode
		s.log.Printf("the tracking into %s had failed (%s); serving untracked", r.CowFile, r.Failure.Reason)
		stampFailure(r, s.log.Printf)
		return
	}
	if !r.Mode.Tracking() {
		return
	}
	cache := r.CacheBytes
	if cache <= 0 {
		cache = cow.DefaultCacheBytes
	}
	rl := Reload{Mode: r.Mode, CowFile: r.CowFile, CacheBytes: cache, FallocMiB: r.FallocMiB,
		Extents: r.CowExtents, Relative: r.CowRelative, Inode: r.CowInode, resume: true}
	if r.Mode == dattobd.Snapshot {
		rl.PrevExtents = r.PrevCowExtents
	}
	err := s.reload(rl)
	if err == nil {
		return
	}
	why := fmt.Errorf("cannot resume %s mode from %s after the server died: %w; the device is served untracked and the next backup must be full",
		r.Mode, r.CowFile, err)
	s.recMu.Lock()
	s.failedMode, s.failedCow, s.failedIno = r.Mode, r.CowFile, r.CowInode
	s.recMu.Unlock()
	s.trk.Fail(syscall.EIO, why)
	s.markCowFailed(rl, why)
}

// markCowFailed writes a failure record into a COW file that could not be
// resumed, so that a reload by hand does not replay its old intent record
// either. Best effort: a file that cannot be read is refused anyway.
func (s *Server) markCowFailed(r Reload, why error) {
	f := state.Failure{Errno: int(syscall.EIO), Reason: why.Error()}
	if err := markCowFile(s.realDevice(), r.CowFile, r.Extents, f); err != nil {
		s.log.Printf("mark %s failed: %v", r.CowFile, err)
	}
}

// removeDeadSnapshotDevice deletes the snapshot device a dead server left
// (it has no recovery: its readers got errors when the server died).
func (s *Server) removeDeadSnapshotDevice() {
	id := s.cfg.Minor.SnapshotID()
	if _, err := os.Stat(s.cfg.Minor.SnapshotCharPath()); err != nil {
		return
	}
	s.ctrl.Stop(id)
	if err := s.ctrl.Delete(id); err != nil && !errors.Is(err, unix.ENODEV) {
		s.log.Printf("delete the dead server's snapshot device %d: %v", id, err)
	}
}

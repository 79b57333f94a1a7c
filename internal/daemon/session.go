package daemon

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/failpoint"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/internal/state"
	"github.com/dbdublk/dbdublk/ublk"
)

// Units follow dattobd: -c is bytes, -f and sizes are MiB.
const mib = 1 << 20

// snapshotDepth is the queue depth of a snapshot device: its readers are
// backup copies, a few large sequential streams.
const snapshotDepth = 64

// session is the tracking state a server adds to its front device: the
// COW file it tracks into and how it was set up.
type session struct {
	cowPath    string
	cacheBytes int64
	fallocMiB  int64 // as requested; 0 = default
	// extents are where a COW file on the volume itself lies on the
	// device (nil for one on another filesystem); reloads need them.
	extents []cow.Extent
	// prevExtents, in snapshot mode, are those of the previous COW file
	// (the change list update-img is about to use) when it is on the
	// volume: the server wrote its index there directly, untracked, so
	// the snapshot shows those blocks as zeros too, as the previous
	// snapshot (and so the image) did.
	prevExtents []cow.Extent
	relative    string       // the COW file's path below its volume's mount point
	ino         uint64       // a COW file on the volume: its inode (reopens check it)
	consistency consistency  // how the snapshot was made consistent
	dev         *ublk.Device // the snapshot device, in snapshot mode
}

func (s *Server) mode() dattobd.Mode { return s.trk.Current().Mode }

// persist records the server's current configuration in the minor's state
// file. Caller holds s.mu.
func (s *Server) persist() error {
	r := state.Record{Minor: s.cfg.Minor, BlockDevice: s.cfg.BlockDevice, Mode: s.mode(), Live: s.live, Boot: s.boot}
	if s.snap != nil {
		r.CowFile, r.CacheBytes, r.FallocMiB, r.CowExtents = s.snap.cowPath, s.snap.cacheBytes, s.snap.fallocMiB, s.snap.extents
		r.CowRelative, r.PrevCowExtents, r.CowInode = s.snap.relative, s.snap.prevExtents, s.snap.ino
	}
	if err := s.failpoint("persist"); err != nil {
		return err
	}
	return s.writeRecord(r)
}

// writeRecord writes r, with the minor's failure if it has one.
func (s *Server) writeRecord(r state.Record) error {
	s.recMu.Lock()
	defer s.recMu.Unlock()
	if s.failure != nil {
		r.Failure = s.failure
		if !r.Mode.Tracking() && s.failedCow != "" {
			r.Mode, r.CowFile, r.CowInode = s.failedMode, s.failedCow, s.failedIno
		}
	}
	r.Frozen = s.frozen
	s.lastRecord = r
	write := state.Write
	if r.Boot != nil {
		write = s.writeBootRecord
	}
	if err := write(r); err != nil {
		return fmt.Errorf("record minor %d in %s: %w", s.cfg.Minor, state.Path(s.cfg.Minor), err)
	}
	return nil
}

// recordFailure is the tracker's OnFailure: the state file says tracking
// failed before anything is let through untracked, so no reload after a
// crash or a reboot can resume it. It never takes s.mu (the tracker may
// fail inside a request).
func (s *Server) recordFailure(errno syscall.Errno, why error) {
	s.recMu.Lock()
	if s.failure == nil {
		s.failure = &state.Failure{Errno: int(errno), Reason: why.Error()}
	}
	r := s.lastRecord
	s.recMu.Unlock()
	if err := s.writeRecord(r); err != nil {
		// The COW file has recorded the failure already: no reload
		// resumes it, whatever the state file says.
		s.log.Printf("%v", err)
	}
}

// failed returns the minor's tracking failure, or nil.
func (s *Server) failed() *state.Failure {
	s.recMu.Lock()
	defer s.recMu.Unlock()
	return s.failure
}

// clearFailure forgets the minor's failure (destroy).
func (s *Server) clearFailure() {
	s.recMu.Lock()
	defer s.recMu.Unlock()
	s.failure, s.failedMode, s.failedCow, s.failedIno = nil, dattobd.Passthrough, "", 0
}

// forget removes minor's state file: it is not to come back.
func (s *Server) forget() {
	if err := state.Remove(s.cfg.Minor); err != nil {
		s.log.Printf("remove %s: %v", state.Path(s.cfg.Minor), err)
	}
}

// startSnapshotDevice serves the current snapshot read-only as a second
// ublk device, with /dev/datto<minor> linking to it.
func (s *Server) startSnapshotDevice() error {
	spec := ublk.DeviceSpec{
		ID:                int(s.cfg.Minor.SnapshotID()),
		Queues:            s.cfg.Queues,
		Depth:             snapshotDepth,
		MaxIOBytes:        s.maxIO(),
		Size:              s.bdev.Size(),
		LogicalBlockSize:  s.bdev.LogicalBlockSize,
		PhysicalBlockSize: s.bdev.PhysicalBlockSize,
		DMAAlignment:      s.bdev.DMAAlignment,
		ReadOnly:          true,
		Flags:             s.dataPathFlags(),
	}
	if err := s.failpoint("snapshot-device"); err != nil {
		return err
	}
	dev, err := ublk.Create(s.ctrl, spec, s.trk.View(s.trk.Current()), s.log.Printf)
	if err != nil {
		return fmt.Errorf("create snapshot device: %w", err)
	}
	if err := dev.Start(); err != nil {
		dev.Stop()
		dev.Delete()
		return fmt.Errorf("start snapshot device: %w", err)
	}
	s.snap.dev = dev
	link := s.cfg.Minor.DattoPath()
	os.Remove(link)
	if err := os.Symlink(dev.BlockPath(), link); err != nil {
		s.log.Printf("symlink %s: %v", link, err)
	}
	return nil
}

// snapshotDeviceIdle refuses while someone has the snapshot device open:
// tearing it down would fail their reads.
func (s *Server) snapshotDeviceIdle() error {
	if s.snap == nil || s.snap.dev == nil {
		return nil
	}
	fd, err := unix.Open(s.snap.dev.BlockPath(), unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return protocol.Errorf(protocol.ErrInUse, "snapshot device %s is in use (mounted or open); unmount or close it first",
				s.cfg.Minor.DattoPath())
		}
		return nil
	}
	unix.Close(fd)
	return nil
}

func (s *Server) stopSnapshotDevice() {
	if s.snap == nil || s.snap.dev == nil {
		return
	}
	if err := s.snap.dev.Stop(); err != nil {
		s.log.Printf("stop snapshot device: %v", err)
	}
	if err := s.snap.dev.Delete(); err != nil {
		s.log.Printf("delete snapshot device: %v", err)
	}
	s.snap.dev = nil
	os.Remove(s.cfg.Minor.DattoPath())
}

// dieAt kills the server where failpoint step of the command being
// answered is set: a test's stand-in for a server killed at that instant.
func (s *Server) dieAt(step string) {
	if s.failpoint(step) != nil {
		unix.Kill(os.Getpid(), unix.SIGKILL)
	}
}

// failpoint is failpoint.Check of step within the command being answered
// ("setup-snapshot/persist", say), so a test makes one step of one command
// fail. Caller holds s.mu.
func (s *Server) failpoint(step string) error {
	if s.op == "" {
		return nil
	}
	return failpoint.Check(string(s.op) + "/" + step)
}

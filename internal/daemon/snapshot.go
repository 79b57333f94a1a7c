package daemon

import (
	"cmp"
	"fmt"
	"path/filepath"
	"syscall"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/internal/track"
)

// dattobd's lifecycle commands. Each runs with s.mu held (handler.go).
//
// Each is ordered so that every step that can fail comes before the point
// of no return and is undone when it fails: the device is left exactly as
// it was. Past that point (transition-to-incremental truncating the
// snapshot's data store) a failure fails the tracking, durably (see
// track.Tracker.Fail): it is never left looking intact.

func (s *Server) setupSnapshot(req protocol.SetupSnapshot) error {
	if m := s.mode(); m != dattobd.Passthrough {
		return protocol.Errorf(protocol.ErrWrongMode, "minor %d is already tracking (%s mode); destroy it first", s.cfg.Minor, m)
	}
	if x := s.failed(); x != nil {
		return protocol.Errorf(protocol.ErrFailed, "minor %d's tracking failed (%s); destroy it first (the next backup must be full)", s.cfg.Minor, x.Reason)
	}
	onVolume, err := s.checkCowPath(req.CowFile)
	if err != nil {
		return err
	}
	cache := req.CacheBytes
	if cache <= 0 {
		cache = cow.DefaultCacheBytes
	}
	if err := s.failpoint("create-cow"); err != nil {
		return err
	}
	c, extents, ino, err := s.createCow(req.CowFile, onVolume, cow.Options{
		DeviceSize: s.bdev.Size(), FileSize: req.FallocMiB * mib, CacheBytes: cache,
	})
	if err != nil {
		return err
	}
	abandon := func(err error) error {
		s.abandonCow(c, ino)
		return err
	}
	how, err := s.transition(dattobd.Snapshot, c, cache, extents, true, req.NoFreeze)
	if err != nil {
		return abandon(err)
	}
	undo := func(err error) error {
		s.stopSnapshotDevice()
		s.snap = nil
		if serr := s.trk.Swap(dattobd.Passthrough, nil, nil, nil); serr != nil {
			s.trk.Fail(syscall.EIO, fmt.Errorf("undo a snapshot that could not be set up: %w", serr))
		}
		return abandon(err)
	}
	limitGoMemory(cache)
	s.snap = &session{cowPath: req.CowFile, cacheBytes: cache, fallocMiB: req.FallocMiB, extents: extents, ino: ino, consistency: how}
	if extents != nil {
		s.snap.relative = s.relativeToFront(req.CowFile)
	}
	if err := s.startSnapshotDevice(); err != nil {
		return undo(err)
	}
	if err := s.persist(); err != nil {
		return undo(err)
	}
	s.log.Printf("snapshot set up: COW file %s, seq %d, snapshot device %s", req.CowFile, c.Header().SeqID, s.cfg.Minor.DattoPath())
	return nil
}

// abandonCow closes and removes a COW file that never took effect (ino:
// its inode, for one on the volume).
func (s *Server) abandonCow(c *cow.File, ino uint64) {
	c.Close(false)
	s.removeCow(c.Path(), ino)
}

// requireMode refuses unless the minor is in mode and healthy.
func (s *Server) requireMode(mode dattobd.Mode) error {
	if m := s.mode(); m != mode {
		return protocol.Errorf(protocol.ErrWrongMode, "minor %d is not in %s mode (it is %s)", s.cfg.Minor, mode, m)
	}
	if x := s.failed(); x != nil {
		return protocol.Errorf(protocol.ErrFailed, "minor %d has failed (%s: %v); destroy it and set up a new snapshot", s.cfg.Minor, x.Reason, syscall.Errno(x.Errno))
	}
	return nil
}

func (s *Server) transitionToIncremental() error {
	if err := s.requireMode(dattobd.Snapshot); err != nil {
		return err
	}
	if err := s.snapshotDeviceIdle(); err != nil {
		return err
	}
	st := s.trk.Current()
	if _, err := s.transition(dattobd.Incremental, st.Cow, s.snap.cacheBytes, nil, false, false); err != nil {
		return err
	}
	// No way back from here: writes are no longer preserved.
	s.stopSnapshotDevice()
	prev := s.snap.prevExtents
	s.snap.prevExtents = nil
	s.trk.SetAutoExpand(0, 0)
	fail := func(err error) error {
		s.trk.Fail(syscall.EIO, err)
		return fmt.Errorf("%w; tracking has failed, the next backup must be full", err)
	}
	if err := s.step("truncate", st.Cow.TruncateToIndex); err != nil {
		return fail(fmt.Errorf("truncate %s to its index: %w", s.snap.cowPath, err))
	}
	if st.Cow.Mapped() {
		if err := s.releaseStore(st.Cow); err != nil {
			return fail(err)
		}
	}
	// The previous COW file's index leaves the snapshot's zeroed blocks
	// at the next snapshot, showing what the server wrote there: it is a
	// change, recorded like one.
	for _, x := range prev {
		first := uint64(x.Physical) / cow.BlockSize
		if _, err := st.Cow.MarkRange(first, first+uint64(x.Length)/cow.BlockSize); err != nil {
			return fail(fmt.Errorf("record the previous COW file's blocks as changed: %w", err))
		}
	}
	if err := s.step("enable-intent", st.Cow.EnableIntent); err != nil {
		return fail(fmt.Errorf("start write-intent logging in %s: %w", s.snap.cowPath, err))
	}
	if err := s.persist(); err != nil {
		return fail(err)
	}
	s.log.Printf("now incremental: tracking changes in %s", s.snap.cowPath)
	return nil
}

// step runs the calls of one step of a command in order, stopping at the
// first error; a failpoint named step fails it before any of them runs, as
// the step's own failure would.
func (s *Server) step(name string, calls ...func() error) error {
	if err := s.failpoint(name); err != nil {
		return err
	}
	for _, call := range calls {
		if err := call(); err != nil {
			return err
		}
	}
	return nil
}

func (s *Server) transitionToSnapshot(req protocol.TransitionToSnapshot) error {
	if err := s.requireMode(dattobd.Incremental); err != nil {
		return err
	}
	if filepath.Clean(req.CowFile) == filepath.Clean(s.snap.cowPath) {
		return protocol.Errorf(protocol.ErrInvalid, "%s is the current COW file, which holds the changed-block list; give a new path", req.CowFile)
	}
	onVolume, err := s.checkCowPath(req.CowFile)
	if err != nil {
		return err
	}
	falloc := req.FallocMiB
	if falloc == 0 {
		falloc = s.snap.fallocMiB // dattobd: 0 reuses the previous size
	}
	st := s.trk.Current()
	prevCow := st.Cow
	// The change list is written back now, so closing it clean after the
	// snapshot is just a header write. And until the new snapshot is on
	// record, writes preserved into the new file are not marked in this
	// one: should the server die in between, the recovery resumes this
	// file as the state file still says, with every region recorded as
	// written (a full copy next time, never a miss).
	if err := s.step("sync-change-list", prevCow.Sync, prevCow.IntentAll); err != nil {
		return fmt.Errorf("write back %s: %w", s.snap.cowPath, err)
	}
	if err := s.failpoint("create-cow"); err != nil {
		return err
	}
	h := prevCow.Header()
	c, extents, ino, err := s.createCow(req.CowFile, onVolume, cow.Options{
		DeviceSize: s.bdev.Size(), FileSize: falloc * mib, CacheBytes: s.snap.cacheBytes,
		UUID: h.UUID, SeqID: h.SeqID + 1,
	})
	if err != nil {
		return err
	}
	if err := markNewCowChanged(prevCow, extents); err != nil {
		s.abandonCow(c, ino)
		return fmt.Errorf("record the blocks of %s as changed in %s: %w", req.CowFile, s.snap.cowPath, err)
	}
	prev := *s.snap
	how, err := s.transition(dattobd.Snapshot, c, s.snap.cacheBytes, append(append([]cow.Extent(nil), extents...), prev.extents...), true, req.NoFreeze)
	if err != nil {
		s.abandonCow(c, ino)
		return err
	}
	s.snap.consistency = how
	s.snap.cowPath, s.snap.fallocMiB, s.snap.extents, s.snap.relative, s.snap.ino = req.CowFile, falloc, extents, "", ino
	s.snap.prevExtents = prev.extents
	if extents != nil {
		s.snap.relative = s.relativeToFront(req.CowFile)
	}
	undo := func(err error) error {
		s.stopSnapshotDevice()
		*s.snap = prev
		s.backToIncremental(prevCow, c, ino)
		return err
	}
	if err := s.startSnapshotDevice(); err != nil {
		return undo(err)
	}
	if err := s.persist(); err != nil {
		return undo(err)
	}
	// The snapshot is taken; the previous file is now the change list
	// update-img copies from. The failpoint stands for a failed last
	// header write: the file is closed, not clean.
	s.dieAt("die-closing-change-list") // the next server resumes the snapshot
	injected := s.failpoint("close-change-list")
	closeErr := s.releaseCow(prevCow, prev.ino, injected == nil)
	if err := cmp.Or(injected, closeErr); err != nil {
		return fmt.Errorf("snapshot %d taken, but the change list %s could not be closed clean (%v): update-img will refuse it, so the next image must be a full copy",
			h.SeqID+1, prev.cowPath, err)
	}
	s.log.Printf("snapshot %d taken: COW file %s; %s holds the changes since the previous one", h.SeqID+1, req.CowFile, prev.cowPath)
	return nil
}

// markNewCowChanged records the blocks of a new COW file on the volume
// (its extents) as changed in the change list: the new snapshot shows
// them as zeros, while the previous image holds whatever they held at the
// previous snapshot (old data of free space), and the server writes most
// of them raw, never through the tracking. Without this, update-img would
// leave that old data in the image.
func markNewCowChanged(changeList *cow.File, extents []cow.Extent) error {
	commit := false
	for _, x := range extents {
		first := uint64(x.Physical) / cow.BlockSize
		must, err := changeList.MarkRange(first, first+uint64(x.Length)/cow.BlockSize)
		if err != nil {
			return err
		}
		commit = commit || must
	}
	if commit {
		return changeList.CommitIntent()
	}
	return nil
}

// backToIncremental undoes a transition-to-snapshot whose snapshot could
// not be served or recorded: incremental tracking into prevCow resumes,
// with every block written meanwhile (preserved into the abandoned
// snapshot's file c, inode ino if on the volume) marked in it.
func (s *Server) backToIncremental(prevCow, c *cow.File, ino uint64) {
	if err := s.trk.Swap(dattobd.Incremental, prevCow, track.BudgetIndex(prevCow, s.snap.cacheBytes), nil); err != nil {
		s.trk.Fail(syscall.EIO, fmt.Errorf("undo a snapshot that could not be taken: %w", err))
		return
	}
	err := c.ChangedRuns(func(first, count uint64) error {
		_, err := prevCow.MarkRange(first, first+count)
		return err
	})
	if err == nil {
		err = prevCow.CommitIntent()
	}
	if err != nil {
		s.trk.Fail(syscall.EIO, fmt.Errorf("record the writes of an undone snapshot in %s: %w", prevCow.Path(), err))
	}
	s.abandonCow(c, ino)
}

func (s *Server) destroy() error {
	st := s.trk.Current()
	if !st.Mode.Tracking() && s.failed() != nil {
		return s.destroyFailed()
	}
	if !st.Mode.Tracking() {
		return protocol.Errorf(protocol.ErrWrongMode, "minor %d is not tracking", s.cfg.Minor)
	}
	if err := s.snapshotDeviceIdle(); err != nil {
		return err
	}
	if err := s.trk.Swap(dattobd.Passthrough, nil, nil, nil); err != nil {
		return err
	}
	s.stopSnapshotDevice()
	st.Cow.Close(false)
	s.removeCow(s.snap.cowPath, s.snap.ino)
	s.trk.Reset()
	s.clearFailure()
	s.log.Printf("tracking destroyed; %s removed", s.snap.cowPath)
	s.snap = nil
	return s.persist()
}

// destroyFailed ends a failure recorded while not tracking (a failed
// recovery, or a failed minor reload-all attached untracked): the failed
// COW file is removed and the minor is plain attached again.
func (s *Server) destroyFailed() error {
	s.recMu.Lock()
	cowPath, ino := s.failedCow, s.failedIno
	s.recMu.Unlock()
	if cowPath != "" {
		s.removeCow(cowPath, ino)
	}
	s.trk.Reset()
	s.clearFailure()
	s.log.Printf("failed tracking destroyed; %s removed", cowPath)
	return s.persist()
}

func (s *Server) reconfigure(req protocol.Reconfigure) error {
	if req.CacheBytes <= 0 {
		return protocol.Errorf(protocol.ErrInvalid, "cache size must be a positive number of bytes")
	}
	st := s.trk.Current()
	if !st.Mode.Tracking() {
		return protocol.Errorf(protocol.ErrWrongMode, "minor %d is not tracking", s.cfg.Minor)
	}
	s.trk.SetIndexBudget(req.CacheBytes)
	limitGoMemory(req.CacheBytes)
	s.snap.cacheBytes = req.CacheBytes
	return nil
}

func (s *Server) expandCowFile(req protocol.ExpandCowFile) error {
	if m := s.mode(); m != dattobd.Snapshot {
		return protocol.Errorf(protocol.ErrWrongMode, "minor %d is not in snapshot mode (it is %s)", s.cfg.Minor, m)
	}
	if req.SizeMiB <= 0 {
		return protocol.Errorf(protocol.ErrInvalid, "expansion size must be a positive number of MiB")
	}
	if x := s.failed(); x != nil {
		return protocol.Errorf(protocol.ErrFailed, "minor %d has failed (%s); expanding cannot repair it", s.cfg.Minor, x.Reason)
	}
	return s.trk.Expand(req.SizeMiB * mib)
}

func (s *Server) reconfigureAutoExpand(req protocol.AutoExpand) error {
	if m := s.mode(); m != dattobd.Snapshot {
		return protocol.Errorf(protocol.ErrWrongMode, "minor %d is not in snapshot mode (it is %s)", s.cfg.Minor, m)
	}
	if req.StepMiB < 0 || req.ReserveMiB < 0 {
		return protocol.Errorf(protocol.ErrInvalid, "step and reserve must not be negative")
	}
	s.trk.SetAutoExpand(req.StepMiB*mib, req.ReserveMiB*mib)
	return nil
}

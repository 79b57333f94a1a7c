package daemon

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/protocol"
)

// dattobd's lifecycle commands. Each runs with s.mu held (handler.go).

func (s *Server) setupSnapshot(req protocol.SetupSnapshot) error {
	if m := s.mode(); m != dattobd.Passthrough {
		return protocol.Errorf(protocol.ErrWrongMode, "minor %d is already tracking (%s mode); destroy it first", s.cfg.Minor, m)
	}
	onVolume, err := s.checkCowPath(req.CowFile)
	if err != nil {
		return err
	}
	cache := req.CacheBytes
	if cache <= 0 {
		cache = DefaultCacheBytes
	}
	c, extents, err := s.createCow(req.CowFile, onVolume, cow.Options{
		DeviceSize: s.bdev.Size(), FileSize: req.FallocMiB * mib, CacheBytes: cache,
	})
	if err != nil {
		return err
	}
	abandon := func(err error) error {
		c.Close(false)
		os.Remove(req.CowFile)
		return err
	}
	if err := s.transition(dattobd.Snapshot, c, cache, extents); err != nil {
		return abandon(err)
	}
	s.snap = &session{cowPath: req.CowFile, cacheBytes: cache, fallocMiB: req.FallocMiB, extents: extents}
	if extents != nil {
		s.snap.relative = s.relativeToFront(req.CowFile)
	}
	if err := s.startSnapshotDevice(); err != nil {
		s.trk.Swap(dattobd.Passthrough, nil, nil, nil)
		s.snap = nil
		return abandon(err)
	}
	s.persist()
	s.log.Printf("snapshot set up: COW file %s, seq %d, snapshot device %s", req.CowFile, c.Header().SeqID, s.cfg.Minor.DattoPath())
	return nil
}

// requireMode refuses unless the minor is in mode and healthy.
func (s *Server) requireMode(mode dattobd.Mode) error {
	if m := s.mode(); m != mode {
		return protocol.Errorf(protocol.ErrWrongMode, "minor %d is not in %s mode (it is %s)", s.cfg.Minor, mode, m)
	}
	if errno := s.trk.Failed(); errno != 0 {
		return protocol.Errorf(protocol.ErrFailed, "minor %d has failed (%v); destroy it and set up a new snapshot", s.cfg.Minor, errno)
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
	if err := s.transition(dattobd.Incremental, st.Cow, s.snap.cacheBytes, nil); err != nil {
		return err
	}
	s.stopSnapshotDevice()
	prev := s.snap.prevExtents
	s.snap.prevExtents = nil
	s.trk.SetAutoExpand(0, 0)
	if err := st.Cow.TruncateToIndex(); err != nil {
		s.log.Printf("truncate %s to its index: %v", s.snap.cowPath, err)
	} else if st.Cow.Mapped() {
		s.releaseStore(st.Cow)
	}
	// The previous COW file's index leaves the snapshot's zeroed blocks
	// at the next snapshot, showing what the server wrote there: it is a
	// change, recorded like one.
	for _, x := range prev {
		first := uint64(x.Physical) / cow.BlockSize
		if _, err := st.Cow.MarkRange(first, first+uint64(x.Length)/cow.BlockSize); err != nil {
			s.trk.Fail(syscall.EIO, fmt.Errorf("record the previous COW file's blocks as changed: %w", err))
		}
	}
	if err := st.Cow.EnableIntent(); err != nil {
		s.trk.Fail(syscall.EIO, fmt.Errorf("start write-intent logging in %s: %w", s.snap.cowPath, err))
	}
	s.persist()
	s.log.Printf("now incremental: tracking changes in %s", s.snap.cowPath)
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
	h := st.Cow.Header()
	c, extents, err := s.createCow(req.CowFile, onVolume, cow.Options{
		DeviceSize: s.bdev.Size(), FileSize: falloc * mib, CacheBytes: s.snap.cacheBytes,
		UUID: h.UUID, SeqID: h.SeqID + 1,
	})
	if err != nil {
		return err
	}
	prev := s.snap.extents
	if err := s.transition(dattobd.Snapshot, c, s.snap.cacheBytes, append(append([]cow.Extent(nil), extents...), prev...)); err != nil {
		c.Close(false)
		os.Remove(req.CowFile)
		return err
	}
	old := s.snap.cowPath
	if err := s.closeCow(st.Cow, true); err != nil {
		s.log.Printf("close %s clean: %v", old, err)
	}
	s.snap.cowPath, s.snap.fallocMiB, s.snap.extents, s.snap.relative = req.CowFile, falloc, extents, ""
	s.snap.prevExtents = prev
	if extents != nil {
		s.snap.relative = s.relativeToFront(req.CowFile)
	}
	if err := s.startSnapshotDevice(); err != nil {
		s.trk.Fail(syscall.EIO, err)
		return fmt.Errorf("snapshot taken but its device could not start: %w", err)
	}
	s.persist()
	s.log.Printf("snapshot %d taken: COW file %s; %s holds the changes since the previous one", h.SeqID+1, req.CowFile, old)
	return nil
}

func (s *Server) destroy() error {
	st := s.trk.Current()
	if !st.Mode.Tracking() {
		return protocol.Errorf(protocol.ErrWrongMode, "minor %d is not tracking", s.cfg.Minor)
	}
	if err := s.snapshotDeviceIdle(); err != nil {
		return err
	}
	s.stopSnapshotDevice()
	if err := s.trk.Swap(dattobd.Passthrough, nil, nil, nil); err != nil {
		return err
	}
	st.Cow.Close(false)
	if err := os.Remove(s.snap.cowPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		s.log.Printf("remove %s: %v", s.snap.cowPath, err)
	}
	s.trk.Reset()
	s.log.Printf("tracking destroyed; %s removed", s.snap.cowPath)
	s.snap = nil
	s.persist()
	return nil
}

func (s *Server) reconfigure(req protocol.Reconfigure) error {
	if req.CacheBytes <= 0 {
		return protocol.Errorf(protocol.ErrInvalid, "cache size must be a positive number of bytes")
	}
	st := s.trk.Current()
	if !st.Mode.Tracking() {
		return protocol.Errorf(protocol.ErrWrongMode, "minor %d is not tracking", s.cfg.Minor)
	}
	st.Cow.SetCacheLimit(req.CacheBytes)
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
	if errno := s.trk.Failed(); errno != 0 {
		return protocol.Errorf(protocol.ErrFailed, "minor %d has failed (%v); expanding cannot repair it", s.cfg.Minor, errno)
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

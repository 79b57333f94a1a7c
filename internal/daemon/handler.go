package daemon

import (
	"encoding/hex"
	"fmt"
	"os"

	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/protocol"
)

// The control protocol's requests (protocol.Handler). Each takes the
// server's lock: requests are answered one at a time.

// Info describes the attachment.
func (s *Server) Info() protocol.DeviceInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := protocol.DeviceInfo{
		Minor:       s.cfg.Minor,
		BlockDevice: s.cfg.BlockDevice,
		State:       dattobd.StateAttached,
		Mode:        dattobd.Passthrough,
		Status:      protocol.StatusDetaching,
		FrontDevice: s.FrontPath(),
		ServerPID:   os.Getpid(),
		Log:         protocol.LogPath(s.cfg.Minor),
	}
	d.AttachedAtBoot = s.boot != nil
	if s.live != nil {
		d.InsertedVia = "/dev/mapper/" + s.live.Hidden
	}
	if s.dev == nil {
		return d
	}
	info := s.dev.Info()
	st := s.dev.Stats()
	d.Status = protocol.StatusServing
	d.FrontDevice = s.dev.BlockPath()
	d.Size = s.bdev.Size()
	d.LogicalBS, d.PhysicalBS = s.bdev.LogicalBlockSize, s.bdev.PhysicalBlockSize
	d.Queues, d.QueueDepth, d.MaxIOBytes = int(info.NrHWQueues), int(info.QueueDepth), s.dev.Spec().MaxIOBytes
	d.DataPath = s.dev.DataPath()
	d.Features = fmt.Sprintf("%#x", uint64(info.Flags))
	d.KernelFeat = fmt.Sprintf("%#x", s.kernelFeatures)
	d.Stats = protocol.IOCounters{
		Reads: st.Reads, Writes: st.Writes, Flushes: st.Flushes, Discards: st.Discards,
		WriteZeroes: st.WriteZeroes, Errors: st.Errors, BytesRead: st.BytesRead, BytesWritten: st.BytesWritten,
		CowWritesMerged: st.StageWritesMerged,
	}
	s.fillTrackingInfo(&d)
	return d
}

// fillTrackingInfo adds dattobd's per-device fields.
func (s *Server) fillTrackingInfo(d *protocol.DeviceInfo) {
	st := s.trk.Current()
	d.Mode = st.Mode
	d.State = dattobd.ActiveState(st.Mode)
	if x := s.failed(); x != nil {
		d.Error = -x.Errno
		if s.snap == nil {
			d.CowFile = s.failedCow // the tracking that failed
		}
	}
	if !st.Mode.Tracking() || s.snap == nil {
		d.State = dattobd.StateAttached
		return
	}
	h := st.Cow.Header()
	d.CowFile = s.snap.cowPath
	d.MaxCache = s.snap.cacheBytes
	d.Fallocate = s.snap.fallocMiB * mib
	d.CowSizeCurrent = int64(h.FSize)
	d.SeqID = h.SeqID
	d.UUID = hex.EncodeToString(h.UUID[:])
	d.Version = h.Version
	d.NrChangedBlocks = st.Cow.NrChangedBlocks()
	d.CacheInUse = s.trk.IndexMemory()
	if st.Mode == dattobd.Snapshot {
		d.Frozen, d.CrashConsistent = s.snap.consistency.frozen, s.snap.consistency.crash
		if s.snap.dev != nil {
			d.SnapshotDevice = s.cfg.Minor.DattoPath()
		}
		if step, reserve := s.trk.AutoExpand(); step > 0 {
			d.AutoExpand = &protocol.AutoExpandInfo{StepSizeMiB: step / mib, ReservedSpaceMiB: reserve / mib}
		}
	}
}

// Detach removes the front device (see detach).
// A root volume served from boot ends in place at shutdown instead.
func (s *Server) Detach(r protocol.Detach) error {
	if r.InPlace {
		return s.endInPlace()
	}
	return s.detach(!r.KeepState)
}

// tracking runs op's fn with the lock held, once the server is not
// detaching.
func (s *Server) tracking(op protocol.Op, fn func() error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dev == nil {
		return protocol.Errorf(protocol.ErrDetaching, "minor %d is detaching", s.cfg.Minor)
	}
	s.op = op
	defer func() { s.op = "" }()
	return fn()
}

// SetupSnapshot starts a snapshot series.
func (s *Server) SetupSnapshot(r protocol.SetupSnapshot) error {
	return s.tracking(protocol.OpSetupSnapshot, func() error { return s.setupSnapshot(r) })
}

// TransitionToIncremental ends the snapshot and keeps tracking changes.
func (s *Server) TransitionToIncremental() error {
	return s.tracking(protocol.OpTransitionToIncremental, s.transitionToIncremental)
}

// TransitionToSnapshot takes the next snapshot of the series.
func (s *Server) TransitionToSnapshot(r protocol.TransitionToSnapshot) error {
	return s.tracking(protocol.OpTransitionToSnapshot, func() error { return s.transitionToSnapshot(r) })
}

// Destroy stops tracking and removes the current COW file.
func (s *Server) Destroy() error { return s.tracking(protocol.OpDestroy, s.destroy) }

// Reconfigure changes the index cache limit.
func (s *Server) Reconfigure(r protocol.Reconfigure) error {
	return s.tracking(protocol.OpReconfigure, func() error { return s.reconfigure(r) })
}

// ExpandCowFile grows an active snapshot's COW store.
func (s *Server) ExpandCowFile(r protocol.ExpandCowFile) error {
	return s.tracking(protocol.OpExpandCowFile, func() error { return s.expandCowFile(r) })
}

// ReconfigureAutoExpand sets auto-expansion of an active snapshot.
func (s *Server) ReconfigureAutoExpand(r protocol.AutoExpand) error {
	return s.tracking(protocol.OpReconfigureAutoExpand, func() error { return s.reconfigureAutoExpand(r) })
}

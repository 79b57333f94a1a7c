package daemon

import (
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/blockdev"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/frontfs"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/internal/track"
)

// Consistency is how a snapshot was made consistent at its instant.
type consistency struct {
	frozen []string // the filesystems frozen around it (their mount points)
	crash  bool     // taken with --no-freeze: only crash-consistent
}

// transition swaps the tracking state at one instant, with every
// filesystem that lives on the front device frozen around it, so a
// snapshot is a clean filesystem. For a snapshot (snapshot true) it refuses
// a device it cannot make consistent (a user that is not a mounted
// filesystem, a filesystem that cannot freeze) unless noFreeze: then the
// snapshot is crash-consistent, and said so.
func (s *Server) transition(mode dattobd.Mode, c *cow.File, cacheBytes int64, extents []cow.Extent, snapshot, noFreeze bool) (consistency, error) {
	if err := s.failpoint("freeze"); err != nil {
		return consistency{}, err
	}
	how, thaw, err := s.freeze(snapshot, noFreeze)
	if err != nil {
		return consistency{}, err
	}
	s.dieAt("die-frozen") // the worst moment: the filesystem is frozen
	if mode == dattobd.Snapshot {
		extents = s.withBootRecord(extents)
	}
	err = s.trk.Swap(mode, c, track.BudgetIndex(c, cacheBytes), extents)
	thaw()
	return how, err
}

// freeze freezes the filesystems on the front device, directly or through
// devices stacked on it (device-mapper, md) or btrfs, in the helper (a
// server killed inside FIFREEZE could never exit: see frontfs). They are
// recorded in the state file first: should the server die before it
// thaws them, the helper thaws them as it ends, and the server that takes
// over thaws them too (recover.go).
func (s *Server) freeze(snapshot, noFreeze bool) (consistency, func(), error) {
	none := func() {}
	if noFreeze {
		return consistency{crash: true}, none, nil
	}
	var st unix.Stat_t
	if err := unix.Stat(s.FrontPath(), &st); err != nil {
		return consistency{}, nil, fmt.Errorf("stat %s: %w", s.FrontPath(), err)
	}
	fss, others, err := blockdev.Users(uint64(st.Rdev))
	if err != nil {
		return consistency{}, nil, err
	}
	if snapshot && len(others) > 0 {
		return consistency{}, nil, protocol.Errorf(protocol.ErrInUse,
			"%s is in use by something that is not a mounted filesystem (%s open); a snapshot of it could not be made consistent: stop that user, or pass --no-freeze for a crash-consistent snapshot",
			s.FrontPath(), strings.Join(others, ", "))
	}
	var points []string
	for _, m := range fss {
		points = append(points, m.Point)
	}
	if len(points) == 0 {
		return consistency{}, none, nil
	}
	if err := s.recordFrozen(points); err != nil {
		return consistency{}, nil, err
	}
	h, err := s.frontFS()
	if err != nil {
		s.recordFrozen(nil)
		return consistency{}, nil, err
	}
	thaw := func() {
		if err := h.Thaw(points); err != nil {
			s.log.Printf("%v", err)
		}
		if err := s.recordFrozen(nil); err != nil {
			s.log.Printf("%v", err)
		}
	}
	if err := h.Freeze(points); err != nil {
		// The helper thawed what it had frozen.
		if err := s.recordFrozen(nil); err != nil {
			s.log.Printf("%v", err)
		}
		var fe *frontfs.FreezeError
		if !snapshot || !errors.As(err, &fe) {
			return consistency{}, nil, fmt.Errorf("freeze the filesystems on %s: %w", s.FrontPath(), err)
		}
		return consistency{}, nil, protocol.Errorf(protocol.ErrInUse,
			"the filesystem on %s mounted at %s cannot be frozen (%v), so a snapshot of it would not be consistent: pass --no-freeze for a crash-consistent snapshot",
			s.FrontPath(), fe.Point, fe.Err)
	}
	return consistency{frozen: points}, thaw, nil
}

// recordFrozen records in the state file the filesystems about to be
// frozen (nil once thawed).
func (s *Server) recordFrozen(points []string) error {
	s.recMu.Lock()
	s.frozen = points
	r := s.lastRecord
	s.recMu.Unlock()
	return s.writeRecord(r)
}

// thawLeftFrozen thaws filesystems a dead server froze and never thawed
// (through the helper, like any freeze or thaw: see frontfs).
func (s *Server) thawLeftFrozen(points []string) {
	h, err := s.frontFS()
	if err == nil {
		err = h.Thaw(points)
	}
	if err != nil {
		s.log.Printf("thaw %v, left frozen by the dead server: %v", points, err)
	} else {
		s.log.Printf("thawed %v, left frozen by the dead server (those still frozen)", points)
	}
	if err := s.recordFrozen(nil); err != nil {
		s.log.Printf("%v", err)
	}
}

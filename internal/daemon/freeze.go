package daemon

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/blockdev"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/linux"
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
	if s.failpoint("die-frozen") != nil {
		// A test's stand-in for a server killed at the worst moment.
		unix.Kill(os.Getpid(), unix.SIGKILL)
	}
	err = s.trk.Swap(mode, c, track.NewBitmap(c, cacheBytes), extents)
	thaw()
	return how, err
}

// freeze freezes the filesystems on the front device, directly or through
// devices stacked on it (device-mapper, md) or btrfs. They are recorded in
// the state file first: a server that dies before it thaws them leaves
// them frozen, and the one that takes over thaws them (recover.go).
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
	var fds []int
	thaw := func() {
		for i, fd := range fds {
			if err := linux.Thaw(fd); err != nil {
				s.log.Printf("thaw %s: %v", points[i], err)
			}
			unix.Close(fd)
		}
		if err := s.recordFrozen(nil); err != nil {
			s.log.Printf("%v", err)
		}
	}
	for _, p := range points {
		fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err == nil {
			if err = linux.Freeze(fd); err != nil {
				unix.Close(fd)
			}
		}
		if err != nil {
			thaw()
			if !snapshot {
				return consistency{}, nil, fmt.Errorf("freeze %s: %w", p, err)
			}
			return consistency{}, nil, protocol.Errorf(protocol.ErrInUse,
				"the filesystem on %s mounted at %s cannot be frozen (%v), so a snapshot of it would not be consistent: pass --no-freeze for a crash-consistent snapshot",
				s.FrontPath(), p, err)
		}
		fds = append(fds, fd)
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

// thawLeftFrozen thaws filesystems a dead server froze and never thawed.
// Thawing one that is not frozen fails harmlessly (EINVAL).
func (s *Server) thawLeftFrozen(points []string) {
	for _, p := range points {
		fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			s.log.Printf("thaw %s, left frozen by the dead server: %v", p, err)
			continue
		}
		switch err := linux.Thaw(fd); {
		case err == nil:
			s.log.Printf("thawed %s, left frozen by the dead server", p)
		case !errors.Is(err, unix.EINVAL):
			s.log.Printf("thaw %s, left frozen by the dead server: %v", p, err)
		}
		unix.Close(fd)
	}
	if err := s.recordFrozen(nil); err != nil {
		s.log.Printf("%v", err)
	}
}

package daemon

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/blockdev"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/failpoint"
	"github.com/dbdublk/dbdublk/internal/linux"
	"github.com/dbdublk/dbdublk/internal/track"
)

// transition swaps the tracking state at one instant, with the filesystem
// on the front device (if any) frozen around it, so the snapshot is a
// clean filesystem.
func (s *Server) transition(mode dattobd.Mode, c *cow.File, cacheBytes int64, extents []cow.Extent) error {
	if err := failpoint.Check("freeze"); err != nil {
		return err
	}
	thaw, err := s.freeze()
	if err != nil {
		return err
	}
	err = s.trk.Swap(mode, c, track.NewBitmap(c, cacheBytes), extents)
	thaw()
	return err
}

// freeze freezes the filesystem mounted on the front device; with none
// mounted there is nothing to quiesce.
func (s *Server) freeze() (thaw func(), err error) {
	var st unix.Stat_t
	if err := unix.Stat(s.FrontPath(), &st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", s.FrontPath(), err)
	}
	mnt := blockdev.MountPoint(uint64(st.Rdev))
	if mnt == "" {
		return func() {}, nil
	}
	fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s to freeze it: %w", mnt, err)
	}
	if err := linux.Freeze(fd); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("freeze %s: %w", mnt, err)
	}
	return func() {
		if err := linux.Thaw(fd); err != nil {
			s.log.Printf("thaw %s: %v", mnt, err)
		}
		unix.Close(fd)
	}, nil
}

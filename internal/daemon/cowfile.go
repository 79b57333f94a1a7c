package daemon

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/blockdev"
	"github.com/dbdublk/dbdublk/internal/protocol"
)

// checkCowPath refuses a COW path that cannot work, before anything
// changes. It reports whether the path is on the filesystem mounted from
// the front device itself (dattobd's default layout, see cow/mapped.go).
func (s *Server) checkCowPath(path string) (onVolume bool, err error) {
	if path == "" {
		return false, protocol.Errorf(protocol.ErrInvalid, "COW file path is empty")
	}
	if !filepath.IsAbs(path) {
		return false, protocol.Errorf(protocol.ErrInvalid, "COW file path %s must be absolute", path)
	}
	dir := filepath.Dir(path)
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, protocol.Errorf(protocol.ErrInvalid, "directory %s of the COW file does not exist", dir)
		}
		return false, fmt.Errorf("COW file directory %s: %w", dir, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return false, protocol.Errorf(protocol.ErrInvalid, "%s is not a directory", dir)
	}
	if _, err := os.Lstat(path); err == nil {
		return false, protocol.Errorf(protocol.ErrInvalid, "COW file %s already exists; give a new path", path)
	}
	if st.Dev == s.bdev.Rdev {
		return false, protocol.Errorf(protocol.ErrInvalid, "COW file %s is on the tracked device %s itself", path, s.cfg.BlockDevice)
	}
	var front unix.Stat_t
	if err := unix.Stat(s.FrontPath(), &front); err == nil && st.Dev == front.Rdev {
		return true, nil
	}
	if blockdev.IsPartitionOf(uint64(st.Dev), filepath.Base(s.FrontPath())) {
		return false, protocol.Errorf(protocol.ErrInvalid, "COW file %s is on a partition of %s; put it on the filesystem of the whole device or on another one",
			path, s.FrontPath())
	}
	return false, nil
}

// createCow creates a COW file, on the volume itself or elsewhere; for one
// on the volume it also returns its extents on the device.
func (s *Server) createCow(path string, onVolume bool, opt cow.Options) (*cow.File, []cow.Extent, error) {
	c, err := cow.Create(path, opt)
	if err != nil || !onVolume {
		return c, nil, err
	}
	extents, err := c.MoveToDevice(s.cfg.BlockDevice)
	if err != nil {
		c.Close(false)
		os.Remove(path)
		return nil, nil, err
	}
	s.log.Printf("COW file %s is on the snapshotted volume: %d extents, written at their places on %s", path, len(extents), s.cfg.BlockDevice)
	return c, extents, nil
}

// closeCow closes a COW file clean (or not) and, for one on the volume,
// drops its cached pages so readers through the filesystem (update-img)
// see what was written at its extents.
func (s *Server) closeCow(c *cow.File, clean bool) error {
	err := c.Close(clean)
	if c.Mapped() {
		cow.DropCache(c.Path())
	}
	return err
}

// releaseStore gives a snapshot's data store on the volume back to its
// filesystem once the snapshot is over. The store's blocks showed as zeros
// in the snapshot (and so in its image), but hold COW data the server
// wrote directly, which the tracking never saw: they are zeroed on the
// device first, so the next snapshot agrees with the image there. The
// index stays where it is, still written at its extents.
func (s *Server) releaseStore(c *cow.File) {
	end := cow.DataOffset(c.Blocks())
	for _, x := range s.snap.extents {
		lo := max(x.Logical, end)
		if lo >= x.Logical+x.Length {
			continue
		}
		if err := s.bdev.ZeroOut(x.Physical+lo-x.Logical, x.Logical+x.Length-lo); err != nil {
			s.trk.Fail(syscall.EIO, fmt.Errorf("zero the data store of %s on %s: %w", c.Path(), s.cfg.BlockDevice, err))
		}
	}
	s.snap.extents = clipExtents(s.snap.extents, end)
	if err := os.Truncate(s.snap.cowPath, end); err != nil {
		s.log.Printf("truncate %s through its filesystem: %v", s.snap.cowPath, err)
	}
}

// clipExtents keeps the part of extents below end (a file's byte offset).
func clipExtents(xs []cow.Extent, end int64) []cow.Extent {
	var out []cow.Extent
	for _, x := range xs {
		if x.Logical >= end {
			break
		}
		x.Length = min(x.Length, end-x.Logical)
		out = append(out, x)
	}
	return out
}

// relativeToFront is path relative to where the front device is mounted.
func (s *Server) relativeToFront(path string) string {
	var st unix.Stat_t
	if unix.Stat(s.FrontPath(), &st) != nil {
		return ""
	}
	mnt := blockdev.MountPoint(uint64(st.Rdev))
	if mnt == "" {
		return ""
	}
	rel, err := filepath.Rel(mnt, path)
	if err != nil || strings.HasPrefix(rel, "..") {
		return ""
	}
	return rel
}

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
	"github.com/dbdublk/dbdublk/internal/safepath"
	"github.com/dbdublk/dbdublk/internal/state"
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
	if err := safepath.CheckDir(dir); err != nil {
		return false, protocol.Errorf(protocol.ErrInvalid, "COW file %s: %v", path, err)
	}
	if _, err := os.Lstat(path); err == nil {
		return false, protocol.Errorf(protocol.ErrInvalid, "COW file %s already exists; give a new path", path)
	}
	if st.Dev == s.bdev.Rdev {
		return false, protocol.Errorf(protocol.ErrInvalid, "COW file %s is on the tracked device %s itself", path, s.cfg.BlockDevice)
	}
	var front unix.Stat_t
	if err := unix.Stat(s.FrontPath(), &front); err != nil {
		return false, fmt.Errorf("stat %s: %w", s.FrontPath(), err)
	}
	if st.Dev == front.Rdev {
		return true, nil
	}
	if blockdev.IsPartitionOf(uint64(st.Dev), filepath.Base(s.FrontPath())) {
		return false, protocol.Errorf(protocol.ErrInvalid, "COW file %s is on a partition of %s; put it on the filesystem of the whole device or on another one",
			path, s.FrontPath())
	}
	// A filesystem stacked on the front device (device-mapper, md, btrfs)
	// would write the COW file back through the front device (tracked,
	// and deadlocking on itself), and its extents are not the front
	// device's: refused.
	fss, err := blockdev.FilesystemsOn(uint64(front.Rdev))
	if err != nil {
		return false, err
	}
	mnt, err := blockdev.MountOf(dir)
	if err != nil {
		return false, err
	}
	for _, m := range fss {
		if mnt.Dev == m.Dev {
			return false, protocol.Errorf(protocol.ErrInvalid, "COW file %s is on a filesystem (%s, mounted at %s) stacked on %s, which cannot hold its own COW file; put it on the filesystem of %s itself or on another device",
				path, m.FSType, m.Point, s.FrontPath(), s.FrontPath())
		}
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
		os.Remove(path) // still a plain file: MoveToDevice failed
		return nil, nil, err
	}
	s.log.Printf("COW file %s is on the snapshotted volume: %d extents, written at their places on %s", path, len(extents), s.cfg.BlockDevice)
	return c, extents, nil
}

// releaseCow closes a COW file the server stops writing (clean, or not)
// and, for one on the volume, lets its filesystem have it back: its cached
// pages are dropped, so readers through the filesystem (update-img) see
// what was written at its extents, and it is no longer immutable (the
// user removes it when the image is updated).
func (s *Server) releaseCow(c *cow.File, clean bool) error {
	err := c.Close(clean)
	if c.Mapped() {
		if uerr := s.unpin(c.Path(), c.Inode()); uerr != nil {
			s.log.Printf("release %s to its filesystem: %v", c.Path(), uerr)
		}
	}
	return err
}

// openPinned opens a COW file on the volume through the filesystem mounted
// from the front device, checking it is still the file the server wrote
// (inode ino): a name swapped meanwhile is refused.
func (s *Server) openPinned(path string, ino uint64) (*os.File, error) {
	var front unix.Stat_t
	if err := unix.Stat(s.FrontPath(), &front); err != nil {
		return nil, err
	}
	return cow.OpenVerified(path, uint64(front.Rdev), ino)
}

// unpin gives a COW file on the volume back to its filesystem: its cached
// pages are dropped and it is no longer immutable.
func (s *Server) unpin(path string, ino uint64) error {
	fh, err := s.openPinned(path, ino)
	if err != nil {
		return err
	}
	defer fh.Close()
	cow.DropCache(fh)
	return cow.SetImmutable(fh, false)
}

// removeCow removes a COW file the server no longer uses: one on the
// volume is given back to its filesystem first (it is immutable).
func (s *Server) removeCow(path string, ino uint64) {
	if ino != 0 {
		if err := s.unpin(path, ino); err != nil {
			s.log.Printf("release %s to its filesystem: %v", path, err)
		}
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		s.log.Printf("remove %s: %v", path, err)
	}
}

// releaseStore gives a snapshot's data store on the volume back to its
// filesystem once the snapshot is over. The store's blocks showed as zeros
// in the snapshot (and so in its image), but hold COW data the server
// wrote directly, which the tracking never saw: they are zeroed on the
// device first, so the next snapshot agrees with the image there. The
// index stays where it is, still written at its extents. (Truncating the
// file through its filesystem only frees space; a failure there is
// logged.)
func (s *Server) releaseStore(c *cow.File) error {
	end := cow.DataOffset(c.Blocks())
	for _, x := range s.snap.extents {
		lo := max(x.Logical, end)
		if lo >= x.Logical+x.Length {
			continue
		}
		if err := s.bdev.ZeroOut(x.Physical+lo-x.Logical, x.Logical+x.Length-lo); err != nil {
			return fmt.Errorf("zero the data store of %s on %s: %w", c.Path(), s.cfg.BlockDevice, err)
		}
	}
	s.snap.extents = clipExtents(s.snap.extents, end)
	fh, err := s.openPinned(s.snap.cowPath, s.snap.ino)
	if err == nil {
		err = cow.TruncatePinned(fh, end)
		fh.Close()
	}
	if err != nil {
		s.log.Printf("truncate %s through its filesystem: %v", s.snap.cowPath, err)
	}
	return nil
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

// markCowFile writes a failure record into the COW file cowFile (at its
// extents on blockDevice, for one on the volume) without opening it for
// tracking: the file then refuses every reload by itself, whatever becomes
// of the state file. A record already there is kept.
func markCowFile(blockDevice, cowFile string, extents []cow.Extent, f state.Failure) error {
	var where cow.Storage
	var err error
	if len(extents) > 0 {
		where, err = cow.DeviceStorage(blockDevice, extents)
	} else {
		where, err = cow.FileStorage(cowFile, false)
	}
	if err != nil {
		return err
	}
	return cow.MarkFailed(cowFile, where, syscall.Errno(f.Errno), f.Reason)
}

// stampFailure makes a failed record's COW file say so too, in case its
// own failure record could not be written when tracking failed (its
// storage was failing then). Best effort: a file that cannot be written
// yet is refused through the state file meanwhile.
func stampFailure(r state.Record, logf func(string, ...any)) {
	if r.Failure == nil || r.CowFile == "" {
		return
	}
	if err := markCowFile(r.BlockDevice, r.CowFile, r.CowExtents, *r.Failure); err != nil && !errors.Is(err, os.ErrNotExist) {
		logf("record the failure in %s: %v", r.CowFile, err)
	}
}

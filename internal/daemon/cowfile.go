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
	"github.com/dbdublk/dbdublk/internal/frontfs"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/internal/state"
)

// selfExe names the running binary, deleted or unreachable from this
// process's root as it may be.
const selfExe = "/proc/self/exe"

// frontFS returns the helper process that does the server's work on the
// filesystems of its own front device, starting one if there is none or
// the last one is gone. No thread of the server may wait in the kernel
// for I/O it serves itself: killed there, the server could never finish
// exiting and its device would hang for good (see frontfs).
func (s *Server) frontFS() (*frontfs.Helper, error) {
	s.fsMu.Lock()
	defer s.fsMu.Unlock()
	if s.fs != nil && !s.fs.Gone() {
		return s.fs, nil
	}
	if s.fs != nil {
		s.fs.Close()
		s.fs = nil
	}
	// The server's own binary, whatever its path: the helper speaks its
	// protocol, and a boot server's binary is the initramfs's, gone from
	// any path once the real root took over.
	argv0 := ""
	if s.cfg.Boot {
		argv0 = protocol.BootArgv0 // systemd spares it at shutdown, as it does the server
	}
	h, err := frontfs.Start(selfExe, argv0, frontfs.Command)
	if err != nil {
		return nil, err
	}
	s.fs = h
	return h, nil
}

// closeFrontFS ends the helper, if one runs.
func (s *Server) closeFrontFS() {
	s.fsMu.Lock()
	defer s.fsMu.Unlock()
	if s.fs != nil {
		s.fs.Close()
		s.fs = nil
	}
}

// frontRdev is the front device's number: the st_dev of the files on the
// filesystem mounted from it.
func (s *Server) frontRdev() (uint64, error) {
	var front unix.Stat_t
	if err := unix.Stat(s.FrontPath(), &front); err != nil {
		return 0, fmt.Errorf("stat %s: %w", s.FrontPath(), err)
	}
	return uint64(front.Rdev), nil
}

// checkCowPath refuses a COW path that cannot work, before anything
// changes (in the helper: the path may be on the front device's
// filesystem). It reports whether the path is on the filesystem mounted
// from the front device itself (dattobd's default layout, see
// cow/mapped.go).
func (s *Server) checkCowPath(path string) (onVolume bool, err error) {
	h, err := s.frontFS()
	if err != nil {
		return false, err
	}
	onVolume, err = h.CheckCowPath(frontfs.CowPath{Path: path, BlockDevice: s.cfg.BlockDevice, DeviceRdev: s.bdev.Rdev, FrontPath: s.FrontPath(), Inserted: s.insertedRdev()})
	if err == nil && s.boot != nil && !onVolume {
		// The initramfs resumes the tracking before any other
		// filesystem is mounted.
		return false, protocol.Errorf(protocol.ErrInvalid, "%s is not on the root volume %s: a volume attached at boot keeps its COW file on itself (e.g. /.datto)", path, s.cfg.BlockDevice)
	}
	return onVolume, err
}

// createCow creates a COW file, on the volume itself or elsewhere. One on
// the volume is made by the helper, through the volume's filesystem, and
// opened here at its extents on the device, which it also returns with
// its inode number.
func (s *Server) createCow(path string, onVolume bool, opt cow.Options) (c *cow.File, extents []cow.Extent, ino uint64, err error) {
	if !onVolume {
		c, err = cow.Create(path, opt)
		return c, nil, 0, err
	}
	h, err := s.frontFS()
	if err != nil {
		return nil, nil, 0, err
	}
	if extents, ino, err = h.CreateOnVolume(path, s.realDevice(), opt); err != nil {
		return nil, nil, 0, err
	}
	where, err := cow.DeviceStorage(s.realDevice(), extents)
	if err == nil {
		c, _, err = cow.Open(path, where, cow.ReloadSnapshot, opt.DeviceSize, opt.CacheBytes)
	}
	if err != nil {
		s.removeCow(path, ino)
		return nil, nil, 0, err
	}
	s.log.Printf("COW file %s is on the snapshotted volume: %d extents, written at their places on %s", path, len(extents), s.realDevice())
	return c, extents, ino, nil
}

// releaseCow closes a COW file the server stops writing (clean, or not)
// and, for one on the volume (inode ino), lets its filesystem have it
// back: its cached pages are dropped, so readers through the filesystem
// (update-img) see what was written at its extents, and it is no longer
// immutable (the user removes it when the image is updated).
func (s *Server) releaseCow(c *cow.File, ino uint64, clean bool) error {
	err := c.Close(clean)
	if c.Mapped() {
		if uerr := s.unpin(c.Path(), ino); uerr != nil {
			s.log.Printf("release %s to its filesystem: %v", c.Path(), uerr)
		}
	}
	return err
}

// unpin gives a COW file on the volume back to its filesystem: its cached
// pages are dropped and it is no longer immutable.
func (s *Server) unpin(path string, ino uint64) error {
	front, err := s.fsDev()
	if err != nil {
		return err
	}
	h, err := s.frontFS()
	if err != nil {
		return err
	}
	return h.Unpin(path, front, ino)
}

// removeCow removes a COW file the server no longer uses: one on the
// volume (ino not 0) through the helper, given back to its filesystem
// first (it is immutable).
func (s *Server) removeCow(path string, ino uint64) {
	var err error
	if ino == 0 {
		if err = os.Remove(path); errors.Is(err, os.ErrNotExist) {
			err = nil
		}
	} else {
		var front uint64
		var h *frontfs.Helper
		if front, err = s.fsDev(); err == nil {
			if h, err = s.frontFS(); err == nil {
				err = h.Remove(path, front, ino)
			}
		}
	}
	if err != nil {
		s.log.Printf("remove %s: %v", path, err)
	}
}

// releaseStore gives a snapshot's data store on the volume back to its
// filesystem once the snapshot is over. The store's blocks showed as zeros
// in the snapshot (and so in its image), but hold COW data the server
// wrote directly, which the tracking never saw: they are zeroed on the
// device first, so the next snapshot agrees with the image there. The
// index stays where it is, still written at its extents. (Truncating the
// file through its filesystem, in the helper, only frees space; a failure
// there is logged.)
func (s *Server) releaseStore(c *cow.File) error {
	end := cow.DataOffset(c.Blocks())
	for _, x := range s.snap.extents {
		lo := max(x.Logical, end)
		if lo >= x.Logical+x.Length {
			continue
		}
		if err := s.bdev.ZeroOut(x.Physical+lo-x.Logical, x.Logical+x.Length-lo); err != nil {
			return fmt.Errorf("zero the data store of %s on %s: %w", c.Path(), s.realDevice(), err)
		}
	}
	s.snap.extents = clipExtents(s.snap.extents, end)
	front, err := s.fsDev()
	var h *frontfs.Helper
	if err == nil {
		if h, err = s.frontFS(); err == nil {
			err = h.Truncate(s.snap.cowPath, front, s.snap.ino, end)
		}
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

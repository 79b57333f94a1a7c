package daemon

import (
	"errors"
	"fmt"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/state"
	"github.com/dbdublk/dbdublk/internal/track"
)

// Reload says which COW file to resume tracking from, and how.
type Reload struct {
	Mode       dattobd.Mode // Snapshot or Incremental
	CowFile    string
	CacheBytes int64 // 0 = cow.DefaultCacheBytes
	FallocMiB  int64 // the size transition-to-snapshot reuses; 0 = default
	// Extents, for a COW file on the volume itself, say where it lies on
	// the device: it is opened there, without its filesystem.
	Extents []cow.Extent
	// PrevExtents are the previous COW file's, for a snapshot (see
	// session.prevExtents).
	PrevExtents []cow.Extent
	// Relative is the COW file's path below its volume's mount point.
	Relative string
	// Inode is a COW file on the volume's inode number.
	Inode uint64
	// resume is set when the server that had this file died while the
	// machine kept running: a dirty snapshot is then provably intact.
	resume bool
}

// reload resumes tracking from r's COW file before the front device
// starts, so no write escapes it. An incremental file left dirty by a
// crash is recovered from its write-intent record; anything not provably
// intact is refused and left as it is.
func (s *Server) reload(r Reload) error {
	if len(r.Extents) == 0 {
		// A COW file on the volume itself is opened where it lies on the
		// device: its filesystem is not mounted yet.
		if rec, ok := state.OnVolume(s.cfg.Minor, r.CowFile); ok {
			r.CowFile, r.Extents, r.PrevExtents, r.Relative, r.Inode = rec.CowFile, rec.CowExtents, rec.PrevCowExtents, rec.CowRelative, rec.CowInode
		}
	}
	if r.CacheBytes <= 0 {
		r.CacheBytes = cow.DefaultCacheBytes
	}
	c, err := s.openCow(r)
	if err != nil {
		if r.Mode == dattobd.Snapshot && errors.Is(err, cow.ErrChangeList) {
			if rec, ok := state.Find(s.cfg.Minor); ok && rec.Mode == dattobd.Snapshot && rec.CowFile == r.CowFile {
				// Recorded as a snapshot, already a change list: the
				// crash came amid transition-to-incremental. The writes
				// since are in the file only if it got as far as its
				// write-intent record; no guessing.
				return fmt.Errorf("%w: transition-to-incremental was cut short by a crash; a full backup is required", err)
			}
		}
		return err
	}
	var extents []cow.Extent
	if r.Mode == dattobd.Snapshot {
		// the snapshot device shows them as zeros
		extents = s.withBootRecord(append(append([]cow.Extent(nil), r.Extents...), r.PrevExtents...))
	}
	if err := s.trk.Swap(r.Mode, c, track.BudgetIndex(c, r.CacheBytes), extents); err != nil {
		c.Close(false)
		return err
	}
	limitGoMemory(r.CacheBytes)
	s.snap = &session{cowPath: r.CowFile, cacheBytes: r.CacheBytes, fallocMiB: r.FallocMiB, extents: r.Extents, relative: r.Relative, ino: r.Inode}
	if r.Mode == dattobd.Snapshot {
		s.snap.prevExtents = r.PrevExtents
	}
	h := c.Header()
	s.log.Printf("reloaded %s mode from %s: seq %d, %d changed blocks", r.Mode, r.CowFile, h.SeqID, c.NrChangedBlocks())
	return nil
}

// openCow opens r's COW file in the way r's mode and history call for:
// where its bytes are (the file, or its extents on the device), and
// whether a dirty file may be recovered.
func (s *Server) openCow(r Reload) (*cow.File, error) {
	var how cow.Mode
	switch {
	case r.Mode == dattobd.Incremental:
		how = cow.ReloadIncremental
	case r.Mode == dattobd.Snapshot && r.resume:
		how = cow.ResumeSnapshot
	case r.Mode == dattobd.Snapshot:
		how = cow.ReloadSnapshot
	default:
		return nil, fmt.Errorf("cannot reload in %s mode", r.Mode)
	}
	var where cow.Storage
	var err error
	if len(r.Extents) > 0 {
		where, err = cow.DeviceStorage(s.realDevice(), r.Extents)
		if err != nil {
			return nil, fmt.Errorf("cow file %s: open %s: %w", r.CowFile, s.realDevice(), err)
		}
	} else if where, err = cow.FileStorage(r.CowFile, false); err != nil {
		return nil, err
	}
	c, rec, err := cow.Open(r.CowFile, where, how, s.bdev.Size(), r.CacheBytes)
	if err != nil {
		return nil, err
	}
	if r.Mode != dattobd.Incremental {
		return c, nil
	}
	if rec.Crashed {
		s.log.Printf("%s was not closed cleanly: replayed its write-intent record, %d regions of %d bytes, %d more blocks marked",
			r.CowFile, rec.Regions, rec.RegionBytes, rec.Marked)
	}
	if err := c.EnableIntent(); err != nil {
		c.Close(false)
		return nil, err
	}
	return c, nil
}

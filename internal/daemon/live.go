package daemon

import (
	"fmt"
	"syscall"
	"time"

	"github.com/dbdublk/dbdublk/internal/blockdev"
	"github.com/dbdublk/dbdublk/internal/failpoint"
	"github.com/dbdublk/dbdublk/internal/insert"
	"github.com/dbdublk/dbdublk/internal/linux"
	"github.com/dbdublk/dbdublk/internal/state"
)

// Live insertion: a device-mapper volume that is in use (mounted) is not
// opened; the front device is inserted under it (see internal/insert).
// The server serves the hidden device that carries the volume's original
// table, and the volume, its name, its mount and fstab stay as they were.

// liveWatchEvery is how often a live-inserted volume's table is read back:
// a table reloaded behind the server's back (lvextend, lvchange --refresh)
// sends writes past the server, so tracking can no longer be trusted.
const liveWatchEvery = time.Second

// liveRoute reports whether path goes the live route: a device-mapper
// volume that is in use, or that its minor's record says was inserted
// (so that reload-all brings it back the same way before it is mounted).
// A server taking over from a dead one takes the route the record names:
// the dead server's io_uring may still hold a plain device open.
func liveRoute(path string, rec *state.Record, recovering bool) (bool, error) {
	if recovering {
		return rec.Live != nil, nil
	}
	rdev, err := blockdev.Rdev(path)
	if err != nil {
		return false, err
	}
	if blockdev.DMName(rdev) == "" {
		return false, nil
	}
	if rec.Live != nil {
		return true, nil
	}
	return blockdev.Opened(rdev), nil
}

// openLive creates (or, recovering, finds) the hidden device and opens it
// as the real device.
func (s *Server) openLive(recovering bool, prev state.Record) (*blockdev.Device, error) {
	var err error
	if s.dm, err = linux.OpenDMControl(); err != nil {
		return nil, err
	}
	var hidden uint64
	if recovering {
		// The volume may map the front device still: until resumeLive
		// has looked, the hidden device is the only copy of its table.
		s.live, s.redirected = prev.Live, true
		if hidden, err = s.live.HiddenDev(s.dm); err != nil {
			return nil, fmt.Errorf("the hidden device of %s: %w", s.cfg.BlockDevice, err)
		}
	} else {
		if prev.Live != nil {
			if err := prev.Live.DropStale(s.dm); err != nil {
				return nil, err
			}
		}
		rdev, err := blockdev.Rdev(s.cfg.BlockDevice)
		if err != nil {
			return nil, err
		}
		if s.live, hidden, err = insert.Begin(s.dm, rdev, s.cfg.Minor, blockdev.IsUblk); err != nil {
			return nil, err
		}
	}
	node, err := blockdev.Node(hidden)
	if err != nil {
		return nil, err
	}
	s.log.Printf("%s is in use: inserting %s under it (its original table is served from %s, %s)",
		s.cfg.BlockDevice, s.FrontPath(), s.live.Hidden, node)
	if recovering {
		return s.openAfterDeath(node)
	}
	return blockdev.Open(node)
}

// realDevice is the device the server reads and writes: the one the user
// named, or the hidden device of a live insertion.
func (s *Server) realDevice() string {
	if s.bdev != nil {
		return s.bdev.Path
	}
	return s.cfg.BlockDevice
}

// fsDev is the st_dev of the files on the volume's own filesystem: the
// front device's, or the volume's when the front device is inserted
// under it.
func (s *Server) fsDev() (uint64, error) {
	if s.live != nil {
		return blockdev.Rdev(s.cfg.BlockDevice)
	}
	return s.frontRdev()
}

// insertedRdev is the volume's number when the front device is inserted
// under it (its filesystem is then the volume's own), or 0.
func (s *Server) insertedRdev() uint64 {
	if s.live == nil {
		return 0
	}
	rdev, _ := blockdev.Rdev(s.cfg.BlockDevice)
	return rdev
}

// redirectLive sends the volume's I/O to the front device once it serves.
// The record naming the insertion is written first: a server that dies
// from here on is replaced by one that finds the hidden device.
func (s *Server) redirectLive() error {
	front, err := s.frontRdev()
	if err != nil {
		return err
	}
	if err := failpoint.Check("attach/redirect"); err != nil {
		return err
	}
	if err := s.live.Redirect(s.dm, front); err != nil {
		return fmt.Errorf("insert %s under %s: %w; %s is as it was", s.FrontPath(), s.cfg.BlockDevice, err, s.cfg.BlockDevice)
	}
	s.redirected = true
	s.log.Printf("%s now reaches its devices through %s", s.cfg.BlockDevice, s.FrontPath())
	go s.watchLive()
	return nil
}

// resumeLive, in a server taking over from a dead one, puts the volume
// back on the front device whatever step the dead server died in: a
// volume left suspended is resumed, one still on its original table is
// redirected, one whose table someone else replaced fails tracking.
func (s *Server) resumeLive() {
	front, err := s.frontRdev()
	if err == nil {
		var st insert.State
		st, err = s.live.Recover(s.dm, front)
		switch {
		case err != nil:
		case st == insert.Original:
			err = s.redirectLive()
		case st == insert.Inserted:
			s.redirected = true
			go s.watchLive()
		default:
			s.lostVolume(fmt.Errorf("the table of %s was replaced while its server was down: its writes no longer pass through %s",
				s.cfg.BlockDevice, s.FrontPath()))
		}
	}
	if err != nil {
		s.log.Printf("put %s back on %s: %v", s.cfg.BlockDevice, s.FrontPath(), err)
		s.trk.Fail(syscall.EIO, fmt.Errorf("%s could not be put back on %s after the server died (%v): its writes are not tracked", s.cfg.BlockDevice, s.FrontPath(), err))
	}
}

// watchLive checks the volume's table every liveWatchEvery until detach.
// A table that is no longer the redirect, or that cannot be read, means
// writes may bypass the front device: tracking fails.
func (s *Server) watchLive() {
	front, err := s.frontRdev()
	if err != nil {
		s.lostVolume(fmt.Errorf("cannot watch the table of %s: %w", s.cfg.BlockDevice, err))
		return
	}
	s.every(liveWatchEvery, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		if !s.redirected || s.dm == nil {
			return false // detaching, or taken out already
		}
		switch st, err := s.live.Check(s.dm, front); {
		case err != nil:
			s.lostVolume(fmt.Errorf("the table of %s cannot be read (%v), so nothing says its writes still pass through %s",
				s.cfg.BlockDevice, err, s.FrontPath()))
		case st != insert.Inserted:
			s.lostVolume(fmt.Errorf("the table of %s was reloaded behind dbdctl's back (lvextend, lvchange --refresh, dmsetup?): its writes no longer pass through %s",
				s.cfg.BlockDevice, s.FrontPath()))
		default:
			return true
		}
		return false
	})
}

// lostVolume handles a volume whose writes may bypass the front device
// from now on: the changed-block list cannot be trusted.
func (s *Server) lostVolume(why error) {
	s.redirected = false
	why = fmt.Errorf("%w, so the changed-block list cannot be trusted; a full backup is required", why)
	s.log.Printf("ALERT: %v", why)
	if s.trk.Current().Mode.Tracking() {
		s.trk.Fail(syscall.EIO, why)
	}
}

// restoreLive puts the volume's original table back before the front
// device goes. The suspend this needs waits for the volume's I/O through
// the front device, so it runs in the helper process (a server killed
// while waiting could never exit, see frontfs).
func (s *Server) restoreLive() error {
	if !s.redirected {
		return nil
	}
	h, err := s.frontFS()
	if err != nil {
		return err
	}
	if err := h.RestoreVolume(*s.live); err != nil {
		return fmt.Errorf("put %s back on its own devices: %w", s.cfg.BlockDevice, err)
	}
	s.redirected = false
	s.log.Printf("%s is back on its own devices", s.cfg.BlockDevice)
	return nil
}

// endLive removes the hidden device once the real device is closed. The
// record keeps the insertion only while tracking is dormant.
func (s *Server) endLive() {
	if s.dm == nil {
		return
	}
	if s.live != nil && !s.redirected {
		if err := s.live.RemoveHidden(s.dm); err != nil {
			s.log.Printf("remove %s: %v", s.live.Hidden, err)
		}
	}
	s.dm.Close()
	s.dm = nil
}

// checkLiveDetach refuses to take the front device out from under a
// tracked volume that is in use: its writes after that would be missing
// from the next incremental, with nobody told.
func (s *Server) checkLiveDetach() error {
	if s.live == nil || !s.trk.Current().Mode.Tracking() {
		return nil
	}
	rdev, err := blockdev.Rdev(s.cfg.BlockDevice)
	if err != nil {
		return err
	}
	if blockdev.Opened(rdev) {
		return fmt.Errorf("%s is in use and minor %d tracks it: after a detach its writes would be missing from the next incremental; unmount it first (it is left dormant), or destroy %d (the next backup is full)",
			s.cfg.BlockDevice, s.cfg.Minor, s.cfg.Minor)
	}
	return nil
}

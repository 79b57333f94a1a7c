package daemon

import (
	"encoding/hex"
	"os"
	"sync"
	"time"

	"github.com/dbdublk/dbdublk/backup"
	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/internal/track"
)

// The server's view of its snapshot is read on update-img's ring.
var _ backup.RingSource = (*track.View)(nil)

// progressEvery spaces update-img's progress reports.
const progressEvery = 200 * time.Millisecond

// UpdateImage is update-img served by the snapshot's own server: it copies
// the blocks the previous snapshot's COW file (files[0]) marks as changed
// from the current snapshot into its image (files[1]), reading the real
// device and the COW store itself rather than through the snapshot
// device, so no request makes a round trip through ublk. The client has
// checked both files; the change list is checked again here against the
// snapshot this server holds. The server's lock is not held while copying:
// a transition or destroy meanwhile makes the view's reads fail (EIO), so
// the copy stops rather than write blocks of another instant.
func (s *Server) UpdateImage(a protocol.UpdateImage, files []*os.File, progress func(protocol.Progress)) (protocol.UpdateImageDone, error) {
	var view *track.View
	var snap backup.Snapshot
	err := s.tracking(protocol.OpUpdateImage, func() error {
		st := s.trk.Current()
		if st.Mode != dattobd.Snapshot || s.snap == nil {
			return protocol.Errorf(protocol.ErrWrongMode, "minor %d has no active snapshot", s.cfg.Minor)
		}
		if x := s.failed(); x != nil {
			return protocol.Errorf(protocol.ErrFailed, "the snapshot of minor %d has failed (%s); its data cannot be trusted", s.cfg.Minor, x.Reason)
		}
		h := st.Cow.Header()
		if hex.EncodeToString(h.UUID[:]) != a.UUID || h.SeqID != a.SeqID {
			return protocol.Errorf(protocol.ErrInvalid, "the snapshot of minor %d is now %s seq %d, not the one update-img checked (%s seq %d)",
				s.cfg.Minor, hex.EncodeToString(h.UUID[:]), h.SeqID, a.UUID, a.SeqID)
		}
		view = s.trk.View(st)
		snap = backup.Snapshot{Path: s.cfg.Minor.DattoPath(), UUID: h.UUID, SeqID: h.SeqID, Size: s.bdev.Size()}
		return nil
	})
	if err != nil {
		return protocol.UpdateImageDone{}, err
	}
	const name = "passed by update-img"
	store, err := cow.StorageOf(files[0], name, true)
	if err != nil {
		return protocol.UpdateImageDone{}, protocol.Errorf(protocol.ErrInvalid, "%v", err)
	}
	c, _, err := cow.Open(name, store, cow.ReadOnly, 0, 0)
	if err != nil {
		return protocol.UpdateImageDone{}, protocol.Errorf(protocol.ErrInvalid, "%v", err)
	}
	defer c.Close(false)
	if err := backup.CheckCow(c, snap, name); err != nil {
		return protocol.UpdateImageDone{}, protocol.Errorf(protocol.ErrInvalid, "%v", err)
	}
	var mu sync.Mutex
	var last time.Time
	report := func(done, total int64) {
		mu.Lock()
		defer mu.Unlock()
		if now := time.Now(); done == total || now.Sub(last) >= progressEvery {
			last = now
			progress(protocol.Progress{Done: done, Total: total})
		}
	}
	sum, err := backup.Copy(c, view, files[1], snap.Size, backup.Options{Workers: a.Workers, Progress: report})
	if err != nil {
		s.log.Printf("update-img into an image failed: %v", err)
		return protocol.UpdateImageDone{}, err
	}
	s.log.Printf("update-img: copied %d changed blocks (%d bytes) of snapshot %d into an image in %.2f s, reading the device directly",
		sum.BlocksChanged, sum.BytesCopied, snap.SeqID, sum.Seconds)
	return protocol.UpdateImageDone{BlocksChanged: sum.BlocksChanged, BytesCopied: sum.BytesCopied, Seconds: sum.Seconds}, nil
}

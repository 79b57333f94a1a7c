package track

import (
	"syscall"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/dio"
	"github.com/dbdublk/dbdublk/ublk"
	"github.com/dbdublk/dbdublk/ublk/uapi"
)

var (
	_ ublk.ReadFinisher     = (*View)(nil)
	_ ublk.WriteInterceptor = (*View)(nil)
)

// View is the backend of the snapshot device: the real device as it was at
// the snapshot instant. A block whose old contents were preserved is read
// from the COW file, any other block from the real device. Once the
// snapshot has failed (COW store full, I/O error), every read returns EIO:
// a failed snapshot fails closed, never with data written after it.
type View struct {
	t  *Tracker
	st *State // the snapshot state this device serves
}

// View returns the backend of the snapshot that st (a snapshot state of t)
// holds.
func (t *Tracker) View(st *State) *View { return &View{t: t, st: st} }

// FD lets the queues read the real device through their rings; FinishRead
// then overlays what the snapshot preserved.
func (v *View) FD() int { return v.t.FD() }

// CanDiscard is false: nothing is ever written through a snapshot.
func (v *View) CanDiscard() bool { return false }

// BeforeWrite refuses every modifying request (the kernel already rejects
// writes to a read-only disk; this keeps them off the real device even so).
func (v *View) BeforeWrite(uapi.IOOp, int64, int64, func(error)) (uint64, ublk.WriteAction, error) {
	return 0, ublk.WriteProceed, syscall.EROFS
}

// AfterWrite has nothing to settle.
func (v *View) AfterWrite(uint64) {}

// FinishRead turns bytes read from the real device at off into the
// snapshot's view: every block the COW file holds is overlaid. The index is
// looked up after the device read: a front write to a block is only issued
// after its old data is in the COW file and indexed, so a block still
// unindexed after the read was read before any post-snapshot write reached
// it.
func (v *View) FinishRead(p []byte, off int64) error {
	if v.broken() {
		return syscall.EIO
	}
	end := off + int64(len(p))
	first := uint64(off) / cow.BlockSize
	last := (uint64(end) + cow.BlockSize - 1) / cow.BlockSize
	var blk []byte
	for b := first; b < last; b++ {
		e, err := v.st.Cow.Lookup(b)
		if err != nil {
			return syscall.EIO
		}
		if e <= 1 {
			continue
		}
		if blk == nil {
			blk = make([]byte, cow.BlockSize)
		}
		if err := v.st.Cow.ReadBlock(e, blk); err != nil {
			return syscall.EIO
		}
		bstart := int64(b) * cow.BlockSize
		lo, hi := max(bstart, off), min(bstart+cow.BlockSize, end)
		copy(p[lo-off:hi-off], blk[lo-bstart:hi-bstart])
	}
	// A COW file on the volume itself holds live COW data at its extents;
	// the snapshot shows them as zeros (its filesystem reads the file's
	// preallocated blocks as zeros anyway), so backups carry none of it.
	for _, x := range v.st.CowExtents {
		lo, hi := max(x.Physical, off), min(x.Physical+x.Length, end)
		if lo < hi {
			clear(p[lo-off : hi-off])
		}
	}
	// A failure before or during the read may mean a block was overwritten
	// without being preserved: refuse the whole read.
	if v.broken() {
		return syscall.EIO
	}
	return nil
}

// ReadAt reads the snapshot at off into p, which is aligned for O_DIRECT:
// the real device, then FinishRead's overlay. It is what a read of the
// snapshot device returns, without the trip through it (update-img in the
// server).
func (v *View) ReadAt(p []byte, off int64) error {
	if err := dio.ReadFull(v.t.FD(), p, off); err != nil {
		return err
	}
	return v.FinishRead(p, off)
}

// broken reports a failed snapshot, or one that is no longer current.
func (v *View) broken() bool {
	cur := v.t.Current()
	return v.t.failed.Load() != 0 || cur.Cow != v.st.Cow || cur.Mode != dattobd.Snapshot
}

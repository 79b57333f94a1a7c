package server

import (
	"syscall"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/ublk"
	"github.com/dbdublk/dbdublk/ublk/uapi"
)

var (
	_ ublk.ReadFinisher     = (*snapView)(nil)
	_ ublk.WriteInterceptor = (*snapView)(nil)
)

// snapView is the backend of the snapshot device: the real device as it was
// at the snapshot instant. A block whose old contents were preserved is read
// from the COW file, any other block from the real device. Once the
// snapshot has failed (COW store full, I/O error), every read returns EIO:
// a failed snapshot fails closed, never with data written after it.
type snapView struct {
	t  *tracker
	st *trackState // the snapshot state this device serves
}

// ReadAt serves a snapshot read. p is a queue buffer (page aligned) and
// off is aligned to the logical block size.
func (v *snapView) ReadAt(p []byte, off int64) (int, error) {
	if v.broken() {
		return 0, syscall.EIO
	}
	end := off + int64(len(p))
	if end > v.t.Size {
		end = v.t.Size
	}
	if off >= end {
		return 0, nil
	}
	p = p[:end-off]
	if err := preadFull(v.t.fd, p, off); err != nil {
		return 0, err
	}
	if err := v.FinishRead(p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// FD lets the queues read the real device through their rings; FinishRead
// then overlays what the snapshot preserved.
func (v *snapView) FD() int { return v.t.fd }

// CanDiscard is false: nothing is ever written through a snapshot.
func (v *snapView) CanDiscard() bool { return false }

// BeforeWrite refuses every modifying request (the kernel already rejects
// writes to a read-only disk; this keeps them off the real device even so).
func (v *snapView) BeforeWrite(uapi.IOOp, int64, int64, func(error)) (uint64, ublk.WriteAction, error) {
	return 0, ublk.WriteProceed, syscall.EROFS
}

// AfterWrite has nothing to settle.
func (v *snapView) AfterWrite(uint64) {}

// FinishRead turns bytes read from the real device at off into the
// snapshot's view: every block the COW file holds is overlaid. The index is
// looked up after the device read: a front write to a block is only issued
// after its old data is in the COW file and indexed, so a block still
// unindexed after the read was read before any post-snapshot write reached
// it.
func (v *snapView) FinishRead(p []byte, off int64) error {
	end := off + int64(len(p))
	first := uint64(off) / cow.BlockSize
	last := (uint64(end) + cow.BlockSize - 1) / cow.BlockSize
	var blk []byte
	for b := first; b < last; b++ {
		e, err := v.st.cow.Lookup(b)
		if err != nil {
			return syscall.EIO
		}
		if e <= 1 {
			continue
		}
		if blk == nil {
			blk = make([]byte, cow.BlockSize)
		}
		if err := v.st.cow.ReadBlock(e, blk); err != nil {
			return syscall.EIO
		}
		bstart := int64(b) * cow.BlockSize
		lo, hi := max(bstart, off), min(bstart+cow.BlockSize, end)
		copy(p[lo-off:hi-off], blk[lo-bstart:hi-bstart])
	}
	// A COW file on the volume itself holds live COW data at its extents;
	// the snapshot shows them as zeros (its filesystem reads the file's
	// preallocated blocks as zeros anyway), so backups carry none of it.
	for _, x := range v.st.cowExtents {
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

// broken reports a failed snapshot, or one that is no longer current.
func (v *snapView) broken() bool {
	return v.t.failed.Load() != 0 || v.t.current().cow != v.st.cow || v.t.current().mode != ModeSnapshot
}

// WriteAt refuses: the snapshot device is read-only (the kernel already
// rejects writes to a read-only disk; this is the second line).
func (v *snapView) WriteAt(p []byte, off int64) (int, error) { return 0, syscall.EROFS }

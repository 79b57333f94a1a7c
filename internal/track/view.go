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
	_ ublk.ReadPatcher      = (*View)(nil)
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
// snapshot's view: it applies PatchRead's patches to p (copy mode).
func (v *View) FinishRead(p []byte, off int64) error {
	patches, err := v.PatchRead(off, len(p), nil)
	if err != nil {
		return err
	}
	for _, x := range patches {
		q := p[x.At : x.At+x.Len]
		if x.FD == ublk.PatchZeros {
			clear(q)
			continue
		}
		if err := readPatch(x.FD, q, x.Off); err != nil {
			return syscall.EIO
		}
	}
	return v.FinishPatchedRead(off, len(p))
}

// readPatch reads a patch into q, through an aligned bounce buffer where
// q or at does not suit the descriptor's O_DIRECT (the real device's, for
// a COW file on the volume itself).
func readPatch(fd int, q []byte, at int64) error {
	if dio.IsAligned(q) && at%dio.Align == 0 && len(q)%dio.Align == 0 {
		if err := dio.ReadFull(fd, q, at); err == nil {
			return nil
		}
	}
	start := at / dio.Align * dio.Align
	end := (at + int64(len(q)) + dio.Align - 1) / dio.Align * dio.Align
	b := dio.AlignedBuf(int(end - start))
	if err := dio.ReadFull(fd, b, start); err != nil {
		return err
	}
	copy(q, b[at-start:])
	return nil
}

// lookupBatch is how many blocks' index entries PatchRead looks up at
// once: a 1 MiB request's.
const lookupBatch = 256

// PatchRead says what of n bytes read from the real device at off must be
// replaced for the snapshot's view: every block the COW file holds comes
// from its slot (adjacent slots in one patch), and the COW file's own
// extents on the volume read as zeros. The index is looked up after the
// device read: a front write to a block is only issued after its old data
// is in the COW file and indexed, so a block still unindexed after the
// read was read before any post-snapshot write reached it.
func (v *View) PatchRead(off int64, n int, patches []ublk.ReadPatch) ([]ublk.ReadPatch, error) {
	if v.broken() {
		return nil, syscall.EIO
	}
	end := off + int64(n)
	first := uint64(off) / cow.BlockSize
	last := (uint64(end) + cow.BlockSize - 1) / cow.BlockSize
	var entries [lookupBatch]uint64
	for next := first; next < last; {
		batch := entries[:min(last-next, lookupBatch)]
		if err := v.st.Cow.LookupRange(next, batch); err != nil {
			return nil, syscall.EIO
		}
		for i, e := range batch {
			if e <= 1 {
				continue
			}
			fd, at, err := v.st.Cow.SlotSource(e)
			if err != nil {
				return nil, syscall.EIO
			}
			bstart := int64(next+uint64(i)) * cow.BlockSize
			lo, hi := max(bstart, off), min(bstart+cow.BlockSize, end)
			x := ublk.ReadPatch{At: int(lo - off), Len: int(hi - lo), FD: fd, Off: at + (lo - bstart)}
			if k := len(patches) - 1; k >= 0 && patches[k].FD == x.FD && patches[k].At+patches[k].Len == x.At &&
				patches[k].Off+int64(patches[k].Len) == x.Off {
				patches[k].Len += x.Len
				continue
			}
			patches = append(patches, x)
		}
		next += uint64(len(batch))
	}
	// A COW file on the volume itself holds live COW data at its extents;
	// the snapshot shows them as zeros (its filesystem reads the file's
	// preallocated blocks as zeros anyway), so backups carry none of it.
	for _, x := range v.st.CowExtents {
		lo, hi := max(x.Physical, off), min(x.Physical+x.Length, end)
		if lo < hi {
			patches = append(cut(patches, int(lo-off), int(hi-off)), ublk.ReadPatch{At: int(lo - off), Len: int(hi - lo), FD: ublk.PatchZeros})
		}
	}
	return patches, nil
}

// cut removes bytes [lo, hi) of the request from every patch, so that no
// two patches overlap (their reads run in any order).
func cut(patches []ublk.ReadPatch, lo, hi int) []ublk.ReadPatch {
	out := patches[:0:0]
	for _, p := range patches {
		pEnd := p.At + p.Len
		if pEnd <= lo || p.At >= hi {
			out = append(out, p)
			continue
		}
		if p.At < lo {
			out = append(out, ublk.ReadPatch{At: p.At, Len: lo - p.At, FD: p.FD, Off: p.Off})
		}
		if pEnd > hi {
			skip := hi - p.At
			out = append(out, ublk.ReadPatch{At: hi, Len: pEnd - hi, FD: p.FD, Off: p.Off + int64(skip)})
		}
	}
	return out
}

// FinishPatchedRead refuses the read if the snapshot failed before or
// during it: a block may have been overwritten without being preserved.
func (v *View) FinishPatchedRead(int64, int) error {
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

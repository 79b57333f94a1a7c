package backup

import (
	"errors"
	"fmt"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/ublk/uapi"
	"github.com/dbdublk/dbdublk/ublk/uring"
)

// RingSource is a Source whose reads the copy can issue on an io_uring: a
// read of FD (O_DIRECT) at the snapshot's own offset, then FinishRead on
// the bytes read. The snapshot's own server is one: it reads the real
// device, then overlays what the COW store preserved (track.View).
type RingSource interface {
	Source
	FD() int
	FinishRead(p []byte, off int64) error
}

// Small copies go through a ring: scattered 4 KiB changes are one read and
// one write each, and issuing them as batches on an io_uring spares the
// two system calls and thread hand-offs per block that the copiers pay
// (the block rate was CPU-bound on them). Larger copies stay with the
// copiers, which are bound by the disks instead.
const (
	ringSlots     = 128      // copies in flight on the ring
	ringCopyBytes = 32 << 10 // the largest copy the ring takes
)

// ringCopier copies small extents on an io_uring: each slot's extent is
// read into its own slice of an off-heap buffer, finished (FinishRead),
// then written to the image's O_DIRECT descriptor.
type ringCopier struct {
	ring  *uring.Ring
	mem   []byte // ringSlots × ringCopyBytes, mmapped: the kernel writes it
	src   RingSource
	dst   *sink
	slots [ringSlots]ringSlot
	free  []int
	cqes  []uapi.CQE
}

type ringSlot struct {
	e       extent
	writing bool
}

// newRingCopier sets up a ring copier, or says why there is none (no
// io_uring, or an image without O_DIRECT): the copiers then take every
// extent.
func newRingCopier(src RingSource, dst *sink) (*ringCopier, error) {
	if dst.direct == nil {
		return nil, errors.New("the image has no O_DIRECT descriptor")
	}
	ring, err := uring.New(uring.Options{Entries: ringSlots})
	if err != nil {
		return nil, err
	}
	mem, err := unix.Mmap(-1, 0, ringSlots*ringCopyBytes, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		ring.Close()
		return nil, err
	}
	r := &ringCopier{ring: ring, mem: mem, src: src, dst: dst, cqes: make([]uapi.CQE, ringSlots)}
	for i := ringSlots - 1; i >= 0; i-- {
		r.free = append(r.free, i)
	}
	return r, nil
}

func (r *ringCopier) close() {
	r.ring.Close()
	unix.Munmap(r.mem)
}

// takes reports whether an extent is the ring's: small, and whole blocks
// (a partial last block is read through the buffered descriptor).
func takes(e extent) bool {
	return e.n <= ringCopyBytes && e.off%cow.BlockSize == 0 && e.n%cow.BlockSize == 0
}

func (r *ringCopier) buf(i int, n int64) []byte {
	return r.mem[i*ringCopyBytes : i*ringCopyBytes+int(n)]
}

// run copies the extents of work until it is closed, calling done after
// each copy and fail at each error; after an error it only drains work.
func (r *ringCopier) run(work <-chan extent, done func(n int64), fail func(error)) {
	inFlight, open, failed := 0, true, false
	for open || inFlight > 0 {
		for open && len(r.free) > 0 {
			var e extent
			if inFlight == 0 {
				e, open = <-work
			} else {
				select {
				case e, open = <-work:
				default:
					goto submit
				}
			}
			if !open {
				break
			}
			if failed {
				continue
			}
			i := r.free[len(r.free)-1]
			r.free = r.free[:len(r.free)-1]
			r.slots[i] = ringSlot{e: e}
			r.prep(i, false)
			inFlight++
		}
	submit:
		if inFlight == 0 {
			continue
		}
		if _, err := r.ring.SubmitAndWait(1); err != nil {
			// The ring itself failed: nothing in flight can be trusted to
			// complete; report it and drain what is left of work.
			fail(fmt.Errorf("update-img ring: %w", err))
			for range work {
			}
			return
		}
		for _, cqe := range r.cqes[:r.ring.ReapCQEs(r.cqes)] {
			i := int(cqe.UserData)
			s := &r.slots[i]
			err := r.complete(s, i, cqe.Res)
			switch {
			case err != nil:
				fail(err)
				failed = true
			case !s.writing:
				s.writing = true
				r.prep(i, true)
				continue // the slot stays in flight, now writing
			default:
				done(s.e.n)
			}
			r.free = append(r.free, i)
			inFlight--
		}
	}
}

// prep queues slot i's read, or its write. The SQ has room: each slot has
// at most one request queued.
func (r *ringCopier) prep(i int, write bool) {
	s := &r.slots[i]
	b := r.buf(i, s.e.n)
	sqe := r.ring.NextSQE()
	if write {
		uring.PrepWrite(sqe, int32(r.dst.direct.Fd()), unsafe.Pointer(&b[0]), uint32(len(b)), uint64(s.e.off), 0)
	} else {
		uring.PrepRead(sqe, int32(r.src.FD()), unsafe.Pointer(&b[0]), uint32(len(b)), uint64(s.e.off))
	}
	sqe.UserData = uint64(i)
}

// complete settles slot i's read or write, whose result is res: a read
// is finished into the snapshot's view; a write the filesystem refuses
// O_DIRECT for is made through the image's buffered descriptor.
func (r *ringCopier) complete(s *ringSlot, i int, res int32) error {
	b := r.buf(i, s.e.n)
	if !s.writing {
		if res < 0 {
			return fmt.Errorf("read snapshot at %d: %w", s.e.off, syscall.Errno(-res))
		}
		if int64(res) != s.e.n {
			return fmt.Errorf("read snapshot at %d: %d of %d bytes", s.e.off, res, s.e.n)
		}
		if err := r.src.FinishRead(b, s.e.off); err != nil {
			return fmt.Errorf("read snapshot at %d: %w", s.e.off, err)
		}
		return nil
	}
	if res == -int32(syscall.EINVAL) {
		if _, err := r.dst.f.WriteAt(b, s.e.off); err != nil {
			return fmt.Errorf("write image at %d: %w", s.e.off, err)
		}
		return nil
	}
	if res < 0 {
		return fmt.Errorf("write image at %d: %w", s.e.off, syscall.Errno(-res))
	}
	if int64(res) != s.e.n {
		return fmt.Errorf("write image at %d: %d of %d bytes", s.e.off, res, s.e.n)
	}
	return nil
}

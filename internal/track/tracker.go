package server

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/bitmap"
	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/dio"
	"github.com/dbdublk/dbdublk/ublk"
	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// Mode is what the front device does with writes.
type Mode int32

const (
	// ModePassthrough forwards writes untouched.
	ModePassthrough Mode = iota
	// ModeSnapshot copies a block's old data to the COW file before its
	// first write, so the snapshot device keeps serving the old view.
	ModeSnapshot
	// ModeIncremental records which blocks were written.
	ModeIncremental
)

func (m Mode) String() string {
	switch m {
	case ModeSnapshot:
		return "snapshot"
	case ModeIncremental:
		return "incremental"
	}
	return "passthrough"
}

// trackState is immutable: a transition builds a new one and swaps it in,
// so a write sees one consistent (mode, COW file, bitmap) triple.
type trackState struct {
	mode  Mode
	cow   *cow.File
	bits  *bitmap.Bitmap // fast filter for incremental mode; nil when it would not fit the cache budget
	epoch uint64
	// cowExtents are the device ranges of a COW file on the volume itself:
	// the snapshot shows them as zeros (they hold live COW data).
	cowExtents []cow.Extent
}

// tracker is the front device's backend: the real device, plus the snapshot
// and change-tracking hook the queues call before every modifying request.
type tracker struct {
	*BlockDevice
	state    atomic.Pointer[trackState]
	inflight [2]atomic.Int64 // admitted, unfinished writes by epoch parity
	failed   atomic.Int32    // sticky errno of a failed snapshot or tracking; 0 = healthy
	logf     func(string, ...any)

	// cowJobs feeds the copy-on-write workers: first writes wait for their
	// old blocks to be preserved off the queue threads, many at a time.
	cowJobs  chan cowJob
	cowStart sync.Once

	expandMu sync.Mutex
	// autoExpand, when stepBytes > 0, grows a full COW store by stepBytes as
	// long as reserveBytes stay free on the COW file's filesystem.
	autoExpand struct{ stepBytes, reserveBytes int64 }
}

var _ ublk.WriteInterceptor = (*tracker)(nil)

func newTracker(b *BlockDevice, logf func(string, ...any)) *tracker {
	t := &tracker{BlockDevice: b, logf: logf}
	t.state.Store(&trackState{mode: ModePassthrough})
	return t
}

func (t *tracker) current() *trackState { return t.state.Load() }

// fail records the first error; a failed snapshot serves EIO and a failed
// tracker no longer promises a correct incremental.
func (t *tracker) fail(errno syscall.Errno, why error) {
	if t.failed.CompareAndSwap(0, int32(errno)) {
		t.logf("tracking failed (%v): %v", errno, why)
	}
}

// Failed returns the sticky errno, or 0.
func (t *tracker) Failed() syscall.Errno { return syscall.Errno(t.failed.Load()) }

// swap installs a new state and waits until every write admitted under the
// previous one has completed: only then is the new state's view exact (a
// snapshot never shows a write that was still in flight at its instant).
func (t *tracker) swap(mode Mode, c *cow.File, bits *bitmap.Bitmap, cowExtents []cow.Extent) error {
	old := t.current()
	t.state.Store(&trackState{mode: mode, cow: c, bits: bits, epoch: old.epoch + 1, cowExtents: cowExtents})
	deadline := time.Now().Add(60 * time.Second)
	for t.inflight[old.epoch&1].Load() != 0 {
		if time.Now().After(deadline) {
			return errors.New("writes in flight did not drain within 60 s")
		}
		time.Sleep(200 * time.Microsecond)
	}
	return nil
}

// cowJob is one write waiting for its blocks to be preserved (snapshot
// mode) or for their write intent to be on disk (incremental mode).
type cowJob struct {
	st          *trackState
	first, last uint64
	resume      func(error)
}

// cowWorkers is how many first writes are preserved concurrently (the
// queues' depth is what bounds it in practice).
const cowWorkers = 32

func (t *tracker) startCowWorkers() {
	t.cowJobs = make(chan cowJob, 256)
	for i := 0; i < cowWorkers; i++ {
		go func() {
			for j := range t.cowJobs {
				if j.st.mode == ModeIncremental {
					t.commitIntent(j.st, j.first, j.last)
				} else {
					t.preserve(j.st, j.first, j.last)
				}
				// The write proceeds even if preserving failed: the
				// snapshot fails closed, the live device keeps working.
				j.resume(nil)
			}
		}()
	}
}

// preserve copies blocks [first, last) that are not yet in the COW file.
// The range is read from the device in one request and stored with one
// write (cow.File.CopyOnWriteRange): a block whose index entry is still
// unset when it is copied has not been written since the snapshot (writes
// are issued only after their blocks are preserved), so the bulk read holds
// its old contents; a block preserved meanwhile by another write is skipped
// and its bytes are not used.
func (t *tracker) preserve(st *trackState, first, last uint64) {
	if st.bits != nil && st.bits.TestRange(first, last-first) {
		return
	}
	if last-first > maxBulkBlocks {
		for b := first; b < last; b += maxBulkBlocks {
			t.preserve(st, b, min(b+maxBulkBlocks, last))
		}
		return
	}
	buf := bulkPool.Get().(*[]byte)
	defer bulkPool.Put(buf)
	bulk := (*buf)[:int(last-first)*cow.BlockSize]
	if err := t.readRange(bulk, first); err != nil {
		t.fail(syscall.EIO, fmt.Errorf("read blocks %d..%d: %w", first, last-1, err))
		return
	}
	for {
		_, err := st.cow.CopyOnWriteRange(first, bulk)
		if err == nil {
			break
		}
		if errors.Is(err, cow.ErrFull) {
			if t.tryAutoExpand(st) {
				continue
			}
			t.fail(syscall.EFBIG, fmt.Errorf("COW file %s is full", st.cow.Path()))
			return
		}
		t.fail(syscall.EIO, fmt.Errorf("copy blocks %d..%d: %w", first, last-1, err))
		return // failed closed: the snapshot now serves EIO
	}
	if st.bits != nil {
		st.bits.SetRange(first, last-first)
	}
}

// maxBulkBlocks bounds preserve's single read (1 MiB, the largest request).
const maxBulkBlocks = 256

// bulkPool recycles preserve's aligned read buffers: a 1 MiB allocation per
// first write would keep the garbage collector busy on the write path.
var bulkPool = sync.Pool{New: func() any {
	b := dio.AlignedBuf(maxBulkBlocks * cow.BlockSize)
	return &b
}}

// readRange reads blocks starting at first into p (a multiple of 4 KiB);
// bytes past the end of the device read as zeros.
func (t *tracker) readRange(p []byte, first uint64) error {
	off := int64(first) * cow.BlockSize
	n := int64(len(p))
	if off+n > t.Size {
		n = t.Size - off
	}
	if n <= 0 {
		clear(p)
		return nil
	}
	if err := preadFull(t.fd, p[:n], off); err != nil {
		return err
	}
	clear(p[n:])
	return nil
}

// preserved reports whether every block in [first, last) is already in the
// COW file, so a rewrite can go straight to the device.
func (t *tracker) preserved(st *trackState, first, last uint64) bool {
	if st.bits != nil && st.bits.TestRange(first, last-first) {
		return true
	}
	ok, err := st.cow.AllPreserved(first, last)
	if !ok || err != nil {
		return false
	}
	if st.bits != nil {
		st.bits.SetRange(first, last-first)
	}
	return true
}

// BeforeWrite runs on a queue thread before a write, discard or
// write-zeroes reaches the real device. A first write in snapshot mode is
// deferred (WritePending) until its old blocks are preserved.
func (t *tracker) BeforeWrite(op uapi.IOOp, off, n int64, resume func(error)) (uint64, ublk.WriteAction, error) {
	var st *trackState
	for {
		st = t.current()
		t.inflight[st.epoch&1].Add(1)
		if t.current() == st {
			break
		}
		t.inflight[st.epoch&1].Add(-1) // a transition raced us: admit under the new state
	}
	if n <= 0 || st.mode == ModePassthrough || t.failed.Load() != 0 {
		return st.epoch, ublk.WriteProceed, nil
	}
	first := uint64(off) / cow.BlockSize
	last := (uint64(off+n) + cow.BlockSize - 1) / cow.BlockSize
	switch st.mode {
	case ModeIncremental:
		if st.bits != nil && st.bits.TestRange(first, last-first) {
			return st.epoch, ublk.WriteProceed, nil // marked, and durably so
		}
		if !t.markRange(st, first, last) {
			return st.epoch, ublk.WriteProceed, nil
		}
		if resume == nil {
			t.commitIntent(st, first, last)
			return st.epoch, ublk.WriteProceed, nil
		}
		t.cowStart.Do(t.startCowWorkers)
		t.cowJobs <- cowJob{st, first, last, resume}
		return st.epoch, ublk.WritePending, nil
	case ModeSnapshot:
		if op == uapi.IOOpDiscard {
			return st.epoch, t.discardAction(st, first, last), nil
		}
		if t.preserved(st, first, last) {
			return st.epoch, ublk.WriteProceed, nil
		}
		if resume == nil {
			t.preserve(st, first, last)
			return st.epoch, ublk.WriteProceed, nil
		}
		t.cowStart.Do(t.startCowWorkers)
		t.cowJobs <- cowJob{st, first, last, resume}
		return st.epoch, ublk.WritePending, nil
	}
	return st.epoch, ublk.WriteProceed, nil
}

// AfterWrite settles BeforeWrite's admission.
func (t *tracker) AfterWrite(token uint64) { t.inflight[token&1].Add(-1) }

func (t *tracker) markRange(st *trackState, first, last uint64) (mustCommit bool) {
	mustCommit, err := st.cow.MarkRange(first, last)
	if err != nil {
		t.fail(syscall.EIO, fmt.Errorf("record changed blocks %d..%d: %w", first, last-1, err))
		return false
	}
	if !mustCommit && st.bits != nil {
		st.bits.SetRange(first, last-first)
	}
	return mustCommit
}

// commitIntent waits until the regions of blocks [first, last) are
// recorded on disk (cow.File.CommitIntent, shared by every write waiting at
// the time); only then may the write reach the device, so a crash after it
// still finds the blocks. The bitmap learns them only afterwards: a set bit
// lets later writes skip all of this.
func (t *tracker) commitIntent(st *trackState, first, last uint64) {
	if err := st.cow.CommitIntent(); err != nil {
		t.fail(syscall.EIO, fmt.Errorf("record write intent for blocks %d..%d: %w", first, last-1, err))
		return
	}
	if st.bits != nil {
		st.bits.SetRange(first, last-first)
	}
}

// discardAction forwards a discard only when every block it covers is
// already preserved; otherwise the discard is dropped, since deallocating
// a block the snapshot still reads from the real device would lose it, and
// copying a whole trimmed range would fill the COW store for nothing.
func (t *tracker) discardAction(st *trackState, first, last uint64) ublk.WriteAction {
	if last-first > 4096 {
		return ublk.WriteSkip
	}
	if t.preserved(st, first, last) {
		return ublk.WriteProceed
	}
	return ublk.WriteSkip
}

// tryAutoExpand grows a full COW store by one step when that leaves the
// reserve free on its filesystem.
func (t *tracker) tryAutoExpand(st *trackState) bool {
	t.expandMu.Lock()
	defer t.expandMu.Unlock()
	step, reserve := t.autoExpand.stepBytes, t.autoExpand.reserveBytes
	if step <= 0 {
		return false
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(st.cow.Path(), &fs); err != nil {
		return false
	}
	if int64(fs.Bavail)*int64(fs.Bsize) < step+reserve {
		t.logf("auto-expand refused: fewer than %d bytes free beyond the %d-byte reserve", step, reserve)
		return false
	}
	if err := st.cow.Expand(step); err != nil {
		t.logf("auto-expand by %d bytes: %v", step, err)
		return false
	}
	t.logf("auto-expanded COW file %s by %d bytes", st.cow.Path(), step)
	return true
}

// preadFull fills p from fd at off; running out of device is EIO.
func preadFull(fd int, p []byte, off int64) error {
	for done := 0; done < len(p); {
		n, err := unix.Pread(fd, p[done:], off+int64(done))
		if err != nil {
			return err
		}
		if n == 0 {
			return syscall.EIO
		}
		done += n
	}
	return nil
}

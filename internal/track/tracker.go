package track

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
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/dio"
	"github.com/dbdublk/dbdublk/ublk"
	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// Device is the real device a Tracker fronts: a ublk backend (its O_DIRECT
// descriptor) of a known size.
type Device interface {
	ublk.Backend
	Size() int64
}

// State is one tracking configuration. It is immutable: a transition
// builds a new one and swaps it in, so a write sees one consistent (mode,
// COW file, bitmap) triple.
type State struct {
	Mode dattobd.Mode
	Cow  *cow.File      // nil in passthrough
	Bits *bitmap.Bitmap // fast filter in front of the index; nil when it would not fit the cache budget
	// CowExtents are the device ranges of a COW file on the volume itself:
	// the snapshot shows them as zeros (they hold live COW data).
	CowExtents []cow.Extent
	epoch      uint64
}

// Tracker is the front device's backend: the real device, plus the
// snapshot and change tracking the queues call before every modifying
// request.
type Tracker struct {
	dev      Device
	state    atomic.Pointer[State]
	inflight [2]atomic.Int64 // admitted, unfinished writes by epoch parity
	failed   atomic.Int32    // sticky errno of a failed snapshot or tracking; 0 = healthy
	logf     func(string, ...any)

	// jobs feeds the copy-on-write workers: first writes wait for their old
	// blocks to be preserved off the queue threads, many at a time.
	jobs      chan job
	startJobs sync.Once
	stopJobs  sync.Once

	expandMu sync.Mutex
	// autoExpand, when stepBytes > 0, grows a full COW store by stepBytes as
	// long as reserveBytes stay free on the COW file's filesystem.
	autoExpand struct{ stepBytes, reserveBytes int64 }
}

var _ ublk.WriteInterceptor = (*Tracker)(nil)

// New returns a Tracker of dev in passthrough mode.
func New(dev Device, logf func(string, ...any)) *Tracker {
	t := &Tracker{dev: dev, logf: logf}
	t.state.Store(&State{Mode: dattobd.Passthrough})
	return t
}

// FD is the real device's descriptor: the queues issue admitted requests
// to it.
func (t *Tracker) FD() int { return t.dev.FD() }

// CanDiscard reports whether the real device deallocates blocks.
func (t *Tracker) CanDiscard() bool { return t.dev.CanDiscard() }

// Size is the real device's size in bytes.
func (t *Tracker) Size() int64 { return t.dev.Size() }

// Current returns the state in force.
func (t *Tracker) Current() *State { return t.state.Load() }

// Fail records the first error; a failed snapshot serves EIO and a failed
// tracker no longer promises a correct incremental.
func (t *Tracker) Fail(errno syscall.Errno, why error) {
	if t.failed.CompareAndSwap(0, int32(errno)) {
		t.logf("tracking failed (%v): %v", errno, why)
	}
}

// Failed returns the sticky errno, or 0.
func (t *Tracker) Failed() syscall.Errno { return syscall.Errno(t.failed.Load()) }

// Reset clears a failure and auto-expansion: tracking starts over (after
// destroy).
func (t *Tracker) Reset() {
	t.failed.Store(0)
	t.SetAutoExpand(0, 0)
}

// SetAutoExpand makes a full COW store grow by stepBytes while reserveBytes
// stay free on its filesystem; a step of 0 turns it off.
func (t *Tracker) SetAutoExpand(stepBytes, reserveBytes int64) {
	t.expandMu.Lock()
	defer t.expandMu.Unlock()
	t.autoExpand.stepBytes, t.autoExpand.reserveBytes = stepBytes, reserveBytes
}

// AutoExpand returns the auto-expansion step and reserve (0, 0 when off).
func (t *Tracker) AutoExpand() (stepBytes, reserveBytes int64) {
	t.expandMu.Lock()
	defer t.expandMu.Unlock()
	return t.autoExpand.stepBytes, t.autoExpand.reserveBytes
}

// Expand grows the snapshot's COW store by bytes, serialised with
// auto-expansion.
func (t *Tracker) Expand(bytes int64) error {
	t.expandMu.Lock()
	defer t.expandMu.Unlock()
	st := t.Current()
	if st.Cow == nil {
		return errors.New("not tracking")
	}
	return st.Cow.Expand(bytes)
}

// drainTimeout bounds how long Swap waits for the writes admitted under the
// previous state: they wait only for the real device and the COW file.
const drainTimeout = 60 * time.Second

// Swap installs a new state and waits until every write admitted under the
// previous one has completed: only then is the new state's view exact (a
// snapshot never shows a write that was still in flight at its instant).
func (t *Tracker) Swap(mode dattobd.Mode, c *cow.File, bits *bitmap.Bitmap, cowExtents []cow.Extent) error {
	old := t.Current()
	t.state.Store(&State{Mode: mode, Cow: c, Bits: bits, epoch: old.epoch + 1, CowExtents: cowExtents})
	deadline := time.Now().Add(drainTimeout)
	for t.inflight[old.epoch&1].Load() != 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("writes in flight did not drain within %v", drainTimeout)
		}
		time.Sleep(200 * time.Microsecond)
	}
	return nil
}

// NewBitmap returns a fast filter in front of c's index (blocks known
// preserved in snapshot mode, known recorded in incremental mode), or nil
// when its memory would not fit a quarter of the cache budget (the COW
// index, which is bounded by the cache, is then the only record).
func NewBitmap(c *cow.File, cacheBytes int64) *bitmap.Bitmap {
	if bitmap.BytesFor(c.Blocks()) > uint64(cacheBytes/4) {
		return nil
	}
	return bitmap.New(c.Blocks())
}

// job is one write waiting for its blocks to be preserved (snapshot mode)
// or for their write intent to be on disk (incremental mode).
type job struct {
	st          *State
	first, last uint64
	resume      func(error)
}

// Copy-on-write workers: how many first writes are preserved concurrently,
// and how many may wait for one. The queue is deep enough for every tag of
// the default device (2 queues × 128 tags) to wait at once.
const (
	cowWorkers  = 32
	jobCapacity = 2 * ublk.DefaultDepth
)

func (t *Tracker) startWorkers() {
	t.jobs = make(chan job, jobCapacity)
	for i := 0; i < cowWorkers; i++ {
		go func() {
			for j := range t.jobs {
				if j.st.Mode == dattobd.Incremental {
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

// Close stops the copy-on-write workers. The front device must have
// stopped: no write may be admitted afterwards.
func (t *Tracker) Close() {
	t.stopJobs.Do(func() {
		t.startJobs.Do(func() {}) // none started: none will be
		if t.jobs != nil {
			close(t.jobs)
		}
	})
}

// defer hands a write to the workers; it resumes when they are done.
func (t *Tracker) deferWrite(st *State, first, last uint64, resume func(error)) {
	t.startJobs.Do(t.startWorkers)
	t.jobs <- job{st, first, last, resume}
}

// preserve copies blocks [first, last) that are not yet in the COW file.
// The range is read from the device in one request and stored with one
// write (cow.File.CopyOnWriteRange): a block whose index entry is still
// unset when it is copied has not been written since the snapshot (writes
// are issued only after their blocks are preserved), so the bulk read holds
// its old contents; a block preserved meanwhile by another write is skipped
// and its bytes are not used.
func (t *Tracker) preserve(st *State, first, last uint64) {
	if st.Bits != nil && st.Bits.TestRange(first, last-first) {
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
		t.Fail(syscall.EIO, fmt.Errorf("read blocks %d..%d: %w", first, last-1, err))
		return
	}
	for {
		_, err := st.Cow.CopyOnWriteRange(first, bulk)
		if err == nil {
			break
		}
		if errors.Is(err, cow.ErrFull) {
			if t.tryAutoExpand(st) {
				continue
			}
			t.Fail(syscall.EFBIG, fmt.Errorf("COW file %s is full", st.Cow.Path()))
			return
		}
		t.Fail(syscall.EIO, fmt.Errorf("copy blocks %d..%d: %w", first, last-1, err))
		return // failed closed: the snapshot now serves EIO
	}
	if st.Bits != nil {
		st.Bits.SetRange(first, last-first)
	}
}

// maxBulkBlocks bounds preserve's single read (1 MiB, the largest request).
const maxBulkBlocks = ublk.DefaultMaxIOBytes / cow.BlockSize

// bulkPool recycles preserve's aligned read buffers: a 1 MiB allocation per
// first write would keep the garbage collector busy on the write path.
var bulkPool = sync.Pool{New: func() any {
	b := dio.AlignedBuf(maxBulkBlocks * cow.BlockSize)
	return &b
}}

// readRange reads blocks starting at first into p (a multiple of 4 KiB);
// bytes past the end of the device read as zeros.
func (t *Tracker) readRange(p []byte, first uint64) error {
	off := int64(first) * cow.BlockSize
	n := min(int64(len(p)), t.Size()-off)
	if n <= 0 {
		clear(p)
		return nil
	}
	if err := dio.ReadFull(t.FD(), p[:n], off); err != nil {
		return err
	}
	clear(p[n:])
	return nil
}

// preserved reports whether every block in [first, last) is already in the
// COW file, so a rewrite can go straight to the device.
func (t *Tracker) preserved(st *State, first, last uint64) bool {
	if st.Bits != nil && st.Bits.TestRange(first, last-first) {
		return true
	}
	ok, err := st.Cow.AllPreserved(first, last)
	if !ok || err != nil {
		return false
	}
	if st.Bits != nil {
		st.Bits.SetRange(first, last-first)
	}
	return true
}

// admit counts a write under the state in force and returns that state.
func (t *Tracker) admit() *State {
	for {
		st := t.Current()
		t.inflight[st.epoch&1].Add(1)
		if t.Current() == st {
			return st
		}
		t.inflight[st.epoch&1].Add(-1) // a transition raced us: admit under the new state
	}
}

// BeforeWrite runs on a queue thread before a write, discard or
// write-zeroes reaches the real device. A first write in snapshot mode is
// deferred (WritePending) until its old blocks are preserved; a write into
// an unrecorded region in incremental mode until its intent is on disk.
func (t *Tracker) BeforeWrite(op uapi.IOOp, off, n int64, resume func(error)) (uint64, ublk.WriteAction, error) {
	st := t.admit()
	if n <= 0 || st.Mode == dattobd.Passthrough || t.failed.Load() != 0 {
		return st.epoch, ublk.WriteProceed, nil
	}
	first := uint64(off) / cow.BlockSize
	last := (uint64(off+n) + cow.BlockSize - 1) / cow.BlockSize
	switch st.Mode {
	case dattobd.Incremental:
		if st.Bits != nil && st.Bits.TestRange(first, last-first) {
			return st.epoch, ublk.WriteProceed, nil // marked, and durably so
		}
		if !t.markRange(st, first, last) {
			return st.epoch, ublk.WriteProceed, nil
		}
		t.deferWrite(st, first, last, resume)
		return st.epoch, ublk.WritePending, nil
	case dattobd.Snapshot:
		if op == uapi.IOOpDiscard {
			return st.epoch, t.discardAction(st, first, last), nil
		}
		if t.preserved(st, first, last) {
			return st.epoch, ublk.WriteProceed, nil
		}
		t.deferWrite(st, first, last, resume)
		return st.epoch, ublk.WritePending, nil
	}
	return st.epoch, ublk.WriteProceed, nil
}

// AfterWrite settles BeforeWrite's admission.
func (t *Tracker) AfterWrite(token uint64) { t.inflight[token&1].Add(-1) }

func (t *Tracker) markRange(st *State, first, last uint64) (mustCommit bool) {
	mustCommit, err := st.Cow.MarkRange(first, last)
	if err != nil {
		t.Fail(syscall.EIO, fmt.Errorf("record changed blocks %d..%d: %w", first, last-1, err))
		return false
	}
	if !mustCommit && st.Bits != nil {
		st.Bits.SetRange(first, last-first)
	}
	return mustCommit
}

// commitIntent waits until the regions of blocks [first, last) are
// recorded on disk (cow.File.CommitIntent, shared by every write waiting at
// the time); only then may the write reach the device, so a crash after it
// still finds the blocks. The bitmap learns them only afterwards: a set bit
// lets later writes skip all of this.
func (t *Tracker) commitIntent(st *State, first, last uint64) {
	if err := st.Cow.CommitIntent(); err != nil {
		t.Fail(syscall.EIO, fmt.Errorf("record write intent for blocks %d..%d: %w", first, last-1, err))
		return
	}
	if st.Bits != nil {
		st.Bits.SetRange(first, last-first)
	}
}

// maxCheckedDiscardBlocks bounds the index lookups a discard may cost on the
// queue thread; a larger discard in snapshot mode is dropped.
const maxCheckedDiscardBlocks = 4096

// discardAction forwards a discard only when every block it covers is
// already preserved; otherwise the discard is dropped, since deallocating
// a block the snapshot still reads from the real device would lose it, and
// copying a whole trimmed range would fill the COW store for nothing.
func (t *Tracker) discardAction(st *State, first, last uint64) ublk.WriteAction {
	if last-first > maxCheckedDiscardBlocks {
		return ublk.WriteSkip
	}
	if t.preserved(st, first, last) {
		return ublk.WriteProceed
	}
	return ublk.WriteSkip
}

// tryAutoExpand grows a full COW store by one step when that leaves the
// reserve free on its filesystem.
func (t *Tracker) tryAutoExpand(st *State) bool {
	t.expandMu.Lock()
	defer t.expandMu.Unlock()
	step, reserve := t.autoExpand.stepBytes, t.autoExpand.reserveBytes
	if step <= 0 {
		return false
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(st.Cow.Path(), &fs); err != nil {
		return false
	}
	if int64(fs.Bavail)*int64(fs.Bsize) < step+reserve {
		t.logf("auto-expand refused: fewer than %d bytes free beyond the %d-byte reserve", step, reserve)
		return false
	}
	if err := st.Cow.Expand(step); err != nil {
		t.logf("auto-expand by %d bytes: %v", step, err)
		return false
	}
	t.logf("auto-expanded COW file %s by %d bytes", st.Cow.Path(), step)
	return true
}

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
	Bits *bitmap.Bitmap // fast filter in front of the index; nil when it would not fit the budget (BudgetIndex)
	// CowExtents are the device ranges of a COW file on the volume itself:
	// the snapshot shows them as zeros (they hold live COW data).
	CowExtents []cow.Extent
	epoch      uint64
	// gate marks the state a Swap installs while it waits for the writes
	// of the previous state: writes arriving then are held, and admitted
	// under whichever state the Swap ends with (both have its epoch).
	gate bool
	// opened is the state a gate opened on (set under heldMu).
	opened *State
	// sealed refuses every modifying request (Seal).
	sealed bool
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

	// failMu serialises failing: the first failure is made durable (in
	// the COW file, and by onFail) before failed is set, and so before
	// any write is let through untracked.
	failMu sync.Mutex
	onFail func(errno syscall.Errno, why error)

	// jobs is the queue of the copy-on-write workers: first writes wait
	// for their old blocks to be preserved off the queue threads, many at
	// a time. It never blocks the queue thread that adds to it, whatever
	// the device's queues and depth (at most one job per tag is waiting).
	jobsMu      sync.Mutex
	jobsReady   sync.Cond
	jobs        []job
	jobsClosed  bool
	workersOnce sync.Once

	// held are the writes that arrived while a Swap's gate was up.
	heldMu sync.Mutex
	held   []job

	expandMu sync.Mutex
	// autoExpand, when stepBytes > 0, grows a full COW store by stepBytes as
	// long as reserveBytes stay free on the COW file's filesystem.
	autoExpand struct{ stepBytes, reserveBytes int64 }
}

var _ ublk.Stager = (*Tracker)(nil)

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

// OnFailure sets what Fail calls, once, with the first failure, after the
// COW file has recorded it and before anything sees the tracker failed (the
// daemon records it in the state file). Set it before the device starts.
func (t *Tracker) OnFailure(fn func(errno syscall.Errno, why error)) { t.onFail = fn }

// Fail records the first error: a failed snapshot serves EIO and a failed
// tracker no longer promises a correct incremental, so writes pass through
// untracked. The failure is durable before Fail returns to anyone: it is
// written into the current COW file (cow.File.RecordFailure, fsynced) and
// handed to OnFailure first, and a caller that fails meanwhile waits, so
// no write passes untracked while a crash could still forget the failure.
func (t *Tracker) Fail(errno syscall.Errno, why error) {
	t.failMu.Lock()
	defer t.failMu.Unlock()
	if t.failed.Load() != 0 {
		return
	}
	t.logf("tracking failed (%v): %v", errno, why)
	if c := t.Current().Cow; c != nil {
		if err := c.RecordFailure(errno, why.Error()); err != nil {
			t.logf("record the failure in %s: %v", c.Path(), err)
		}
	}
	if t.onFail != nil {
		t.onFail(errno, why)
	}
	t.failed.Store(int32(errno))
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
var drainTimeout = 60 * time.Second

// ErrDrain is Swap's error when the writes of the previous state did not
// complete in time; the previous state is back in force.
var ErrDrain = errors.New("writes in flight did not drain")

// Swap installs a new state once every write admitted under the previous
// one has completed: only then is the new state's view exact (a snapshot
// never shows a write that was still in flight at its instant). Writes
// that arrive meanwhile are held, not admitted, and are admitted under the
// new state when it is installed. If the previous writes do not drain
// within drainTimeout, the previous state is put back instead (the held
// writes are admitted under it) and Swap returns ErrDrain: a failed Swap
// changes nothing.
func (t *Tracker) Swap(mode dattobd.Mode, c *cow.File, bits *bitmap.Bitmap, cowExtents []cow.Extent) error {
	return t.swap(&State{Mode: mode, Cow: c, Bits: bits, CowExtents: cowExtents})
}

// swap is Swap of any next state.
func (t *Tracker) swap(st *State) error {
	old := t.Current()
	next := old.epoch + 1
	gate := &State{Mode: old.Mode, Cow: old.Cow, Bits: old.Bits, CowExtents: old.CowExtents, sealed: old.sealed, epoch: next, gate: true}
	t.state.Store(gate)
	deadline := time.Now().Add(drainTimeout)
	for t.inflight[old.epoch&1].Load() != 0 {
		if time.Now().After(deadline) {
			t.open(gate, &State{Mode: old.Mode, Cow: old.Cow, Bits: old.Bits, CowExtents: old.CowExtents, sealed: old.sealed, epoch: next})
			return fmt.Errorf("%w within %v; the previous state is back", ErrDrain, drainTimeout)
		}
		time.Sleep(200 * time.Microsecond)
	}
	st.epoch = next
	t.open(gate, st)
	return nil
}

// Seal ends tracking in place, for a volume that stays in use read-only
// until the machine stops (the root volume at shutdown): once the writes
// admitted so far have completed, every later write, discard or
// write-zeroes fails with EROFS, so that the COW file the previous state
// returned can be closed clean and stays exact: nothing reaches the device
// untracked after it. Reads are served as before.
func (t *Tracker) Seal() (previous *State, err error) {
	old := t.Current()
	if err := t.swap(&State{Mode: dattobd.Passthrough, sealed: true}); err != nil {
		return nil, err
	}
	return old, nil
}

// open installs st in place of gate and admits the writes held at it.
func (t *Tracker) open(gate, st *State) {
	t.heldMu.Lock()
	gate.opened = st
	t.state.Store(st)
	held := t.held
	t.held = nil
	t.heldMu.Unlock()
	for _, j := range held {
		j.st = st
		t.deferWrite(j)
	}
}

// hold keeps a write that arrived at gate until the gate opens. If the
// gate opened meanwhile it returns the state it opened on, under which the
// write is then admitted as usual.
func (t *Tracker) hold(gate *State, j job) (opened *State) {
	t.heldMu.Lock()
	defer t.heldMu.Unlock()
	if gate.opened == nil {
		t.held = append(t.held, j)
	}
	return gate.opened
}

// BudgetIndex divides a tracking session's index memory budget (-c; 0
// means cow.DefaultCacheBytes) between c's index cache and a fast filter
// in front of the index (blocks known preserved in snapshot mode, known
// recorded in incremental mode): the filter when it fits a quarter of the
// budget, the cache the rest. It sets the cache's limit and returns the
// filter, or nil when there is none (the index is then the only record).
// Together they stay within the budget, whatever the device size.
func BudgetIndex(c *cow.File, budget int64) *bitmap.Bitmap {
	if budget <= 0 {
		budget = cow.DefaultCacheBytes
	}
	if bitmap.BytesFor(c.Blocks()) > uint64(budget/4) {
		c.SetCacheLimit(budget)
		return nil
	}
	bits := bitmap.New(c.Blocks())
	c.SetCacheLimit(budget - int64(bits.Bytes()))
	return bits
}

// SetIndexBudget changes the index memory budget of the session in force
// (reconfigure): the cache gets what the filter, which stays as it is,
// leaves of it, and at least one section.
func (t *Tracker) SetIndexBudget(budget int64) {
	st := t.Current()
	if st.Cow == nil {
		return
	}
	if st.Bits != nil {
		budget -= int64(st.Bits.Bytes())
	}
	st.Cow.SetCacheLimit(max(budget, 1))
}

// IndexMemory reports the memory the session in force holds for its
// index: resident cache sections and the filter.
func (t *Tracker) IndexMemory() int64 {
	st := t.Current()
	if st.Cow == nil {
		return 0
	}
	n := st.Cow.CacheBytes()
	if st.Bits != nil {
		n += int64(st.Bits.Bytes())
	}
	return n
}

// job is one write waiting for its blocks to be preserved (snapshot mode)
// or for their write intent to be on disk (incremental mode).
type job struct {
	st          *State
	op          uapi.IOOp
	first, last uint64
	resume      func(error)
	marked      bool // incremental: MarkRange ran on the queue thread
}

// cowWorkers is how many deferred writes are prepared concurrently.
const cowWorkers = 32

func (t *Tracker) startWorkers() {
	t.jobsReady.L = &t.jobsMu
	for i := 0; i < cowWorkers; i++ {
		go t.work()
	}
}

// work prepares deferred writes until Close.
func (t *Tracker) work() {
	for {
		t.jobsMu.Lock()
		for len(t.jobs) == 0 && !t.jobsClosed {
			t.jobsReady.Wait()
		}
		if len(t.jobs) == 0 {
			t.jobsMu.Unlock()
			return
		}
		j := t.jobs[0]
		t.jobs[0] = job{}
		t.jobs = t.jobs[1:]
		t.jobsMu.Unlock()
		j.resume(t.prepare(j))
	}
}

// Close stops the copy-on-write workers once the queued jobs are done. The
// front device must have stopped: no write may be admitted afterwards.
func (t *Tracker) Close() {
	t.workersOnce.Do(func() {}) // none started: none will be
	t.jobsMu.Lock()
	t.jobsClosed = true
	t.jobsMu.Unlock()
	if t.jobsReady.L != nil {
		t.jobsReady.Broadcast()
	}
}

// deferWrite hands a write to the workers; it resumes when they are done.
// It never blocks.
func (t *Tracker) deferWrite(j job) {
	t.workersOnce.Do(t.startWorkers)
	t.jobsMu.Lock()
	t.jobs = append(t.jobs, j)
	t.jobsMu.Unlock()
	t.jobsReady.Signal()
}

// prepare does, off the queue thread, what a deferred write waits for
// under its state, and returns what to resume it with: nil to issue it, or
// ublk.ErrSkipWrite for a discard the snapshot forbids. The write proceeds
// even if preserving failed: the snapshot fails closed (durably, see
// Fail), the live device keeps working.
func (t *Tracker) prepare(j job) error {
	if j.st.sealed {
		return syscall.EROFS
	}
	if t.failed.Load() != 0 {
		return nil
	}
	switch j.st.Mode {
	case dattobd.Incremental:
		if j.marked || t.markRange(j.st, j.first, j.last) {
			t.commitIntent(j.st, j.first, j.last)
		}
	case dattobd.Snapshot:
		if j.op == uapi.IOOpDiscard {
			if t.discardAction(j.st, j.first, j.last) == ublk.WriteSkip {
				return ublk.ErrSkipWrite
			}
			return nil
		}
		t.preserve(j.st, j.first, j.last)
	}
	return nil
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
	buf := copies.get(int(last-first) * cow.BlockSize)
	defer copies.put(buf)
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
	return t.BeforeWriteStaged(op, off, n, resume, nil)
}

// BeforeWriteStaged is BeforeWrite for a queue that runs stages (s not
// nil): a first write in snapshot mode is then prepared as I/O on the
// queue's ring where it can be (see stagedCopy), and on the workers
// otherwise.
func (t *Tracker) BeforeWriteStaged(op uapi.IOOp, off, n int64, resume func(error), s *ublk.Stage) (uint64, ublk.WriteAction, error) {
	st := t.admit()
	if n <= 0 {
		return st.epoch, ublk.WriteProceed, nil
	}
	first := uint64(off) / cow.BlockSize
	last := (uint64(off+n) + cow.BlockSize - 1) / cow.BlockSize
	if st.gate {
		opened := t.hold(st, job{op: op, first: first, last: last, resume: resume})
		if opened == nil {
			return st.epoch, ublk.WritePending, nil
		}
		st = opened // the same epoch: the write stays counted where it is
	}
	if st.sealed {
		t.inflight[st.epoch&1].Add(-1) // failed here: no AfterWrite follows
		return 0, 0, syscall.EROFS
	}
	if st.Mode == dattobd.Passthrough || t.failed.Load() != 0 {
		return st.epoch, ublk.WriteProceed, nil
	}
	switch st.Mode {
	case dattobd.Incremental:
		if st.Bits != nil && st.Bits.TestRange(first, last-first) {
			return st.epoch, ublk.WriteProceed, nil // marked, and durably so
		}
		if !t.markRange(st, first, last) {
			return st.epoch, ublk.WriteProceed, nil
		}
		t.deferWrite(job{st: st, op: op, first: first, last: last, resume: resume, marked: true})
		return st.epoch, ublk.WritePending, nil
	case dattobd.Snapshot:
		if op == uapi.IOOpDiscard {
			return st.epoch, t.discardAction(st, first, last), nil
		}
		if t.preserved(st, first, last) {
			return st.epoch, ublk.WriteProceed, nil
		}
		if s != nil {
			if action, ok := t.stage(st, first, last, resume, s); ok {
				return st.epoch, action, nil
			}
		}
		t.deferWrite(job{st: st, op: op, first: first, last: last, resume: resume})
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

package cow

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
)

// copyRecorder is the readOld side of a concurrent test: it notices two
// overlapping reads of one block and remembers what each successful read
// returned.
type copyRecorder struct {
	mu       sync.Mutex
	active   map[uint64]int
	success  map[uint64][]byte // data of the successful readOld, per block
	attempts map[uint64]int
	errs     []string
}

func newRecorder() *copyRecorder {
	return &copyRecorder{active: map[uint64]int{}, success: map[uint64][]byte{}, attempts: map[uint64]int{}}
}

func (r *copyRecorder) readOld(b, who uint64, failIt bool) func(p []byte) error {
	return func(p []byte) error {
		r.mu.Lock()
		r.active[b]++
		r.attempts[b]++
		if r.active[b] > 1 {
			r.errs = append(r.errs, fmt.Sprintf("two readOld of block %d at once", b))
		}
		if _, ok := r.success[b]; ok {
			r.errs = append(r.errs, fmt.Sprintf("readOld of block %d after it was copied", b))
		}
		r.mu.Unlock()
		runtime.Gosched() // widen the window for a racing copy
		data := pattern(who, b)
		r.mu.Lock()
		defer r.mu.Unlock()
		r.active[b]--
		if failIt {
			return errors.New("injected read error")
		}
		copy(p, data)
		r.success[b] = data
		return nil
	}
}

// TestConcurrentCopyOnWrite has many goroutines copy overlapping blocks
// while others look blocks up, read slots, sync and scan: each block is
// copied exactly once, holds the data of its one successful readOld, and
// nr_changed counts distinct blocks.
func TestConcurrentCopyOnWrite(t *testing.T) {
	useSparse(t)
	path := tempPath(t)
	const dev = 16 * SectionEntries * BlockSize
	blocks := Blocks(dev)
	dataOff := DataOffset(blocks)
	const pool = 3000
	f := mustCreate(t, path, Options{DeviceSize: dev, FileSize: dataOff + (pool+10)*BlockSize, CacheBytes: 2 * SectionBytes})
	rng := rand.New(rand.NewPCG(1, 1))
	hot := make([]uint64, pool)
	for i := range hot {
		hot[i] = rng.Uint64N(blocks)
	}
	rec := newRecorder()
	const writers = 16
	var copied [writers]map[uint64]int
	var wg, readers sync.WaitGroup
	stop := make(chan struct{})
	var readerErr atomic.Value
	for w := range writers {
		copied[w] = map[uint64]int{}
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 2))
			for range 1500 {
				b := hot[r.IntN(pool)]
				ok, err := f.CopyOnWrite(b, rec.readOld(b, uint64(w), false))
				if err != nil {
					t.Error(err)
					return
				}
				if ok {
					copied[w][b]++
				}
			}
		})
	}
	for r := range 4 {
		readers.Go(func() {
			rr := rand.New(rand.NewPCG(uint64(r), 3))
			p := make([]byte, BlockSize)
			for {
				select {
				case <-stop:
					return
				default:
				}
				switch rr.IntN(50) {
				case 0:
					if err := f.Sync(); err != nil {
						readerErr.Store(err.Error())
					}
				case 1:
					if err := f.ChangedRuns(func(a, n uint64) error { return nil }); err != nil {
						readerErr.Store(err.Error())
					}
				default:
					b := hot[rr.IntN(pool)]
					e, err := f.Lookup(b)
					if err != nil {
						readerErr.Store(err.Error())
						continue
					}
					if e > 1 {
						// The entry is set only after the data is written.
						if err := f.ReadBlock(e, p); err != nil {
							readerErr.Store(err.Error())
						}
						rec.mu.Lock()
						want := rec.success[b]
						rec.mu.Unlock()
						if !bytes.Equal(p, want) {
							readerErr.Store(fmt.Sprintf("block %d: slot %d holds data that is not its copy", b, e))
						}
					}
				}
			}
		})
	}
	wg.Wait()
	close(stop)
	readers.Wait()
	if v := readerErr.Load(); v != nil {
		t.Fatal(v)
	}
	if len(rec.errs) > 0 {
		t.Fatal(rec.errs[0])
	}
	total := map[uint64]int{}
	for w := range writers {
		for b, n := range copied[w] {
			total[b] += n
		}
	}
	distinct := len(rec.success)
	for b, n := range total {
		if n != 1 {
			t.Fatalf("block %d: CopyOnWrite returned true %d times", b, n)
		}
	}
	if len(total) != distinct {
		t.Fatalf("%d blocks reported copied, %d read", len(total), distinct)
	}
	for b, n := range rec.attempts {
		if n != 1 {
			t.Fatalf("block %d: readOld called %d times", b, n)
		}
	}
	checkCopies(t, f, rec, dataOff, distinct)
	if err := f.Close(true); err != nil {
		t.Fatal(err)
	}
	// The same, from the disk.
	r := readRaw(t, path)
	for b, data := range rec.success {
		if e := r.entry(b); !bytes.Equal(r.slot(e), data) {
			t.Fatalf("on disk, block %d -> slot %d holds other data", b, e)
		}
	}
	if r.nr() != uint64(distinct) {
		t.Fatalf("on-disk nr_changed %d, want %d", r.nr(), distinct)
	}
}

// checkCopies verifies slots are distinct, within the allocated range and
// hold the recorded data, and that the counters match.
func checkCopies(t *testing.T, f *File, rec *copyRecorder, dataOff int64, copies int) {
	t.Helper()
	h := f.Header()
	slots := map[uint64]uint64{}
	p := make([]byte, BlockSize)
	for b, data := range rec.success {
		e, err := f.Lookup(b)
		if err != nil {
			t.Fatal(err)
		}
		if e < uint64(dataOff)/BlockSize || e >= h.FPos {
			t.Fatalf("block %d: slot %d outside %d..%d", b, e, dataOff/BlockSize, h.FPos)
		}
		if other, dup := slots[e]; dup {
			t.Fatalf("blocks %d and %d share slot %d", other, b, e)
		}
		slots[e] = b
		if err := f.ReadBlock(e, p); err != nil || !bytes.Equal(p, data) {
			t.Fatalf("block %d: slot %d does not hold its first read's data (%v)", b, e, err)
		}
	}
	if got := h.FPos - uint64(dataOff)/BlockSize; got != uint64(copies) {
		t.Fatalf("fpos advanced by %d, want %d copies", got, copies)
	}
}

// TestConcurrentFullAndFailures mixes copies into a store too small for
// them, injected read failures, MarkChanged on the same blocks, and
// expansions: never two slots for a block, every ErrFull changes nothing,
// and nr_changed equals the number of non-zero entries.
func TestConcurrentFullAndFailures(t *testing.T) {
	useSparse(t)
	path := tempPath(t)
	const dev = 8 * SectionEntries * BlockSize
	blocks := Blocks(dev)
	dataOff := DataOffset(blocks)
	const slots = 300
	f := mustCreate(t, path, Options{DeviceSize: dev, FileSize: dataOff + slots*BlockSize, CacheBytes: SectionBytes})
	rng := rand.New(rand.NewPCG(7, 7))
	const pool = 2000
	hot := make([]uint64, pool)
	for i := range hot {
		hot[i] = rng.Uint64N(blocks)
	}
	rec := newRecorder()
	var fulls, expands atomic.Int64
	var wg sync.WaitGroup
	for w := range 12 {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 8))
			for range 800 {
				b := hot[r.IntN(pool)]
				switch x := r.IntN(100); {
				case x < 10:
					if _, err := f.MarkChanged(b); err != nil {
						t.Error(err)
						return
					}
				case x < 11 && w == 0 && expands.Load() < 3:
					if err := f.Expand(50 * BlockSize); err != nil {
						t.Error(err)
						return
					}
					expands.Add(1)
				default:
					_, err := f.CopyOnWrite(b, rec.readOld(b, uint64(w), r.IntN(10) == 0))
					if errors.Is(err, ErrFull) {
						fulls.Add(1)
					} else if err != nil && err.Error() != "injected read error" {
						t.Error(err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	if len(rec.errs) > 0 {
		t.Fatal(rec.errs[0])
	}
	if fulls.Load() == 0 {
		t.Fatal("the store never filled; the test tests nothing")
	}
	h := f.Header()
	if h.FSize != uint64(dataOff)+(slots+50*uint64(expands.Load()))*BlockSize {
		t.Fatalf("fsize %d after %d expansions", h.FSize, expands.Load())
	}
	// Every non-zero entry is counted once; every slot entry is a copy.
	var nonzero uint64
	if err := f.ChangedRuns(func(a, n uint64) error { nonzero += n; return nil }); err != nil {
		t.Fatal(err)
	}
	if h.NrChangedBlocks != nonzero {
		t.Fatalf("nr_changed %d, non-zero entries %d", h.NrChangedBlocks, nonzero)
	}
	for _, b := range hot {
		e, err := f.Lookup(b)
		if err != nil {
			t.Fatal(err)
		}
		_, copied := rec.success[b]
		if e > 1 {
			if !copied {
				t.Fatalf("block %d has slot %d but no successful read", b, e)
			}
		} else if copied {
			t.Fatalf("block %d was read successfully but its entry is %d", b, e)
		}
	}
	// Failed reads may leak a slot when another copy allocated after them,
	// so fpos may run ahead of the copies; it must never fall behind.
	if used := h.FPos - uint64(dataOff)/BlockSize; used < uint64(len(rec.success)) || h.FPos*BlockSize > h.FSize {
		t.Fatalf("fpos %d for %d copies, fsize %d", h.FPos, len(rec.success), h.FSize)
	}
	p := make([]byte, BlockSize)
	seen := map[uint64]bool{}
	for b, data := range rec.success {
		e, _ := f.Lookup(b)
		if seen[e] {
			t.Fatalf("slot %d used twice", e)
		}
		seen[e] = true
		if err := f.ReadBlock(e, p); err != nil || !bytes.Equal(p, data) {
			t.Fatalf("block %d: wrong data in slot %d", b, e)
		}
	}
	f.Close(true)
}

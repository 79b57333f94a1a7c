package cow

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// Concurrent writers copy blocks with the data pattern(w, b): writer w's
// view of block b. A slot therefore names the writer whose copy it holds
// (who), and a correct file holds, for every preserved block, the data of
// exactly one writer, the one that was told it copied the block.

// checkSlotData reports an error unless p is some writer's pattern for
// block b, and returns that writer.
func checkSlotData(p []byte, b uint64, writers uint64) (uint64, error) {
	w := who(p)
	if w >= writers || !bytes.Equal(p, pattern(w, b)) {
		return 0, fmt.Errorf("block %d: its slot holds data that is no writer's copy of it", b)
	}
	return w, nil
}

// TestConcurrentCopyOnWrite has many goroutines copy overlapping ranges
// while others look blocks up, read slots, sync and scan: each block is
// copied exactly once (first write wins), holds the data of the writer
// told it copied it, every slot is used once, and nr_changed counts
// distinct blocks.
func TestConcurrentCopyOnWrite(t *testing.T) {
	useSparse(t)
	path := tempPath(t)
	const dev = 16 * SectionEntries * BlockSize
	blocks := Blocks(dev)
	dataOff := DataOffset(blocks)
	const pool = 3000
	const maxRun = 4
	f := mustCreate(t, path, Options{DeviceSize: dev, FileSize: dataOff + (pool*maxRun+10)*BlockSize, CacheBytes: 2 * SectionBytes})
	rng := rand.New(rand.NewPCG(1, 1))
	hot := make([]uint64, pool)
	for i := range hot {
		hot[i] = rng.Uint64N(blocks - maxRun)
	}
	const writers = 16
	var copied [writers]int // blocks each writer was told it copied
	var wg, readers sync.WaitGroup
	stop := make(chan struct{})
	var readerErr atomic.Value
	for w := range writers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 2))
			for range 1500 {
				first := hot[r.IntN(pool)]
				n := uint64(1)
				if r.IntN(3) == 0 {
					n += r.Uint64N(maxRun)
				}
				k, err := f.CopyOnWriteRange(first, blocksOf(uint64(w), first, n))
				if err != nil {
					t.Error(err)
					return
				}
				copied[w] += k
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
					b := hot[rr.IntN(pool)] + rr.Uint64N(maxRun)
					e, err := f.Lookup(b)
					if err != nil {
						readerErr.Store(err.Error())
						continue
					}
					if e > 1 {
						// The entry is set only after the data is written.
						if err := f.ReadBlock(e, p); err != nil {
							readerErr.Store(err.Error())
						} else if _, err := checkSlotData(p, b, writers); err != nil {
							readerErr.Store(err.Error())
						}
					}
				}
			}
		})
	}
	wg.Wait()
	close(stop)
	readers.Wait()
	if t.Failed() {
		return
	}
	if v := readerErr.Load(); v != nil {
		t.Fatal(v)
	}
	// Each preserved block holds one writer's data, in a slot of its own,
	// and each writer holds exactly as many blocks as it was told it copied.
	owned := map[uint64]int{}
	data := map[uint64][]byte{}
	slots := map[uint64]uint64{}
	p := make([]byte, BlockSize)
	h := f.Header()
	for b := range blocks {
		e, err := f.Lookup(b)
		if err != nil {
			t.Fatal(err)
		}
		if e == 0 {
			continue
		}
		if e < uint64(dataOff)/BlockSize || e >= h.FPos {
			t.Fatalf("block %d: slot %d outside %d..%d", b, e, dataOff/BlockSize, h.FPos)
		}
		if other, dup := slots[e]; dup {
			t.Fatalf("blocks %d and %d share slot %d", other, b, e)
		}
		slots[e] = b
		if err := f.ReadBlock(e, p); err != nil {
			t.Fatal(err)
		}
		w, err := checkSlotData(p, b, writers)
		if err != nil {
			t.Fatal(err)
		}
		owned[w]++
		data[b] = bytes.Clone(p)
	}
	total := 0
	for w := range uint64(writers) {
		if owned[w] != copied[w] {
			t.Fatalf("writer %d was told it copied %d blocks; %d hold its data", w, copied[w], owned[w])
		}
		total += copied[w]
	}
	if got := h.FPos - uint64(dataOff)/BlockSize; got != uint64(total) {
		t.Fatalf("fpos advanced by %d, want %d copies", got, total)
	}
	if h.NrChangedBlocks != uint64(total) {
		t.Fatalf("nr_changed %d, want %d", h.NrChangedBlocks, total)
	}
	if err := f.Close(true); err != nil {
		t.Fatal(err)
	}
	// The same, from the disk.
	r := readRaw(t, path)
	for b, d := range data {
		if e := r.entry(b); !bytes.Equal(r.slot(e), d) {
			t.Fatalf("on disk, block %d -> slot %d holds other data", b, e)
		}
	}
	if r.nr() != uint64(total) {
		t.Fatalf("on-disk nr_changed %d, want %d", r.nr(), total)
	}
}

// TestConcurrentFullAndFailures mixes copies into a store too small for
// them, injected write failures, MarkRange over the same blocks, and
// expansions: never two slots for a block, a failed copy leaves its blocks
// unchanged, every slot holds the data of a copy that succeeded, and
// nr_changed equals the number of non-zero entries.
func TestConcurrentFullAndFailures(t *testing.T) {
	useSparse(t)
	path := tempPath(t)
	const dev = 8 * SectionEntries * BlockSize
	blocks := Blocks(dev)
	dataOff := DataOffset(blocks)
	const slots = 300
	f := mustCreate(t, path, Options{DeviceSize: dev, FileSize: dataOff + slots*BlockSize, CacheBytes: SectionBytes})
	if err := f.Close(true); err != nil {
		t.Fatal(err)
	}
	// Writer w copies with pattern(w, b); a copy meant to fail uses
	// pattern(failWho+w, b), which the storage refuses to write.
	const writers, failWho = 12, 1000
	f, hs := openHooked(t, path, ReloadSnapshot, dev, SectionBytes)
	hs.onWrite = func(p []byte, off int64) error {
		if off >= dataOff && who(p) >= failWho {
			return errInjected
		}
		return nil
	}
	rng := rand.New(rand.NewPCG(7, 7))
	const pool = 2000
	hot := make([]uint64, pool)
	for i := range hot {
		hot[i] = rng.Uint64N(blocks - 4)
	}
	var copies, fulls, failed, expands atomic.Int64
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 8))
			for range 800 {
				b := hot[r.IntN(pool)]
				n := 1 + r.Uint64N(4)
				switch x := r.IntN(100); {
				case x < 10:
					if _, err := f.MarkRange(b, b+n); err != nil {
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
					who := uint64(w)
					if r.IntN(10) == 0 {
						who += failWho
					}
					k, err := f.CopyOnWriteRange(b, blocksOf(who, b, n))
					copies.Add(int64(k)) // also when a copy it waited for failed: its own blocks are copied
					switch {
					case err == nil:
					case errors.Is(err, ErrFull):
						fulls.Add(1)
					case errors.Is(err, errInjected), strings.Contains(err.Error(), "a concurrent copy of block"):
						failed.Add(1)
					default:
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
	if fulls.Load() == 0 || failed.Load() == 0 {
		t.Fatalf("%d full stores, %d failed copies: the test tests nothing", fulls.Load(), failed.Load())
	}
	h := f.Header()
	if h.FSize != uint64(dataOff)+(slots+50*uint64(expands.Load()))*BlockSize {
		t.Fatalf("fsize %d after %d expansions", h.FSize, expands.Load())
	}
	// Every non-zero entry is counted once; every slot entry is a copy that
	// succeeded, in a slot of its own.
	var nonzero, preserved uint64
	if err := f.ChangedRuns(func(a, n uint64) error { nonzero += n; return nil }); err != nil {
		t.Fatal(err)
	}
	if h.NrChangedBlocks != nonzero {
		t.Fatalf("nr_changed %d, non-zero entries %d", h.NrChangedBlocks, nonzero)
	}
	p := make([]byte, BlockSize)
	seen := map[uint64]bool{}
	for b := range blocks {
		e, err := f.Lookup(b)
		if err != nil {
			t.Fatal(err)
		}
		if e <= 1 {
			continue
		}
		preserved++
		if seen[e] {
			t.Fatalf("slot %d used twice", e)
		}
		seen[e] = true
		if err := f.ReadBlock(e, p); err != nil {
			t.Fatal(err)
		}
		if _, err := checkSlotData(p, b, writers); err != nil {
			t.Fatal(err) // a failed copy's data, or no copy's
		}
	}
	if preserved != uint64(copies.Load()) {
		t.Fatalf("%d blocks preserved, %d copies reported", preserved, copies.Load())
	}
	// Failed copies may leak slots when another copy allocated after them,
	// so fpos may run ahead of the copies; it must never fall behind.
	if used := h.FPos - uint64(dataOff)/BlockSize; used < preserved || h.FPos*BlockSize > h.FSize {
		t.Fatalf("fpos %d for %d copies, fsize %d", h.FPos, preserved, h.FSize)
	}
	f.Close(true)
}

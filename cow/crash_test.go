package cow

import (
	"errors"
	"math/rand/v2"
	"os"
	"sync"
	"syscall"
	"testing"
)

// crashStorage is a COW file's bytes as a disk with a volatile cache holds
// them: writes since the last Sync are kept apart (pending) and a crash
// keeps none, all, or any subset of them, in any order; only what a Sync
// covered is sure to survive. Crash tests run the real File code on it and
// check what every crash leaves, so a missing fsync fails them (a test
// reading the page cache would not notice).
type crashStorage struct {
	mu      sync.Mutex
	durable []byte
	pending []pendingWrite
	// onOp, if set, is called before every write and every sync (the
	// points a crash can land between).
	onOp func()
}

type pendingWrite struct {
	off  int64
	data []byte
}

func newCrashStorage(image []byte) *crashStorage {
	return &crashStorage{durable: append([]byte(nil), image...)}
}

// view is the bytes as a reader sees them now (pending writes applied).
func (s *crashStorage) view() []byte {
	b := append([]byte(nil), s.durable...)
	for _, w := range s.pending {
		b = apply(b, w)
	}
	return b
}

func apply(b []byte, w pendingWrite) []byte {
	if end := w.off + int64(len(w.data)); end > int64(len(b)) {
		b = append(b, make([]byte, end-int64(len(b)))...)
	}
	copy(b[w.off:], w.data)
	return b
}

func (s *crashStorage) ReadAt(p []byte, off int64) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v := s.view()
	if off >= int64(len(v)) {
		return 0, errors.New("read past the end")
	}
	n := copy(p, v[off:])
	if n < len(p) {
		return n, errors.New("short read")
	}
	return n, nil
}

func (s *crashStorage) WriteAt(p []byte, off int64) (int, error) {
	if s.onOp != nil {
		s.onOp()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pending = append(s.pending, pendingWrite{off, append([]byte(nil), p...)})
	return len(p), nil
}

func (s *crashStorage) Sync() error {
	if s.onOp != nil {
		s.onOp()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.durable = s.view()
	s.pending = nil
	return nil
}

func (s *crashStorage) Truncate(size int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.durable = s.view()[:size] // treated as durable at once: only shrinks
	s.pending = nil
	return nil
}

func (s *crashStorage) Size() (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return int64(len(s.view())), nil
}

func (s *crashStorage) Close() error { return nil }

// crash returns what survives a crash now: the durable bytes with a
// subset of the pending writes (none, all, or random ones, in order).
func (s *crashStorage) crash(rng *rand.Rand) []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := append([]byte(nil), s.durable...)
	keep := rng.IntN(3) // 0: none, 1: all, 2: a random subset
	for _, w := range s.pending {
		if keep == 1 || (keep == 2 && rng.IntN(2) == 0) {
			b = apply(b, w)
		}
	}
	return b
}

// newCrashFile makes a clean incremental COW file for a device of dev
// bytes and opens it on crash storage, with write-intent logging on.
func newCrashFile(t *testing.T, dev int64) (*File, *crashStorage) {
	t.Helper()
	path := tempPath(t)
	mustCreate(t, path, Options{DeviceSize: dev, IndexOnly: true, CacheBytes: SectionBytes}).Close(true)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := newCrashStorage(b)
	f, _, err := Open(path, s, ReloadIncremental, dev, SectionBytes)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.EnableIntent(); err != nil {
		t.Fatal(err)
	}
	return f, s
}

// reopen opens a crash image as a reload after a crash would.
func reopen(image []byte, dev int64) (*File, Recovered, error) {
	return Open("crashed", newCrashStorage(image), ReloadIncremental, dev, 0)
}

// TestCrashAnyWhere drives an incremental file through marks, group
// commits, checkpoints and cache evictions on crash storage, and crashes
// it before every write and every fsync, dropping none, all or any subset
// of what was not yet fsynced. Every crash image recovers, with every
// block whose write was let through (MarkRange, and CommitIntent when it
// asked for it) marked as changed.
func TestCrashAnyWhere(t *testing.T) {
	const dev = 64 << 20 // 4 sections, 16 regions of 4 MiB
	f, s := newCrashFile(t, dev)
	rng := rand.New(rand.NewPCG(3, 4))
	issued := map[uint64]bool{}
	type capture struct {
		image  []byte
		issued []uint64
	}
	var captures []capture
	s.onOp = func() {
		var done []uint64
		for b := range issued {
			done = append(done, b)
		}
		captures = append(captures, capture{s.crash(rng), done})
	}
	blocks := Blocks(dev)
	for op := range 300 {
		if op%61 == 60 {
			if err := f.Checkpoint(); err != nil {
				t.Fatal(err)
			}
			continue
		}
		first := rng.Uint64N(blocks)
		last := min(first+1+rng.Uint64N(8), blocks)
		mustCommit, err := f.MarkRange(first, last)
		if err != nil {
			t.Fatal(err)
		}
		if mustCommit {
			if err := f.CommitIntent(); err != nil {
				t.Fatal(err)
			}
		}
		for b := first; b < last; b++ {
			issued[b] = true // the write is let through now
		}
	}
	s.onOp = nil
	if len(captures) < 20 {
		t.Fatalf("only %d crash points", len(captures))
	}
	for i, c := range captures {
		g, rec, err := reopen(c.image, dev)
		if err != nil {
			t.Fatalf("crash point %d: %v", i, err)
		}
		for _, b := range c.issued {
			if e, _ := g.Lookup(b); e == 0 {
				t.Fatalf("crash point %d (%+v): block %d was written but is not marked", i, rec, b)
			}
		}
		g.Close(false)
	}
	t.Logf("%d crash points checked", len(captures))
	f.Close(false)
}

// After each of these returns, no crash can lose what it promised:
// Close(true) a clean, whole file; RecordFailure the failure; Checkpoint
// every mark made before it (then with nothing in the intent record for
// regions not written since).
func TestCrashAfterReturn(t *testing.T) {
	const dev = 32 << 20
	rng := rand.New(rand.NewPCG(5, 6))
	crashes := func(s *crashStorage) [][]byte {
		var out [][]byte
		for range 20 {
			out = append(out, s.crash(rng))
		}
		return out
	}

	t.Run("clean close", func(t *testing.T) {
		f, s := newCrashFile(t, dev)
		f.MarkRange(10, 20)
		f.CommitIntent()
		if err := f.Close(true); err != nil {
			t.Fatal(err)
		}
		for _, img := range crashes(s) {
			g, rec, err := reopen(img, dev)
			if err != nil || rec.Crashed {
				t.Fatalf("after a clean close a crash leaves: %+v %v", rec, err)
			}
			if n := g.NrChangedBlocks(); n != 10 {
				t.Fatalf("after a clean close: %d blocks marked, want 10", n)
			}
			g.Close(false)
		}
	})

	t.Run("failure record", func(t *testing.T) {
		f, s := newCrashFile(t, dev)
		if err := f.RecordFailure(syscall.EIO, "injected"); err != nil {
			t.Fatal(err)
		}
		for _, img := range crashes(s) {
			if _, _, err := reopen(img, dev); !errors.Is(err, ErrFailed) {
				t.Fatalf("after RecordFailure a crash leaves a file that opens: %v", err)
			}
		}
		f.Close(false)
	})

	t.Run("checkpoint", func(t *testing.T) {
		f, s := newCrashFile(t, dev)
		for b := uint64(0); b < 4096; b += 97 {
			if must, _ := f.MarkRange(b, b+1); must {
				f.CommitIntent()
			}
		}
		if err := f.Checkpoint(); err != nil {
			t.Fatal(err)
		}
		// An idle interval, then another checkpoint trims every region.
		if err := f.Checkpoint(); err != nil {
			t.Fatal(err)
		}
		for _, img := range crashes(s) {
			g, rec, err := reopen(img, dev)
			if err != nil {
				t.Fatal(err)
			}
			for b := uint64(0); b < 4096; b += 97 {
				if e, _ := g.Lookup(b); e == 0 {
					t.Fatalf("after Checkpoint a crash lost block %d", b)
				}
			}
			if rec.Regions != 0 || g.NrChangedBlocks() != (4096+96)/97 {
				t.Fatalf("after an idle checkpoint a crash recovers %+v, %d blocks", rec, g.NrChangedBlocks())
			}
			g.Close(false)
		}
		f.Close(false)
	})
}

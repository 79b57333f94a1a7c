package cow

import (
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRegionShift(t *testing.T) {
	for _, c := range []struct {
		dev   int64
		shift uint
	}{
		{512 << 20, 22},
		{20 << 30, 22},
		{90 << 30, 22},
		{100 << 30, 23},
		{1 << 40, 26},
		{1 << 50, 36},
	} {
		got := regionShift(Blocks(c.dev))
		if got != c.shift {
			t.Errorf("%d-byte device: region 2^%d, want 2^%d", c.dev, got, c.shift)
		}
		if n := (c.dev + 1<<got - 1) >> got; n > intentMaxBits {
			t.Errorf("%d-byte device: %d regions do not fit %d bits", c.dev, n, intentMaxBits)
		}
	}
}

// crashImage is the file's bytes at one crash point, with the blocks whose
// writes had been let through by then.
type crashImage struct {
	bytes  []byte
	issued map[uint64]bool
}

// TestIntentSurvivesCrashAtEveryPoint drives an incremental file through
// marks, group commits, checkpoints and cache evictions, capturing the file
// at every header write and fsync. Recovering any capture marks every
// block whose write had been let through (MarkRange, then CommitIntent when
// asked), and marks nothing outside the regions written.
func TestIntentSurvivesCrashAtEveryPoint(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "inc")
	const dev = 64 << 20 // 4 sections, 16 regions of 4 MiB
	f := mustCreate(t, path, Options{DeviceSize: dev, IndexOnly: true, CacheBytes: SectionBytes})
	defer f.Close(false) // after the captures: the crash is simulated on copies
	issued := map[uint64]bool{}
	var images []crashImage
	snap := func() map[uint64]bool {
		m := make(map[uint64]bool, len(issued))
		for b := range issued {
			m[b] = true
		}
		return m
	}
	crashPoint = func(g *File) {
		if g != f {
			return
		}
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		images = append(images, crashImage{b, snap()})
	}
	defer func() { crashPoint = func(*File) {} }()
	if err := f.EnableIntent(); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	blocks := Blocks(dev)
	for op := range 400 {
		switch {
		case op%97 == 96:
			if err := f.Checkpoint(); err != nil {
				t.Fatal(err)
			}
		default:
			first := rng.Uint64N(blocks)
			last := min(first+1+rng.Uint64N(8), blocks)
			must, err := f.MarkRange(first, last)
			if err != nil {
				t.Fatal(err)
			}
			if must {
				if err := f.CommitIntent(); err != nil {
					t.Fatal(err)
				}
			}
			for b := first; b < last; b++ {
				issued[b] = true // the write is let through now
			}
		}
	}
	// A crash now: whatever is on disk at this moment.
	crashPoint(f)
	if len(images) < 20 {
		t.Fatalf("only %d crash points", len(images))
	}
	regionOf := func(b uint64) uint64 { return b * BlockSize >> minRegionShift }
	for i, img := range images {
		p := filepath.Join(dir, "img")
		if err := os.WriteFile(p, img.bytes, 0o600); err != nil {
			t.Fatal(err)
		}
		g, rec, err := openPath(p, ReloadIncremental, dev, 0)
		if err != nil {
			t.Fatalf("crash point %d: %v", i, err)
		}
		written := map[uint64]bool{}
		for b := range issued { // every block written by the end bounds what may be marked
			for k := uint64(0); k <= readAhead; k++ {
				written[regionOf(b)+k] = true // with the regions recorded ahead
			}
		}
		for b := range img.issued {
			if e, _ := g.Lookup(b); e == 0 {
				t.Fatalf("crash point %d (%+v): block %d was written but is not marked", i, rec, b)
			}
		}
		err = g.ChangedRuns(func(first, count uint64) error {
			for b := first; b < first+count; b++ {
				if !written[regionOf(b)] {
					t.Fatalf("crash point %d: block %d marked in a region never written nor recorded ahead", i, b)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		g.Close(false)
	}
	// A checkpoint with nothing written after it leaves no regions: a
	// crash then recovers exactly the written blocks.
	if err := f.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	if n, _ := f.intentRegions(); n != 0 {
		t.Fatalf("%d regions recorded after an idle checkpoint", n)
	}
	crashPoint(f)
	last := images[len(images)-1]
	p := filepath.Join(dir, "last")
	os.WriteFile(p, last.bytes, 0o600)
	g, rec, err := openPath(p, ReloadIncremental, dev, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close(false)
	if !rec.Crashed || rec.Regions != 0 || rec.Marked != 0 {
		t.Fatalf("after an idle checkpoint: %+v", rec)
	}
	if got := g.NrChangedBlocks(); got != uint64(len(issued)) {
		t.Fatalf("%d blocks marked, %d written", got, len(issued))
	}
}

// TestRecoverRefuses: a dirty file without a record (a crashed snapshot, or
// dattobd's own) and a torn record are refused and left as they were.
func TestRecoverRefuses(t *testing.T) {
	const dev = 64 << 20
	dir := t.TempDir()
	snap := filepath.Join(dir, "snap")
	f := mustCreate(t, snap, Options{DeviceSize: dev})
	f.Close(false)
	before, _ := os.ReadFile(snap)
	if _, _, err := openPath(snap, ReloadIncremental, dev, 0); !errors.Is(err, ErrMode) {
		t.Fatalf("crashed snapshot as an incremental: %v", err)
	}
	if _, _, err := openPath(snap, ReloadSnapshot, dev, 0); !errors.Is(err, ErrNotClean) {
		t.Fatalf("crashed snapshot: %v", err)
	}
	if after, _ := os.ReadFile(snap); string(after) != string(before) {
		t.Fatal("a refused recovery changed the file")
	}

	inc := filepath.Join(dir, "inc")
	g := mustCreate(t, inc, Options{DeviceSize: dev, IndexOnly: true})
	if err := g.EnableIntent(); err != nil {
		t.Fatal(err)
	}
	if must, err := g.MarkRange(10, 20); err != nil || !must {
		t.Fatalf("first mark in a region: %v %v", must, err)
	}
	if err := g.CommitIntent(); err != nil {
		t.Fatal(err)
	}
	if must, _ := g.MarkRange(30, 31); must {
		t.Fatal("a recorded region asked for another commit")
	}
	g.Close(false)
	torn, _ := os.ReadFile(inc)
	torn[intentOff+intentBitsOff] ^= 0x80
	os.WriteFile(inc, torn, 0o600)
	if _, _, err := openPath(inc, ReloadIncremental, dev, 0); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "a full backup is required") {
		t.Fatalf("torn record: %v", err)
	}
	if after, _ := os.ReadFile(inc); string(after) != string(torn) {
		t.Fatal("a refused recovery changed the file")
	}
	// Without a record at all (a dirty file of dattobd's): refused too.
	clear(torn[intentOff:])
	os.WriteFile(inc, torn, 0o600)
	if _, _, err := openPath(inc, ReloadIncremental, dev, 0); !errors.Is(err, ErrNotClean) || !strings.Contains(err.Error(), "a full backup is required") {
		t.Fatalf("dirty file without a record: %v", err)
	}
}

// TestCleanCloseDropsIntent: a cleanly closed file has its reserved space
// zero again (what dattobd writes), and reopens without recovery.
func TestCleanCloseDropsIntent(t *testing.T) {
	const dev = 64 << 20
	path := tempPath(t)
	f := mustCreate(t, path, Options{DeviceSize: dev, IndexOnly: true})
	if err := f.EnableIntent(); err != nil {
		t.Fatal(err)
	}
	if must, _ := f.MarkRange(5, 6); must {
		f.CommitIntent()
	}
	if err := f.Close(true); err != nil {
		t.Fatal(err)
	}
	if !readRaw(t, path).reservedZero() {
		t.Fatal("clean file keeps a write-intent record")
	}
	before, _ := os.ReadFile(path)
	if _, _, err := openPath(path, ReloadSnapshot, dev, 0); !errors.Is(err, ErrMode) {
		t.Fatalf("incremental file as a snapshot: %v", err)
	}
	if after, _ := os.ReadFile(path); string(after) != string(before) {
		t.Fatal("a refused ReloadSnapshot changed the file")
	}
	g, rec, err := openPath(path, ReloadIncremental, dev, 0)
	if err != nil || rec.Crashed {
		t.Fatalf("clean reopen: %+v %v", rec, err)
	}
	defer g.Close(false)
	if e, _ := g.Lookup(5); e != 1 {
		t.Fatalf("block 5 entry %d", e)
	}
}

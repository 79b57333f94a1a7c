package cow

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// blocksOf returns the concatenated pattern(who, b) of blocks first..first+n-1.
func blocksOf(who, first, n uint64) []byte {
	var out []byte
	for b := first; b < first+n; b++ {
		out = append(out, pattern(who, b)...)
	}
	return out
}

func mustData(t *testing.T, f *File, b uint64, want []byte) {
	t.Helper()
	e, err := f.Lookup(b)
	if err != nil || e <= 1 {
		t.Fatalf("block %d: entry %d, %v", b, e, err)
	}
	got := make([]byte, BlockSize)
	if err := f.ReadBlock(e, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("block %d holds the wrong data", b)
	}
}

// TestCopyOnWriteRange copies a request's unpreserved blocks into
// consecutive slots, leaves already preserved blocks alone, and counts.
func TestCopyOnWriteRange(t *testing.T) {
	path := tempPath(t)
	const dev = 64 << 20
	f := mustCreate(t, path, Options{DeviceSize: dev})
	defer f.Close(false)
	// Blocks 12 and 14 were preserved earlier with other data.
	for _, b := range []uint64{12, 14} {
		if n, err := f.CopyOnWriteRange(b, pattern(9, b)); n != 1 || err != nil {
			t.Fatal(n, err)
		}
	}
	fpos := f.Header().FPos
	n, err := f.CopyOnWriteRange(10, blocksOf(1, 10, 8))
	if err != nil || n != 6 {
		t.Fatalf("copied %d, %v; want 6", n, err)
	}
	if got := f.Header().FPos; got != fpos+6 {
		t.Fatalf("fpos %d, want %d", got, fpos+6)
	}
	if got := f.NrChangedBlocks(); got != 8 {
		t.Fatalf("nr_changed %d, want 8", got)
	}
	prev := uint64(0)
	for b := uint64(10); b < 18; b++ {
		if b == 12 || b == 14 {
			mustData(t, f, b, pattern(9, b))
			continue
		}
		mustData(t, f, b, pattern(1, b))
		e, _ := f.Lookup(b)
		if prev != 0 && e != prev+1 {
			t.Fatalf("block %d in slot %d, not next to %d", b, e, prev)
		}
		prev = e
	}
	// A second call over the same range copies nothing.
	if n, err := f.CopyOnWriteRange(10, blocksOf(2, 10, 8)); n != 0 || err != nil {
		t.Fatalf("recopy: %d %v", n, err)
	}
	mustData(t, f, 11, pattern(1, 11))
	if _, err := f.CopyOnWriteRange(0, make([]byte, 100)); err == nil {
		t.Fatal("partial block accepted")
	}
	if _, err := f.CopyOnWriteRange(Blocks(dev)-1, make([]byte, 2*BlockSize)); err == nil {
		t.Fatal("range past the device accepted")
	}
}

// TestCopyOnWriteRangeFull refuses a range the store cannot hold whole and
// changes nothing.
func TestCopyOnWriteRangeFull(t *testing.T) {
	path := tempPath(t)
	const dev = 64 << 20
	dataOff := DataOffset(Blocks(dev))
	f := mustCreate(t, path, Options{DeviceSize: dev, FileSize: dataOff + 4*BlockSize})
	defer f.Close(false)
	h := f.Header()
	_, err := f.CopyOnWriteRange(100, blocksOf(1, 100, 5))
	if !errors.Is(err, ErrFull) {
		t.Fatalf("5 blocks into 4 slots: %v", err)
	}
	if f.Header() != h {
		t.Fatalf("ErrFull changed the header: %+v", f.Header())
	}
	for b := uint64(100); b < 105; b++ {
		if e, _ := f.Lookup(b); e != 0 {
			t.Fatalf("block %d entry %d after ErrFull", b, e)
		}
	}
	if n, err := f.CopyOnWriteRange(100, blocksOf(1, 100, 4)); n != 4 || err != nil {
		t.Fatalf("4 blocks into 4 slots: %d %v", n, err)
	}
}

// TestCopyOnWriteRangeWaitsForFailedCopy: a range that overlaps a block
// another call is copying waits for it, and reports its failure.
func TestCopyOnWriteRangeWaitsForFailedCopy(t *testing.T) {
	path := tempPath(t)
	const dev = 64 << 20
	g := mustCreate(t, path, Options{DeviceSize: dev})
	g.Close(true)
	f, hs := openHooked(t, path, ReloadSnapshot, dev, 0)
	defer f.Close(false)
	// The copy of block 21 with pattern(7, 21) is held in its data write,
	// then fails.
	entered, release := make(chan struct{}), make(chan struct{})
	hs.onWrite = func(p []byte, off int64) error {
		if off >= DataOffset(Blocks(dev)) && who(p) == 7 {
			close(entered)
			<-release
			return errInjected
		}
		return nil
	}
	done := make(chan error)
	go func() {
		_, err := f.CopyOnWriteRange(21, pattern(7, 21))
		done <- err
	}()
	<-entered
	fpos := f.Header().FPos
	res := make(chan error)
	go func() {
		_, err := f.CopyOnWriteRange(20, blocksOf(1, 20, 3))
		res <- err
	}()
	// Once the range has reserved slots for 20 and 22 it has seen 21 busy.
	for f.Header().FPos != fpos+2 {
		runtime.Gosched()
	}
	select {
	case err := <-res:
		t.Fatalf("range returned before the copy it overlaps finished: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	close(release)
	if err := <-done; err == nil {
		t.Fatal("injected failure lost")
	}
	if err := <-res; err == nil {
		t.Fatal("range over a failed copy reported success")
	}
	mustData(t, f, 20, pattern(1, 20))
	mustData(t, f, 22, pattern(1, 22))
	if e, _ := f.Lookup(21); e != 0 {
		t.Fatalf("failed block has entry %d", e)
	}
}

// TestConcurrentCopyOnWriteRange: overlapping ranges and single-block
// copies from many goroutines copy each block exactly once, into distinct
// slots, with the data of the (one) old contents.
func TestConcurrentCopyOnWriteRange(t *testing.T) {
	path := tempPath(t)
	const dev = 64 << 20
	const span = 2000
	f := mustCreate(t, path, Options{DeviceSize: dev, FileSize: DataOffset(Blocks(dev)) + (span+64)*BlockSize})
	defer f.Close(false)
	var mu sync.Mutex
	total := 0
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for range 300 {
				first := rng.Uint64N(span)
				n := 1 + rng.Uint64N(64)
				copied, err := f.CopyOnWriteRange(first, blocksOf(0, first, n))
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				total += copied
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	seen := map[uint64]uint64{}
	count := 0
	for b := uint64(0); b < span+64; b++ {
		e, err := f.Lookup(b)
		if err != nil {
			t.Fatal(err)
		}
		if e == 0 {
			continue
		}
		count++
		if other, dup := seen[e]; dup {
			t.Fatalf("blocks %d and %d share slot %d", other, b, e)
		}
		seen[e] = b
		mustData(t, f, b, pattern(0, b))
	}
	if count != total || uint64(count) != f.NrChangedBlocks() {
		t.Fatalf("%d blocks preserved, %d copies reported, nr_changed %d", count, total, f.NrChangedBlocks())
	}
}

// TestResumeSnapshotAfterServerDeath: a snapshot file abandoned without a
// close (its server was killed; the page cache, which is what the file
// reads as, survived) reopens with ResumeSnapshot: every preserved block
// reads back its old data, new copies get fresh slots, and the counts are
// rebuilt. ReloadSnapshot refuses the same dirty file.
func TestResumeSnapshotAfterServerDeath(t *testing.T) {
	const dev = 64 << 20
	path := tempPath(t)
	f := mustCreate(t, path, Options{DeviceSize: dev, CacheBytes: SectionBytes})
	want := map[uint64][]byte{}
	rng := rand.New(rand.NewPCG(8, 8))
	for range 40 {
		first := rng.Uint64N(Blocks(dev) - 64)
		n := 1 + rng.Uint64N(64)
		if _, err := f.CopyOnWriteRange(first, blocksOf(first%7, first, n)); err != nil {
			t.Fatal(err)
		}
		for b := first; b < first+n; b++ {
			if _, ok := want[b]; !ok {
				want[b] = pattern(first%7, b)
			}
		}
	}
	fpos := f.Header().FPos
	// The server dies here: no Close, the header on disk is the one
	// Create wrote (fpos at the first slot, nothing counted).
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	f.Close(false) // the copy is the dead server's file; this one is done
	crashed := filepath.Join(t.TempDir(), "crashed")
	os.WriteFile(crashed, img, 0o600)
	if _, _, err := openPath(crashed, ReloadSnapshot, dev, 0); !errors.Is(err, ErrNotClean) {
		t.Fatalf("ReloadSnapshot of a dirty snapshot: %v", err)
	}
	g, rec, err := openPath(crashed, ResumeSnapshot, dev, 0)
	if err != nil || !rec.Crashed {
		t.Fatal(rec, err)
	}
	defer g.Close(false)
	if got := g.NrChangedBlocks(); got != uint64(len(want)) {
		t.Fatalf("nr_changed %d, want %d", got, len(want))
	}
	if got := g.Header().FPos; got != fpos {
		t.Fatalf("fpos rebuilt as %d, want %d", got, fpos)
	}
	for b, data := range want {
		mustData(t, g, b, data)
	}
	// A new copy after recovery must not reuse a slot.
	free := uint64(0)
	for want[free] != nil {
		free++
	}
	if n, err := g.CopyOnWriteRange(free, pattern(9, free)); n != 1 || err != nil {
		t.Fatal(n, err)
	}
	if e, _ := g.Lookup(free); e != fpos {
		t.Fatalf("new copy in slot %d, want %d", e, fpos)
	}
	for b, data := range want {
		mustData(t, g, b, data)
	}
}

// TestRangeCopyStaysInFlightUntilFinish: a RangeCopy's blocks count as not
// preserved from BeginRange to Finish, even once Publish has set their
// entries (which are not yet written through): AllPreserved says no,
// BeginRange refuses them and CopyOnWriteRange waits; after Finish they
// are preserved with the copy's data.
func TestRangeCopyStaysInFlightUntilFinish(t *testing.T) {
	path := tempPath(t)
	f := mustCreate(t, path, Options{DeviceSize: 64 << 20})
	defer f.Close(false)
	if n, err := f.CopyOnWriteRange(21, pattern(9, 21)); n != 1 || err != nil {
		t.Fatal(n, err)
	}
	c, err := f.BeginRange(20, 4)
	if err != nil {
		t.Fatal(err)
	}
	finished := false
	defer func() { // before Close, which waits for copies in flight
		if !finished {
			c.Finish(errors.New("test failed"))
		}
	}()
	if got := c.Blocks(); len(got) != 3 || got[0] != 20 || got[1] != 22 || got[2] != 23 {
		t.Fatalf("blocks %v, want [20 22 23]", got)
	}
	fd, off := c.DataTarget()
	data := append(append(pattern(1, 20), pattern(1, 22)...), pattern(1, 23)...)
	if _, err := unix.Pwrite(fd, data, off); err != nil {
		t.Fatal(err)
	}
	index, err := c.Publish()
	if err != nil {
		t.Fatal(err)
	}
	if len(index) != 2 {
		t.Fatalf("%d index writes, want 2 (blocks 20, then 22..23)", len(index))
	}
	if ok, _ := f.AllPreserved(22, 24); ok {
		t.Fatal("AllPreserved before Finish: a write could reach the device before its entry is written through")
	}
	if _, err := f.BeginRange(23, 1); !errors.Is(err, ErrCopyBusy) {
		t.Fatalf("BeginRange of a block in flight: %v, want ErrCopyBusy", err)
	}
	copied := make(chan error, 1)
	go func() { _, err := f.CopyOnWriteRange(22, blocksOf(2, 22, 2)); copied <- err }()
	select {
	case err := <-copied:
		t.Fatalf("CopyOnWriteRange of blocks in flight returned (%v) before Finish", err)
	case <-time.After(50 * time.Millisecond):
	}
	for _, w := range index {
		if _, err := unix.Pwrite(w.FD, w.Buf, w.Off); err != nil {
			t.Fatal(err)
		}
	}
	finished = true
	if err := c.Finish(nil); err != nil {
		t.Fatal(err)
	}
	if err := <-copied; err != nil {
		t.Fatal(err)
	}
	if ok, err := f.AllPreserved(20, 24); !ok || err != nil {
		t.Fatalf("AllPreserved after Finish = %v, %v", ok, err)
	}
	for _, b := range []uint64{20, 22, 23} {
		mustData(t, f, b, pattern(1, b))
	}
	mustData(t, f, 21, pattern(9, 21))
	raw := readRaw(t, path)
	for _, b := range []uint64{20, 22, 23} {
		if e, _ := f.Lookup(b); raw.u64(HeaderSize+int(b)*8) != e {
			t.Fatalf("block %d: entry %d not written through to the file", b, e)
		}
	}
}

// TestRangeCopyFailureGivesSlotsBack: a copy that fails before Publish
// leaves its blocks unpreserved, gives its slots back and releases them.
func TestRangeCopyFailureGivesSlotsBack(t *testing.T) {
	f := mustCreate(t, tempPath(t), Options{DeviceSize: 64 << 20})
	defer f.Close(false)
	fpos := f.Header().FPos
	c, err := f.BeginRange(5, 2)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Finish(unix.EIO); !errors.Is(err, unix.EIO) {
		t.Fatalf("Finish = %v, want EIO", err)
	}
	if got := f.Header().FPos; got != fpos {
		t.Fatalf("fpos %d, want %d given back", got, fpos)
	}
	if e, _ := f.Lookup(5); e != 0 {
		t.Fatalf("block 5 entry %d after a failed copy", e)
	}
	c, err = f.BeginRange(5, 2)
	if err != nil || len(c.Blocks()) != 2 {
		t.Fatalf("BeginRange after the failure: %v", err)
	}
	c.Finish(unix.EIO)
}

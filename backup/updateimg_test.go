package backup

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dbdublk/dbdublk/cow"
)

// The COW file's header carries cowSeq; the snapshot the image is brought
// up to is the next one.
const (
	cowSeq  = 4
	snapSeq = cowSeq + 1
)

var testUUID = [16]byte{0x8a, 0x1f, 0x3c, 0x44, 0x90, 0x01, 0x4b, 0x7e, 0x9d, 0x22, 0x5e, 0x61, 0x07, 0xc3, 0xaa, 0x10}

// fixture is a snapshot file, a COW file listing the changed blocks and an
// image that is the snapshot except for exactly those blocks.
type fixture struct {
	dir     string
	snap    string // the "snapshot device": a regular file
	cowPath string
	img     string
	size    int64
	changed []uint64 // sorted, distinct
}

func (fx *fixture) snapshot() Snapshot {
	return Snapshot{Path: fx.snap, UUID: testUUID, SeqID: snapSeq, Size: fx.size}
}

// blockLen is the number of device bytes in block b (the last one may be
// partial).
func blockLen(size int64, b uint64) int64 {
	return min(cow.BlockSize, size-int64(b)*cow.BlockSize)
}

func changedBytes(size int64, blocks []uint64) int64 {
	var n int64
	for _, b := range blocks {
		n += blockLen(size, b)
	}
	return n
}

// pickBlocks chooses a random set of blocks of a device of nblocks: block
// 0, the last block, the run ending at the last block, runs crossing every
// section boundary, one run longer than 1 MiB, and random single blocks
// and short runs. The result is sorted and distinct.
func pickBlocks(rng *rand.Rand, nblocks uint64) []uint64 {
	set := map[uint64]bool{}
	addRun := func(first, n uint64) {
		for b := first; b < first+n && b < nblocks; b++ {
			set[b] = true
		}
	}
	addRun(0, 1)
	addRun(nblocks-1, 1)
	if nblocks > 8 {
		addRun(nblocks-6, 6)
	}
	for s := uint64(cow.SectionEntries); s < nblocks; s += cow.SectionEntries {
		addRun(s-7, 13) // crosses the boundary between two index sections
	}
	if nblocks > 1000 {
		addRun(nblocks/3, 300) // 300 blocks = 1.17 MiB: split by a 1 MiB ChunkMax
	}
	for range 40 {
		addRun(rng.Uint64N(nblocks), 1+rng.Uint64N(4))
	}
	blocks := make([]uint64, 0, len(set))
	for b := range set {
		blocks = append(blocks, b)
	}
	slices.Sort(blocks)
	return blocks
}

// runs coalesces sorted distinct blocks into (first, count) runs.
func runsOf(blocks []uint64) [][2]uint64 {
	var out [][2]uint64
	for _, b := range blocks {
		if n := len(out); n > 0 && out[n-1][0]+out[n-1][1] == b {
			out[n-1][1]++
			continue
		}
		out = append(out, [2]uint64{b, 1})
	}
	return out
}

// wantCopies is the number of copies UpdateImage makes: each run of
// adjacent changed blocks is one byte range (clipped to the device), split
// into pieces of at most chunk bytes.
func wantCopies(size int64, blocks []uint64, chunk int64) int {
	n := 0
	for _, r := range runsOf(blocks) {
		off := int64(r[0]) * cow.BlockSize
		end := min(int64(r[0]+r[1])*cow.BlockSize, size)
		n += int((end - off + chunk - 1) / chunk)
	}
	return n
}

func randomBytes(rng *rand.Rand, n int64) []byte {
	b := make([]byte, n)
	for i := 0; i+8 <= len(b); i += 8 {
		v := rng.Uint64()
		for k := range 8 {
			b[i+k] = byte(v >> (8 * k))
		}
	}
	for i := len(b) &^ 7; i < len(b); i++ {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// garble returns a copy of data with every byte of the given blocks
// inverted, so that any byte UpdateImage fails to copy differs.
func garble(data []byte, blocks []uint64) []byte {
	out := bytes.Clone(data)
	for _, b := range blocks {
		off := int64(b) * cow.BlockSize
		end := min(off+cow.BlockSize, int64(len(out)))
		for i := off; i < end; i++ {
			out[i] = ^out[i]
		}
	}
	return out
}

// makeIndexCOW creates an index-only (incremental) COW file for a device of
// size bytes with the given blocks marked changed, closed as asked.
func makeIndexCOW(t *testing.T, path string, size int64, uuid [16]byte, seq uint64, blocks []uint64, clean bool) {
	t.Helper()
	f, err := cow.Create(path, cow.Options{DeviceSize: size, IndexOnly: true, SeqID: seq, UUID: uuid})
	if err != nil {
		t.Fatal(err)
	}
	for i, b := range blocks {
		if _, err := f.MarkRange(b, b+1); err != nil || f.NrChangedBlocks() != uint64(i+1) {
			t.Fatalf("MarkRange(%d): %v, %d changed after %d marks", b, err, f.NrChangedBlocks(), i+1)
		}
	}
	if got := f.NrChangedBlocks(); got != uint64(len(blocks)) {
		t.Fatalf("cow file counts %d changed blocks, marked %d", got, len(blocks))
	}
	if err := f.Close(clean); err != nil {
		t.Fatal(err)
	}
}

// makeSnapshotCOW goes the realistic way: a snapshot-mode COW file in
// which the blocks in cowBlocks are preserved by copy-on-write and those in
// marked are marked changed (writes after the switch to incremental), then
// the data store is dropped (TruncateToIndex) unless keepData, and the
// file is closed cleanly.
func makeSnapshotCOW(t *testing.T, path string, size int64, cowBlocks, marked []uint64, keepData bool) {
	t.Helper()
	// A store large enough for every block of the device.
	f, err := cow.Create(path, cow.Options{DeviceSize: size, FileSize: cow.DataOffset(cow.Blocks(size)) + size + cow.BlockSize,
		SeqID: cowSeq, UUID: testUUID})
	if err != nil {
		t.Fatal(err)
	}
	old := bytes.Repeat([]byte{0x5a}, cow.BlockSize)
	for _, b := range cowBlocks {
		copied, err := f.CopyOnWriteRange(b, old)
		if err != nil || copied != 1 {
			t.Fatalf("CopyOnWriteRange(%d) = %v, %v", b, copied, err)
		}
	}
	for _, b := range marked {
		before := f.NrChangedBlocks()
		if _, err := f.MarkRange(b, b+1); err != nil || f.NrChangedBlocks() != before+1 {
			t.Fatalf("MarkRange(%d): %v, changed %d -> %d", b, err, before, f.NrChangedBlocks())
		}
	}
	if !keepData {
		if err := f.TruncateToIndex(); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(true); err != nil {
		t.Fatal(err)
	}
}

// newFixture builds a fully random snapshot of size bytes, an index-only
// COW file marking blocks, and the garbled image.
func newFixture(t *testing.T, size int64, seed uint64, blocks []uint64) (*fixture, []byte) {
	t.Helper()
	dir := t.TempDir()
	fx := &fixture{
		dir:     dir,
		snap:    filepath.Join(dir, "snapshot"),
		cowPath: filepath.Join(dir, "cow"),
		img:     filepath.Join(dir, "image"),
		size:    size,
		changed: blocks,
	}
	data := randomBytes(rand.New(rand.NewPCG(seed, 1)), size)
	writeFile(t, fx.snap, data)
	writeFile(t, fx.img, garble(data, blocks))
	makeIndexCOW(t, fx.cowPath, size, testUUID, cowSeq, blocks, true)
	return fx, data
}

// progressLog records Progress calls; it is safe for concurrent use.
type progressLog struct {
	mu    sync.Mutex
	done  []int64
	total []int64
}

func (p *progressLog) fn(done, total int64) {
	p.mu.Lock()
	p.done = append(p.done, done)
	p.total = append(p.total, total)
	p.mu.Unlock()
}

// check verifies the calls, whatever order concurrent copies finish in:
// every call reports the run's total, there is at most one call per copy
// (copies that finish before the total is counted are reported together
// by the first call), the done values are distinct, no copy after the
// first call is larger than chunk, and the largest done is the total. With
// ordered (a single worker) it also requires the calls to come in
// increasing order of done, the last one reporting the total.
func (p *progressLog) check(t *testing.T, total, chunk int64, copies int, ordered bool) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.done) > copies {
		t.Errorf("Progress called %d times, want at most %d (one per copy)", len(p.done), copies)
	}
	if total == 0 {
		return
	}
	if len(p.done) == 0 {
		t.Fatalf("Progress never called")
	}
	for i, tot := range p.total {
		if tot != total {
			t.Fatalf("Progress call %d reports total %d, want %d", i, tot, total)
		}
	}
	if ordered {
		checkIncreasing(t, p.done, total)
	}
	sorted := slices.Clone(p.done)
	slices.Sort(sorted)
	prev := int64(0)
	for _, d := range sorted {
		if d <= prev {
			t.Fatalf("Progress reported done %d twice, or 0 (calls %v)", d, p.done)
		}
		if prev > 0 && d-prev > chunk {
			t.Fatalf("Progress: a copy of %d bytes is larger than ChunkMax %d", d-prev, chunk)
		}
		prev = d
	}
	if prev != total {
		t.Fatalf("Progress reported at most %d bytes done, want the total %d", prev, total)
	}
}

// checkIncreasing requires done to increase strictly from call to call and
// to end at total.
func checkIncreasing(t *testing.T, done []int64, total int64) {
	t.Helper()
	prev := int64(0)
	for i, d := range done {
		if d <= prev {
			t.Fatalf("Progress call %d reports done %d after %d: not increasing (calls %d..%d: %v)",
				i, d, prev, max(0, i-3), i, done[max(0, i-3):i+1])
		}
		prev = d
	}
	if prev != total {
		t.Fatalf("last Progress call reports done %d, want the total %d (calls %v)", prev, total, done)
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// firstDiff describes where a and b first differ, by block.
func firstDiff(a, b []byte) string {
	if len(a) != len(b) {
		return fmt.Sprintf("lengths %d and %d", len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			return fmt.Sprintf("first difference at byte %d (block %d)", i, i/cow.BlockSize)
		}
	}
	return "equal"
}

func TestUpdateImage(t *testing.T) {
	sizes := []struct {
		name string
		size int64
	}{
		{"5MiB+1536", 5<<20 + 1536},      // one index section, partial last block
		{"17MiB+1536", 17<<20 + 1536},    // two sections: runs cross block 4096
		{"32MiB+100", 32<<20 + 100},      // 16 MiB × k plus a tail: the tail block opens a third section
		{"4096-aligned", 3<<20 + 4096*3}, // no partial block
	}
	for i, sz := range sizes {
		blocks := pickBlocks(rand.New(rand.NewPCG(uint64(i), 7)), cow.Blocks(sz.size))
		for _, workers := range []int{1, 8} {
			for _, chunk := range []int64{4096, 1 << 20} {
				name := fmt.Sprintf("%s/workers=%d/chunk=%d", sz.name, workers, chunk)
				t.Run(name, func(t *testing.T) {
					fx, data := newFixture(t, sz.size, uint64(i), blocks)
					var log progressLog
					sum, err := UpdateImage(fx.snapshot(), fx.cowPath, fx.img, Options{Workers: workers, ChunkMax: chunk, Progress: log.fn})
					if err != nil {
						t.Fatal(err)
					}
					if got := readFile(t, fx.img); !bytes.Equal(got, data) {
						t.Fatalf("image differs from the snapshot: %s", firstDiff(got, data))
					}
					want := changedBytes(sz.size, blocks)
					if sum.BlocksChanged != uint64(len(blocks)) || sum.BytesCopied != want {
						t.Fatalf("summary %+v, want %d blocks, %d bytes", sum, len(blocks), want)
					}
					if sum.Seconds < 0 {
						t.Fatalf("summary seconds %v", sum.Seconds)
					}
					log.check(t, want, chunk, wantCopies(sz.size, blocks, chunk), workers == 1)
				})
			}
		}
	}
}

// Only the blocks the COW file lists are written: everything else in the
// image keeps its own bytes, even where the snapshot differs, and the
// image keeps its size (the partial last block is not padded).
func TestUpdateImageCopiesOnlyChangedBlocks(t *testing.T) {
	const size = 5<<20 + 1536
	nblocks := cow.Blocks(size)
	rng := rand.New(rand.NewPCG(11, 12))
	blocks := pickBlocks(rng, nblocks)
	dir := t.TempDir()
	snap, cowPath, img := filepath.Join(dir, "snapshot"), filepath.Join(dir, "cow"), filepath.Join(dir, "image")
	data := randomBytes(rng, size)
	writeFile(t, snap, data)
	old := bytes.Repeat([]byte{0xa5}, size)
	writeFile(t, img, old)
	makeIndexCOW(t, cowPath, size, testUUID, cowSeq, blocks, true)

	if _, err := UpdateImage(Snapshot{Path: snap, UUID: testUUID, SeqID: snapSeq, Size: size}, cowPath, img, Options{}); err != nil {
		t.Fatal(err)
	}
	got := readFile(t, img)
	if int64(len(got)) != size {
		t.Fatalf("image is %d bytes after the update, want %d", len(got), size)
	}
	changed := map[uint64]bool{}
	for _, b := range blocks {
		changed[b] = true
	}
	for b := uint64(0); b < nblocks; b++ {
		off := int64(b) * cow.BlockSize
		end := off + blockLen(size, b)
		want := old[off:end]
		if changed[b] {
			want = data[off:end]
		}
		if !bytes.Equal(got[off:end], want) {
			t.Fatalf("block %d (changed %v) has the wrong contents", b, changed[b])
		}
	}
}

// The realistic path: a snapshot-mode COW file (copy-on-write slots, then
// blocks marked after the switch to incremental), truncated to its index
// and closed cleanly. A slot number means "changed" just like 1.
func TestUpdateImageFromSnapshotModeCOW(t *testing.T) {
	for _, tc := range []struct {
		name     string
		size     int64
		keepData bool
	}{
		{"truncated/5MiB+1536", 5<<20 + 1536, false},
		{"truncated/17MiB+1536", 17<<20 + 1536, false},
		// Closed without dropping the data store: the index extent comes
		// from the snapshot's size (SetDeviceSize).
		{"with-data-store/17MiB+1536", 17<<20 + 1536, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nblocks := cow.Blocks(tc.size)
			blocks := pickBlocks(rand.New(rand.NewPCG(21, uint64(tc.size))), nblocks)
			// Split: every other run is preserved by copy-on-write, the rest
			// is marked; the last block is copied on write.
			var cowBlocks, marked []uint64
			for i, r := range runsOf(blocks) {
				for b := r[0]; b < r[0]+r[1]; b++ {
					if i%2 == 0 || b == nblocks-1 {
						cowBlocks = append(cowBlocks, b)
					} else {
						marked = append(marked, b)
					}
				}
			}
			dir := t.TempDir()
			snap, cowPath, img := filepath.Join(dir, "snapshot"), filepath.Join(dir, "cow"), filepath.Join(dir, "image")
			data := randomBytes(rand.New(rand.NewPCG(22, 23)), tc.size)
			writeFile(t, snap, data)
			writeFile(t, img, garble(data, blocks))
			makeSnapshotCOW(t, cowPath, tc.size, cowBlocks, marked, tc.keepData)

			for _, workers := range []int{1, 8} {
				writeFile(t, img, garble(data, blocks))
				var log progressLog
				sum, err := UpdateImage(Snapshot{Path: snap, UUID: testUUID, SeqID: snapSeq, Size: tc.size}, cowPath, img,
					Options{Workers: workers, ChunkMax: 64 << 10, Progress: log.fn})
				if err != nil {
					t.Fatalf("workers %d: %v", workers, err)
				}
				if got := readFile(t, img); !bytes.Equal(got, data) {
					t.Fatalf("workers %d: image differs from the snapshot: %s", workers, firstDiff(got, data))
				}
				want := changedBytes(tc.size, blocks)
				if sum.BlocksChanged != uint64(len(blocks)) || sum.BytesCopied != want {
					t.Fatalf("workers %d: summary %+v, want %d blocks, %d bytes", workers, sum, len(blocks), want)
				}
				log.check(t, want, 64<<10, wantCopies(tc.size, blocks, 64<<10), workers == 1)
			}
		})
	}
}

// A device larger than 8 index sections (128 MiB): ChangedRuns reads the
// index 8 sections at a time, so runs cross a read boundary too. The
// snapshot and image are sparse apart from the blocks around the changes.
func TestUpdateImageLargeSparseDevice(t *testing.T) {
	const size = 130<<20 + 1536
	nblocks := cow.Blocks(size)
	rng := rand.New(rand.NewPCG(31, 32))
	blocks := pickBlocks(rng, nblocks)
	// Also a run across the 8-section read boundary of ChangedRuns.
	for b := uint64(8*cow.SectionEntries - 3); b < 8*cow.SectionEntries+3; b++ {
		if _, ok := slices.BinarySearch(blocks, b); !ok {
			blocks = append(blocks, b)
		}
	}
	slices.Sort(blocks)

	dir := t.TempDir()
	snap, cowPath, img := filepath.Join(dir, "snapshot"), filepath.Join(dir, "cow"), filepath.Join(dir, "image")
	sf, err := os.Create(snap)
	if err != nil {
		t.Fatal(err)
	}
	imf, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []*os.File{sf, imf} {
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
	}
	// Random data in every changed block and its neighbours; the image has
	// the same neighbours and inverted changed blocks.
	changed := map[uint64]bool{}
	for _, b := range blocks {
		changed[b] = true
	}
	written := map[uint64]bool{}
	for _, b := range blocks {
		for _, n := range []uint64{b - 1, b, b + 1} {
			if n >= nblocks || written[n] { // b-1 wraps for b == 0
				continue
			}
			written[n] = true
			p := randomBytes(rng, blockLen(size, n))
			if _, err := sf.WriteAt(p, int64(n)*cow.BlockSize); err != nil {
				t.Fatal(err)
			}
			if changed[n] {
				p = garble(p, []uint64{0})
			}
			if _, err := imf.WriteAt(p, int64(n)*cow.BlockSize); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, f := range []*os.File{sf, imf} {
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
	}
	makeIndexCOW(t, cowPath, size, testUUID, cowSeq, blocks, true)

	var log progressLog
	sum, err := UpdateImage(Snapshot{Path: snap, UUID: testUUID, SeqID: snapSeq, Size: size}, cowPath, img,
		Options{Workers: 4, Progress: log.fn})
	if err != nil {
		t.Fatal(err)
	}
	want := changedBytes(size, blocks)
	if sum.BlocksChanged != uint64(len(blocks)) || sum.BytesCopied != want {
		t.Fatalf("summary %+v, want %d blocks, %d bytes", sum, len(blocks), want)
	}
	log.check(t, want, 1<<20, wantCopies(size, blocks, 1<<20), false)
	if got, want := readFile(t, img), readFile(t, snap); !bytes.Equal(got, want) {
		t.Fatalf("image differs from the snapshot: %s", firstDiff(got, want))
	}
}

// A COW file with no changed block: nothing is copied, Progress is never
// called, the image is unchanged.
func TestUpdateImageNothingChanged(t *testing.T) {
	const size = 5<<20 + 1536
	fx, data := newFixture(t, size, 41, nil)
	old := bytes.Clone(data)
	old[100] ^= 0xff // the image differs from the snapshot where nothing was recorded
	writeFile(t, fx.img, old)
	var log progressLog
	sum, err := UpdateImage(fx.snapshot(), fx.cowPath, fx.img, Options{Progress: log.fn})
	if err != nil {
		t.Fatal(err)
	}
	if sum.BlocksChanged != 0 || sum.BytesCopied != 0 {
		t.Fatalf("summary %+v, want nothing copied", sum)
	}
	log.check(t, 0, 1<<20, 0, true)
	if !bytes.Equal(readFile(t, fx.img), old) {
		t.Fatal("image changed although no block was marked")
	}
}

// Defaults (Workers 0, ChunkMax 0) and a nil Progress work.
func TestUpdateImageDefaults(t *testing.T) {
	const size = 5<<20 + 1536
	blocks := pickBlocks(rand.New(rand.NewPCG(51, 52)), cow.Blocks(size))
	fx, data := newFixture(t, size, 51, blocks)
	sum, err := UpdateImage(fx.snapshot(), fx.cowPath, fx.img, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readFile(t, fx.img), data) {
		t.Fatal("image differs from the snapshot")
	}
	if sum.BlocksChanged != uint64(len(blocks)) || sum.BytesCopied != changedBytes(size, blocks) {
		t.Fatalf("summary %+v", sum)
	}
}

// imageState is what a refused run must leave alone.
type imageState struct {
	exists bool
	data   []byte
	mtime  time.Time
}

// freezeImage backdates the image's mtime (so that any write shows) and
// records its state.
func freezeImage(t *testing.T, path string) imageState {
	t.Helper()
	st, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return imageState{}
	}
	if err != nil {
		t.Fatal(err)
	}
	old := time.Date(2020, 1, 2, 3, 4, 5, 6000, time.UTC)
	if err := os.Chtimes(path, old, old); err != nil {
		t.Fatal(err)
	}
	if st, err = os.Stat(path); err != nil {
		t.Fatal(err)
	}
	return imageState{exists: true, data: readFile(t, path), mtime: st.ModTime()}
}

func (s imageState) verify(t *testing.T, path string) {
	t.Helper()
	st, err := os.Stat(path)
	if !s.exists {
		if !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("image %s was created (stat: %v)", path, err)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if !st.ModTime().Equal(s.mtime) {
		t.Fatalf("image mtime changed from %v to %v", s.mtime, st.ModTime())
	}
	if !bytes.Equal(readFile(t, path), s.data) {
		t.Fatal("image contents changed")
	}
}

func TestUpdateImageRefusals(t *testing.T) {
	const size = 5<<20 + 1536
	blocks := pickBlocks(rand.New(rand.NewPCG(61, 62)), cow.Blocks(size))

	// recreateCOW replaces the fixture's COW file.
	recreateCOW := func(t *testing.T, fx *fixture, mk func(path string)) {
		t.Helper()
		if err := os.Remove(fx.cowPath); err != nil {
			t.Fatal(err)
		}
		mk(fx.cowPath)
	}
	validCOW := func(t *testing.T, dir string) []byte {
		t.Helper()
		p := filepath.Join(dir, "valid-cow")
		makeIndexCOW(t, p, size, testUUID, cowSeq, blocks, true)
		return readFile(t, p)
	}

	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, fx *fixture, snap *Snapshot)
		want  []string // substrings of the error
	}{
		{
			name: "uuid mismatch",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				snap.UUID[0] ^= 1
			},
			want: []string{"another snapshot series", "cow"},
		},
		{
			name: "seq too new",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				snap.SeqID = cowSeq + 2
			},
			want: []string{"changed-block list of snapshot 4", "is snapshot 6", "needs snapshot 5's COW file"},
		},
		{
			name: "seq equal (the current snapshot's own COW file)",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				snap.SeqID = cowSeq
			},
			want: []string{"changed-block list of snapshot 4", "is snapshot 4"},
		},
		{
			name: "seq older",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				snap.SeqID = cowSeq - 1
			},
			want: []string{"changed-block list of snapshot 4", "is snapshot 3"},
		},
		{
			name: "image larger than snapshot",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				writeFile(t, fx.img, append(readFile(t, fx.img), make([]byte, 4096)...))
			},
			want: []string{"image", fmt.Sprintf("is %d bytes, but the snapshot is %d bytes", size+4096, size)},
		},
		{
			name: "image smaller than snapshot",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				writeFile(t, fx.img, readFile(t, fx.img)[:size-1536])
			},
			want: []string{fmt.Sprintf("is %d bytes, but the snapshot is %d bytes", size-1536, size)},
		},
		{
			name: "missing image",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				if err := os.Remove(fx.img); err != nil {
					t.Fatal(err)
				}
			},
			want: []string{"image", "does not exist"},
		},
		{
			name: "cow not closed cleanly",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				recreateCOW(t, fx, func(p string) { makeIndexCOW(t, p, size, testUUID, cowSeq, blocks, false) })
			},
			want: []string{"not closed cleanly", "a full backup is required"},
		},
		{
			name: "cow records a tracking failure",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				recreateCOW(t, fx, func(p string) {
					f, err := cow.Create(p, cow.Options{DeviceSize: size, IndexOnly: true, SeqID: cowSeq, UUID: testUUID})
					if err != nil {
						t.Fatal(err)
					}
					if err := f.RecordFailure(syscall.EIO, "write the change list: input/output error"); err != nil {
						t.Fatal(err)
					}
					if err := f.Close(true); err != nil {
						t.Fatal(err)
					}
				})
			},
			want: []string{"records a tracking failure", "write the change list", "a full backup is required"},
		},
		{
			name: "cow left open (dirty header of a live file)",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				recreateCOW(t, fx, func(p string) {
					f, err := cow.Create(p, cow.Options{DeviceSize: size, IndexOnly: true, SeqID: cowSeq, UUID: testUUID})
					if err != nil {
						t.Fatal(err)
					}
					if _, err := f.MarkRange(0, 1); err != nil {
						t.Fatal(err)
					}
					if err := f.Sync(); err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { f.Close(false) })
				})
			},
			want: []string{"not closed cleanly", "a full backup is required"},
		},
		{
			name: "garbage cow",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				writeFile(t, fx.cowPath, randomBytes(rand.New(rand.NewPCG(1, 2)), cow.HeaderSize+cow.SectionBytes))
			},
			want: []string{"not a cow file"},
		},
		{
			name: "empty cow",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				writeFile(t, fx.cowPath, nil)
			},
			want: []string{"empty"},
		},
		{
			name: "cow shorter than a header",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				writeFile(t, fx.cowPath, validCOW(t, fx.dir)[:1000])
			},
			want: []string{"truncated"},
		},
		{
			name: "truncated cow (first 6000 bytes)",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				writeFile(t, fx.cowPath, validCOW(t, fx.dir)[:6000])
			},
			want: []string{"truncated"},
		},
		{
			name: "missing cow",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				if err := os.Remove(fx.cowPath); err != nil {
					t.Fatal(err)
				}
			},
			want: []string{"cow file", "does not exist"},
		},
		{
			name: "cow of a larger device",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				recreateCOW(t, fx, func(p string) { makeIndexCOW(t, p, 40<<20, testUUID, cowSeq, blocks, true) })
			},
			want: []string{"does not match the snapshot's size", "3 sections"},
		},
		{
			name: "cow of a smaller device",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				recreateCOW(t, fx, func(p string) { makeIndexCOW(t, p, 40<<20, testUUID, cowSeq, nil, true) })
				snap.Size = 40<<20 + 16<<20
				writeFile(t, fx.img, make([]byte, snap.Size))
			},
			want: []string{"does not match the snapshot's size"},
		},
		{
			name: "snapshot-mode cow (data store kept) of a smaller device",
			setup: func(t *testing.T, fx *fixture, snap *Snapshot) {
				recreateCOW(t, fx, func(p string) { makeSnapshotCOW(t, p, size, nil, blocks, true) })
				snap.Size = 40 << 20
				writeFile(t, fx.img, make([]byte, snap.Size))
			},
			want: []string{"does not match the snapshot's size", "overlap"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx, _ := newFixture(t, size, 61, blocks)
			snap := fx.snapshot()
			tc.setup(t, fx, &snap)
			before := freezeImage(t, fx.img)
			called := false
			sum, err := UpdateImage(snap, fx.cowPath, fx.img, Options{Progress: func(int64, int64) { called = true }})
			if err == nil {
				t.Fatalf("UpdateImage succeeded (%+v), want a refusal", sum)
			}
			for _, w := range tc.want {
				if !strings.Contains(strings.ToLower(err.Error()), strings.ToLower(w)) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			if sum != (Summary{}) {
				t.Errorf("summary %+v on failure, want zero", sum)
			}
			if called {
				t.Error("Progress called although the run was refused")
			}
			before.verify(t, fx.img)

			// Check alone gives the same verdict.
			if c, err2 := Check(snap, fx.cowPath, fx.img); err2 == nil {
				c.Close()
				t.Errorf("Check accepts what UpdateImage refused")
			} else if err2.Error() != err.Error() {
				t.Errorf("Check says %q, UpdateImage %q", err2, err)
			}
			before.verify(t, fx.img)
		})
	}
}

// Check on valid input returns the COW file, sized for the snapshot, and
// changes nothing.
func TestCheckValid(t *testing.T) {
	const size = 17<<20 + 1536
	blocks := pickBlocks(rand.New(rand.NewPCG(71, 72)), cow.Blocks(size))
	fx, _ := newFixture(t, size, 71, blocks)
	before := freezeImage(t, fx.img)
	cowBefore := readFile(t, fx.cowPath)
	ck, err := Check(fx.snapshot(), fx.cowPath, fx.img)
	if err != nil {
		t.Fatal(err)
	}
	defer ck.Close()
	c := ck.Cow
	if c.Blocks() != cow.Blocks(size) {
		t.Errorf("cow file has %d blocks, want %d", c.Blocks(), cow.Blocks(size))
	}
	var got []uint64
	if err := c.ChangedRuns(func(first, count uint64) error {
		for b := first; b < first+count; b++ {
			got = append(got, b)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, blocks) {
		t.Errorf("changed blocks %v, want %v", got, blocks)
	}
	if err := c.Close(false); err != nil {
		t.Fatal(err)
	}
	before.verify(t, fx.img)
	if !bytes.Equal(readFile(t, fx.cowPath), cowBefore) {
		t.Error("Check changed the cow file")
	}
}

// The snapshot is shorter than its Size (a read error mid-copy): the run
// fails with an error naming the read, and does not panic.
func TestUpdateImageSnapshotReadError(t *testing.T) {
	const size = 5<<20 + 1536
	blocks := pickBlocks(rand.New(rand.NewPCG(81, 82)), cow.Blocks(size))
	for _, workers := range []int{1, 8} {
		for _, chunk := range []int64{4096, 1 << 20} {
			t.Run(fmt.Sprintf("workers=%d/chunk=%d", workers, chunk), func(t *testing.T) {
				fx, data := newFixture(t, size, 81, blocks)
				writeFile(t, fx.snap, data[:size/2]) // the image keeps the full size, so Check passes
				var log progressLog
				sum, err := UpdateImage(fx.snapshot(), fx.cowPath, fx.img, Options{Workers: workers, ChunkMax: chunk, Progress: log.fn})
				if err == nil {
					t.Fatalf("UpdateImage succeeded (%+v) with a snapshot shorter than its size", sum)
				}
				if !strings.Contains(err.Error(), "read snapshot") || !errors.Is(err, io.EOF) {
					t.Errorf("error %q does not report the failed snapshot read", err)
				}
				if sum != (Summary{}) {
					t.Errorf("summary %+v on failure, want zero", sum)
				}
				if st, err := os.Stat(fx.img); err != nil || st.Size() != size {
					t.Errorf("image size changed: %v %v", st, err)
				}
				log.mu.Lock()
				defer log.mu.Unlock()
				for _, d := range log.done {
					if d >= changedBytes(size, blocks) {
						t.Errorf("Progress reported %d bytes done, the whole total, although a copy failed", d)
					}
				}
			})
		}
	}
}

// A snapshot that cannot be opened fails before the image is opened.
func TestUpdateImageMissingSnapshot(t *testing.T) {
	const size = 5<<20 + 1536
	blocks := pickBlocks(rand.New(rand.NewPCG(91, 92)), cow.Blocks(size))
	fx, _ := newFixture(t, size, 91, blocks)
	if err := os.Remove(fx.snap); err != nil {
		t.Fatal(err)
	}
	before := freezeImage(t, fx.img)
	_, err := UpdateImage(fx.snapshot(), fx.cowPath, fx.img, Options{})
	if err == nil || !strings.Contains(err.Error(), "open snapshot") || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("error %v, want one about opening the snapshot", err)
	}
	before.verify(t, fx.img)
}

// With several workers, Progress must still see done increase from call to
// call and end at the total (a progress bar must not move backwards or stop
// short). The first call is held back until a call reporting more bytes has
// returned, or one second has passed: if calls can overtake each other, the
// held-back call then reports less than its predecessor. When the calls are
// serialized the hold just times out.
func TestUpdateImageProgressOrderedWithWorkers(t *testing.T) {
	const size = 5<<20 + 1536
	blocks := pickBlocks(rand.New(rand.NewPCG(101, 102)), cow.Blocks(size))
	fx, data := newFixture(t, size, 101, blocks)

	var (
		mu       sync.Mutex
		started  bool
		heldAt   int64
		order    []int64
		overtook = make(chan struct{})
		once     sync.Once
	)
	progress := func(done, total int64) {
		mu.Lock()
		first := !started
		if first {
			started, heldAt = true, done
		}
		mu.Unlock()
		if first {
			select {
			case <-overtook:
			case <-time.After(time.Second):
			}
		}
		mu.Lock()
		order = append(order, done)
		if !first && done > heldAt {
			once.Do(func() { close(overtook) })
		}
		mu.Unlock()
	}
	sum, err := UpdateImage(fx.snapshot(), fx.cowPath, fx.img, Options{Workers: 8, ChunkMax: 4096, Progress: progress})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readFile(t, fx.img), data) {
		t.Fatal("image differs from the snapshot")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(order) == 0 || len(order) > len(blocks) {
		t.Fatalf("Progress called %d times, want 1 to %d (one per copy)", len(order), len(blocks))
	}
	checkIncreasing(t, order, sum.BytesCopied)
}

// Paths are followed once and only in directories no other user can
// change: an image or COW file in a directory writable by a non-root user
// without the sticky bit is refused, and a COW file reached through a
// symbolic link too; the image is left untouched.
func TestUntrustedPaths(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	const size = 1 << 20
	blocks := []uint64{3, 7}
	for _, tc := range []struct {
		name string
		move func(t *testing.T, fx *fixture)
		want string
	}{
		{"image in a world-writable directory", func(t *testing.T, fx *fixture) {
			open := filepath.Join(fx.dir, "open")
			os.Mkdir(open, 0o777)
			os.Chmod(open, 0o777)
			dst := filepath.Join(open, "image")
			os.Rename(fx.img, dst)
			fx.img = dst
		}, "writable by a user other than root"},
		{"COW file in a user's directory", func(t *testing.T, fx *fixture) {
			home := filepath.Join(fx.dir, "home")
			os.Mkdir(home, 0o755)
			os.Chown(home, 1000, 1000)
			dst := filepath.Join(home, "cow")
			os.Rename(fx.cowPath, dst)
			fx.cowPath = dst
		}, "writable by a user other than root"},
		{"COW file through a symbolic link", func(t *testing.T, fx *fixture) {
			link := filepath.Join(fx.dir, "cowlink")
			os.Symlink(fx.cowPath, link)
			fx.cowPath = link
		}, "symbolic link"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx, _ := newFixture(t, size, 81, blocks)
			tc.move(t, fx)
			before := freezeImage(t, fx.img)
			_, err := UpdateImage(fx.snapshot(), fx.cowPath, fx.img, Options{})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("UpdateImage = %v, want %q", err, tc.want)
			}
			before.verify(t, fx.img)
		})
	}
}

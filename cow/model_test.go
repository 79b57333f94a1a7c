package cow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"
)

// model is the reference: what every entry, every slot and the header must
// hold, kept in plain maps.
type model struct {
	entries   map[uint64]uint64 // block -> entry (absent = 0)
	data      map[uint64][]byte // slot -> preserved data
	fpos      uint64
	fsize     uint64
	nr        uint64
	indexOnly bool
}

// TestReferenceModel runs random operation sequences against a file with a
// tiny index cache (2 sections) on a device of 41 sections, and checks the
// file against the model after every step and, byte by byte, on disk.
func TestReferenceModel(t *testing.T) {
	seeds := 12
	if testing.Short() {
		seeds = 3
	}
	for seed := range uint64(seeds) {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) { runModel(t, seed) })
	}
}

func runModel(t *testing.T, seed uint64) {
	useSparse(t)
	rng := rand.New(rand.NewPCG(seed, 0xC0))
	path := tempPath(t)
	const dev = 40*SectionEntries*BlockSize + 100 // the partial tail block gets a 41st section
	const cache = 2 * SectionBytes
	blocks := Blocks(dev)
	dataOff := DataOffset(blocks)
	if blocks != 40*SectionEntries+1 || dataOff != HeaderSize+41*SectionBytes {
		t.Fatalf("blocks %d, data offset %d", blocks, dataOff)
	}
	// Hot blocks: section edges, the tail, and random ones everywhere.
	hot := []uint64{0, 1, 4095, 4096, 4097, 8191, blocks - 2, blocks - 1}
	for range 300 {
		hot = append(hot, rng.Uint64N(blocks))
	}
	pick := func() uint64 { return hot[rng.IntN(len(hot))] }

	startSlots := uint64(50 + rng.IntN(100))
	f := mustCreate(t, path, Options{DeviceSize: dev, FileSize: dataOff + int64(startSlots)*BlockSize, CacheBytes: cache})
	if err := f.Close(true); err != nil {
		t.Fatal(err)
	}
	// Reopened through a storage whose data writes can be made to fail.
	failWrites := false
	reopen := func(mode Mode) (*File, error) {
		s, err := FileStorage(path, false)
		if err != nil {
			return nil, err
		}
		hs := &hookStorage{fileStorage: s.(*fileStorage), onWrite: func(p []byte, off int64) error {
			if failWrites && off >= dataOff {
				return errInjected
			}
			return nil
		}}
		g, _, err := Open(path, hs, mode, dev, cache)
		return g, err
	}
	f, err := reopen(ReloadSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	m := &model{
		entries: map[uint64]uint64{}, data: map[uint64][]byte{},
		fpos: uint64(dataOff) / BlockSize, fsize: uint64(dataOff) + startSlots*BlockSize,
	}
	limit := int64(cache)
	var ops []string
	fail := func(format string, a ...any) {
		t.Helper()
		n := len(ops)
		t.Fatalf("seed %d, op %d (last ops %v): %s", seed, n, ops[max(0, n-8):], fmt.Sprintf(format, a...))
	}
	checkHeader := func() {
		t.Helper()
		h := f.Header()
		want := Header{FPos: m.fpos, FSize: m.fsize, SeqID: 1, UUID: h.UUID, Version: 1, NrChangedBlocks: m.nr}
		if m.indexOnly {
			want.Flags = FlagIndexOnly
		}
		if h != want {
			fail("header %+v, want %+v", h, want)
		}
		if c := f.CacheBytes(); c > limit {
			fail("cache holds %d bytes, limit %d", c, limit)
		}
	}
	checkAll := func() {
		t.Helper()
		for _, b := range hot {
			e, err := f.Lookup(b)
			if err != nil || e != m.entries[b] {
				fail("Lookup(%d) = %d, %v; want %d", b, e, err, m.entries[b])
			}
		}
		var got []uint64
		if err := f.ChangedRuns(func(a, n uint64) error {
			for b := a; b < a+n; b++ {
				got = append(got, b)
			}
			return nil
		}); err != nil {
			fail("ChangedRuns: %v", err)
		}
		want := slices.Sorted(maps.Keys(m.entries))
		if !slices.Equal(got, want) {
			fail("ChangedRuns gives %d blocks, model has %d", len(got), len(want))
		}
	}
	// span picks a range of 1..max blocks at a hot block, now and then one
	// that runs past the device's end.
	span := func(maxLen int) (first, n uint64) {
		first = pick()
		n = 1 + uint64(rng.IntN(maxLen))
		if rng.IntN(30) == 0 {
			return blocks - 1, 2
		}
		return first, min(n, blocks-first)
	}

	const nops = 1500
	for range nops {
		switch x := rng.IntN(100); {
		case x < 35: // CopyOnWriteRange
			first, n := span(8)
			data := blocksOf(seed<<32|uint64(len(ops)), first, n)
			injected := rng.IntN(20) == 0
			failWrites = injected
			got, err := f.CopyOnWriteRange(first, data)
			failWrites = false
			ops = append(ops, fmt.Sprintf("cow(%d+%d)", first, n))
			var mine []uint64 // what the model copies: the blocks with entry 0
			for b := first; b < first+n && b < blocks; b++ {
				if m.entries[b] == 0 {
					mine = append(mine, b)
				}
			}
			k := uint64(len(mine))
			switch {
			case m.indexOnly:
				if !errors.Is(err, ErrMode) || got != 0 {
					fail("CopyOnWriteRange on an index-only file: %d %v", got, err)
				}
			case first+n > blocks:
				if err == nil || got != 0 {
					fail("CopyOnWriteRange past the device: %d %v", got, err)
				}
			case k > 0 && m.fpos+k > m.fsize/BlockSize:
				if !errors.Is(err, ErrFull) || got != 0 {
					fail("CopyOnWriteRange on a full store: %d %v", got, err)
				}
			case k > 0 && injected: // the data write fails: nothing changes
				if !errors.Is(err, errInjected) || got != 0 {
					fail("CopyOnWriteRange with a failing write: %d %v", got, err)
				}
			default:
				if err != nil || got != int(k) {
					fail("CopyOnWriteRange copied %d, %v; want %d", got, err, k)
				}
				for _, b := range mine {
					m.entries[b] = m.fpos
					m.data[m.fpos] = data[(b-first)*BlockSize : (b-first+1)*BlockSize]
					m.fpos++
					m.nr++
				}
			}
		case x < 45: // MarkRange
			first, n := span(16)
			must, err := f.MarkRange(first, first+n)
			ops = append(ops, fmt.Sprintf("mark(%d+%d)", first, n))
			if first+n > blocks {
				if err == nil {
					fail("MarkRange past the device accepted")
				}
				break
			}
			if err != nil || must {
				fail("MarkRange(%d, %d) = %v, %v", first, first+n, must, err)
			}
			for b := first; b < first+n; b++ {
				if m.entries[b] == 0 {
					m.entries[b] = 1
					m.nr++
				}
			}
		case x < 65: // Lookup, sometimes of a cold block
			b := pick()
			if rng.IntN(4) == 0 {
				b = rng.Uint64N(blocks)
			}
			e, err := f.Lookup(b)
			ops = append(ops, fmt.Sprintf("lookup(%d)", b))
			if err != nil || e != m.entries[b] {
				fail("Lookup(%d) = %d, %v; want %d", b, e, err, m.entries[b])
			}
		case x < 75: // ReadBlock of a preserved block
			ops = append(ops, "read")
			if len(m.data) == 0 {
				continue
			}
			slots := slices.Sorted(maps.Keys(m.data))
			s := slots[rng.IntN(len(slots))]
			p := make([]byte, BlockSize)
			err := f.ReadBlock(s, p)
			if m.indexOnly {
				if !errors.Is(err, ErrMode) {
					fail("ReadBlock on an index-only file: %v", err)
				}
			} else if err != nil || !bytes.Equal(p, m.data[s]) {
				fail("ReadBlock(%d): %v, data differs: %v", s, err, !bytes.Equal(p, m.data[s]))
			}
		case x < 79: // Sync
			ops = append(ops, "sync")
			if err := f.Sync(); err != nil {
				fail("Sync: %v", err)
			}
		case x < 83: // Close clean, check the disk, reopen
			ops = append(ops, "reopen")
			if err := f.Close(true); err != nil {
				fail("Close: %v", err)
			}
			checkDisk(t, path, m, blocks, dataOff, true)
			mode := ReloadSnapshot
			if m.indexOnly {
				mode = ReloadIncremental
			}
			var err error
			if f, err = reopen(mode); err != nil {
				fail("Open: %v", err)
			}
			limit = cache
		case x < 84: // TruncateToIndex
			ops = append(ops, "truncate")
			if err := f.TruncateToIndex(); err != nil {
				fail("TruncateToIndex: %v", err)
			}
			if !m.indexOnly {
				m.indexOnly = true
				m.fsize = uint64(dataOff)
				m.fpos = uint64(dataOff) / BlockSize
				m.data = map[uint64][]byte{}
			}
		case x < 90: // Expand
			n := int64(1+rng.IntN(40)) * BlockSize
			ops = append(ops, fmt.Sprintf("expand(%d)", n/BlockSize))
			err := f.Expand(n)
			if m.indexOnly {
				if !errors.Is(err, ErrMode) {
					fail("Expand of an index-only file: %v", err)
				}
			} else {
				if err != nil {
					fail("Expand: %v", err)
				}
				m.fsize += uint64(n)
			}
		case x < 93: // change the cache budget
			limit = int64(1+rng.IntN(3)) * SectionBytes
			ops = append(ops, fmt.Sprintf("cache(%d)", limit/SectionBytes))
			f.SetCacheLimit(limit)
		default:
			ops = append(ops, "check")
			checkAll()
		}
		checkHeader()
	}
	checkAll()
	if err := f.Close(true); err != nil {
		t.Fatal(err)
	}
	checkDisk(t, path, m, blocks, dataOff, true)

	// A read-only view agrees with the model.
	g := mustOpen(t, path, ReadOnly, 0, 0)
	if !m.indexOnly {
		if err := g.SetDeviceSize(dev); err != nil {
			t.Fatal(err)
		}
	}
	var got []uint64
	g.ChangedRuns(func(a, n uint64) error {
		for b := a; b < a+n; b++ {
			got = append(got, b)
		}
		return nil
	})
	if want := slices.Sorted(maps.Keys(m.entries)); !slices.Equal(got, want) {
		t.Fatalf("read-only ChangedRuns: %d blocks, want %d", len(got), len(want))
	}
	g.Close(false)

	// An unclean close leaves a file that Open refuses.
	mode := ReloadSnapshot
	if m.indexOnly {
		mode = ReloadIncremental
	}
	if f, err = reopen(mode); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(false); err != nil {
		t.Fatal(err)
	}
	checkDisk(t, path, m, blocks, dataOff, false)
	if _, err := reopen(mode); !errors.Is(err, ErrNotClean) {
		t.Fatalf("Open of an unclean file: %v", err)
	}
}

// checkDisk decodes the closed file the way dattobd does and compares it
// with the model: header, every index entry, every preserved slot, length.
func checkDisk(t *testing.T, path string, m *model, blocks uint64, dataOff int64, clean bool) {
	t.Helper()
	r := readRaw(t, path)
	flags := uint32(0)
	if clean {
		flags |= FlagClean
	}
	if m.indexOnly {
		flags |= FlagIndexOnly
	}
	if r.magic() != Magic || r.flags() != flags || r.fpos() != m.fpos || r.fsize() != m.fsize ||
		r.seqid() != 1 || r.version() != 1 || r.nr() != m.nr || !r.reservedZero() {
		t.Fatalf("on-disk header %x; model %+v", r.b[:64], m)
	}
	wantLen := int64(m.fsize)
	if int64(len(r.b)) != wantLen {
		t.Fatalf("file is %d bytes, want %d", len(r.b), wantLen)
	}
	want := make([]byte, dataOff-HeaderSize) // entries past the last block stay 0
	for b, e := range m.entries {
		if b >= blocks {
			t.Fatalf("model has block %d of %d", b, blocks)
		}
		binary.LittleEndian.PutUint64(want[8*b:], e)
	}
	if got := r.b[HeaderSize:dataOff]; !bytes.Equal(got, want) {
		for b := range uint64(len(want) / 8) {
			if e, w := r.entry(b), binary.LittleEndian.Uint64(want[8*b:]); e != w {
				t.Fatalf("on-disk entry of block %d is %d, want %d", b, e, w)
			}
		}
	}
	for s, d := range m.data {
		if !bytes.Equal(r.slot(s), d) {
			t.Fatalf("on-disk slot %d differs", s)
		}
	}
}

package cow

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func FuzzParseHeader(f *testing.F) {
	// Small seeds (the check below pads them to a full header), so that
	// the fuzzer's minimization stays cheap.
	f.Add(goldenHeader()[:0x40])
	good, _ := validHeader().MarshalBinary()
	f.Add(good[:0x40])
	f.Add([]byte{})
	f.Add(make([]byte, 8))
	f.Fuzz(func(t *testing.T, b []byte) {
		checkParse(t, b)
		// Padded or cut to the header size, so most inputs reach the
		// field checks.
		p := make([]byte, HeaderSize)
		copy(p, b)
		checkParse(t, p)
	})
}

func checkParse(t *testing.T, b []byte) {
	h, err := parseHeader(b)
	if err != nil {
		if !errors.Is(err, ErrCorrupt) || err.Error() == "" {
			t.Fatalf("error %v is not a described ErrCorrupt", err)
		}
		return
	}
	if h.Flags&^(FlagClean|FlagIndexOnly) != 0 || h.Version > Version || h.FPos < minSlot ||
		h.FPos*BlockSize > h.FSize+BlockSize-1 {
		t.Fatalf("accepted an invalid header %+v", h)
	}
	m, err := h.MarshalBinary()
	if err != nil || len(m) != HeaderSize {
		t.Fatalf("MarshalBinary: %d bytes, %v", len(m), err)
	}
	h2, err := parseHeader(m)
	if err != nil || h2 != h {
		t.Fatalf("round trip: %+v, %v; want %+v", h2, err, h)
	}
	// The encoding is the input's, apart from the flag and field that
	// parsing drops (VMALLOC_UPPER; nr_changed_blocks of version 0) and the
	// reserved space.
	for i := range 0x40 {
		switch {
		case i == 0x04 && m[i] == b[i]&^FlagVmallocUpper:
		case i >= 0x38 && h.Version == 0:
		case m[i] != b[i]:
			t.Fatalf("byte %#x: encoded %#x, input %#x", i, m[i], b[i])
		}
	}
}

// FuzzOpenReadOnly builds a file from a header (padded to 4096 bytes when
// pad is set), a few bytes after it (the first index entries) and a hole,
// opens it ReadOnly and uses it.
func FuzzOpenReadOnly(f *testing.F) {
	hdr := func(h Header) []byte {
		b, _ := h.MarshalBinary()
		return b[:0x40]
	}
	for _, sd := range fuzzSeeds() {
		f.Add(sd.head, sd.pad, sd.tail, sd.hole)
	}
	f.Add(hdr(Header{FPos: minSlot, FSize: 1 << 20, Version: 1}), false, []byte{}, uint32(0))
	f.Add([]byte{}, false, []byte{}, uint32(0))
	f.Fuzz(func(t *testing.T, head []byte, pad bool, tail []byte, hole uint32) {
		path := buildFuzzFile(t, head, pad, tail, hole)
		g, _, err := openPath(path, ReadOnly, 0, 0)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		defer g.Close(false)
		useReadOnly(t, g)
	})
}

type fuzzSeed struct {
	head []byte
	pad  bool
	tail []byte
	hole uint32
	runs [][2]uint64
}

func fuzzSeeds() []fuzzSeed {
	hdr := func(h Header) []byte {
		b, _ := h.MarshalBinary()
		return b[:0x40]
	}
	entries := func(e ...uint64) []byte {
		b := make([]byte, 8*len(e))
		for i, v := range e {
			binary.LittleEndian.PutUint64(b[8*i:], v)
		}
		return b
	}
	// An index-only file of 2 sections, blocks 0 and 3 changed.
	inc := hdr(Header{Flags: FlagClean | FlagIndexOnly, FPos: 17, FSize: HeaderSize + 2*SectionBytes, SeqID: 2, Version: 1, NrChangedBlocks: 2})
	// A snapshot file of 1 section and 4 slots, blocks 1 and 2 copied.
	snap := hdr(Header{Flags: FlagClean, FPos: minSlot + 2, FSize: HeaderSize + SectionBytes + 4*BlockSize, SeqID: 1, Version: 1, NrChangedBlocks: 2})
	return []fuzzSeed{
		{inc, true, entries(1, 0, 0, 1), uint32(2*SectionBytes - 32), [][2]uint64{{0, 1}, {3, 1}}},
		{snap, true, entries(0, minSlot, minSlot+1), uint32(SectionBytes + 4*BlockSize - 24), [][2]uint64{{1, 2}}},
	}
}

func buildFuzzFile(t *testing.T, head []byte, pad bool, tail []byte, hole uint32) string {
	data := append([]byte(nil), head...)
	if pad && len(data) < HeaderSize {
		data = append(data, make([]byte, HeaderSize-len(data))...)
	}
	data = append(data, tail...)
	path := filepath.Join(t.TempDir(), "cow")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if hole > 0 {
		if err := os.Truncate(path, int64(len(data))+int64(hole%(4<<20))); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

// useReadOnly exercises a file Open accepted ReadOnly, checking invariants,
// and returns its changed runs.
func useReadOnly(t *testing.T, g *File) [][2]uint64 {
	h := g.Header()
	blocks := g.Blocks()
	if blocks == 0 || blocks%SectionEntries != 0 {
		t.Fatalf("blocks %d", blocks)
	}
	if _, err := g.Lookup(blocks); err == nil {
		t.Fatal("Lookup past the index succeeded")
	}
	for _, b := range []uint64{0, 1, 2, blocks / 2, blocks - 1} {
		e, err := g.Lookup(b)
		if err == nil && e > 1 && h.Flags&FlagIndexOnly == 0 {
			p := make([]byte, BlockSize)
			if err := g.ReadBlock(e, p); err != nil {
				t.Fatalf("ReadBlock of slot %d from Lookup: %v", e, err)
			}
		}
	}
	if err := g.SetDeviceSize(int64(blocks) * BlockSize); err != nil {
		t.Fatalf("SetDeviceSize of the index's own capacity: %v", err)
	}
	var runs [][2]uint64
	var total uint64
	last := uint64(0)
	if err := g.ChangedRuns(func(first, n uint64) error {
		if n == 0 || first < last || first+n > blocks {
			t.Fatalf("bad run %d+%d (previous end %d, %d blocks)", first, n, last, blocks)
		}
		last = first + n + 1
		total += n
		runs = append(runs, [2]uint64{first, n})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if total > blocks {
		t.Fatalf("%d changed of %d", total, blocks)
	}
	return runs
}

// TestFuzzSeedsOpen makes sure the fuzz seeds are valid files, so the
// fuzzer starts from inputs that reach past the header checks.
func TestFuzzSeedsOpen(t *testing.T) {
	for i, sd := range fuzzSeeds() {
		g, _, err := openPath(buildFuzzFile(t, sd.head, sd.pad, sd.tail, sd.hole), ReadOnly, 0, 0)
		if err != nil {
			t.Fatalf("seed %d: %v", i, err)
		}
		if runs := useReadOnly(t, g); !slices.Equal(runs, sd.runs) {
			t.Fatalf("seed %d: runs %v, want %v", i, runs, sd.runs)
		}
		g.Close(false)
	}
}

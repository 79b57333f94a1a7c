package cow

import (
	"errors"
	"os"
	"slices"
	"testing"
)

// TestRangesAcrossSections marks and looks up ranges that cross an index
// section boundary, with a cache of one section so that every crossing
// evicts the section before it: MarkRange and LookupRange walk the index
// with one section lookup per section, and each entry must still land in,
// and come from, its own section.
func TestRangesAcrossSections(t *testing.T) {
	path := tempPath(t)
	const dev = 64 << 20 // 16384 blocks: four sections
	f := mustCreate(t, path, Options{DeviceSize: dev, CacheBytes: SectionBytes})
	const s = SectionEntries
	old := make([]byte, 0, 4*BlockSize)
	for b := uint64(s - 2); b < s+2; b++ {
		old = append(old, pattern(1, b)...)
	}
	if n, err := f.CopyOnWriteRange(s-2, old); n != 4 || err != nil {
		t.Fatalf("copy: %d %v", n, err)
	}
	if _, err := f.MarkRange(s-5, s+5); err != nil {
		t.Fatal(err)
	}
	if n := f.NrChangedBlocks(); n != 10 {
		t.Fatalf("%d blocks changed, want 10", n)
	}
	got := make([]uint64, 12) // blocks s-6 .. s+5
	if err := f.LookupRange(s-6, got); err != nil {
		t.Fatal(err)
	}
	for i, e := range got {
		b := s - 6 + uint64(i)
		one, err := f.Lookup(b)
		if err != nil || one != e {
			t.Fatalf("block %d: LookupRange %d, Lookup %d %v", b, e, one, err)
		}
		var want string
		switch {
		case b < s-5 || b >= s+5:
			want = "unchanged"
		case b >= s-2 && b < s+2:
			want = "a slot"
		default:
			want = "changed"
		}
		if have := kind(e); have != want {
			t.Fatalf("block %d: entry %d is %s, want %s (entries %v)", b, e, have, want, got)
		}
	}
	slots := got[4:8]
	if !slices.IsSorted(slots) || slots[3]-slots[0] != 3 {
		t.Fatalf("the four copied blocks' slots %v are not their own", slots)
	}
	for i, slot := range slots {
		p := make([]byte, BlockSize)
		if err := f.ReadBlock(slot, p); err != nil || who(p) != who(pattern(1, s-2+uint64(i))) {
			t.Fatalf("slot %d of block %d: %v", slot, s-2+uint64(i), err)
		}
	}
	// The range must lie inside the device, as Lookup's block must.
	if err := f.LookupRange(f.Blocks()-1, make([]uint64, 2)); err == nil {
		t.Fatal("LookupRange past the device's end answered")
	}
	if err := f.Close(true); err != nil {
		t.Fatal(err)
	}
	// What MarkRange set reached the file, section by section.
	r := readRaw(t, path)
	for b := uint64(s - 6); b < s+6; b++ {
		if e := r.entry(b); e != got[b-(s-6)] {
			t.Fatalf("block %d: entry %d in the file, %d before close", b, e, got[b-(s-6)])
		}
	}
	if err := f.LookupRange(0, make([]uint64, 1)); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("LookupRange on a closed file: %v", err)
	}
}

func kind(e uint64) string {
	switch e {
	case 0:
		return "unchanged"
	case 1:
		return "changed"
	}
	return "a slot"
}

// BenchmarkLookup1MiB looks up a 1 MiB read's 256 blocks, in one
// LookupRange and block by block: what a snapshot read costs in index
// lookups, with the section already cached.
func BenchmarkLookup1MiB(b *testing.B) {
	f := mustCreate(b, tempPath(b), Options{DeviceSize: 1 << 30})
	defer f.Close(false)
	entries := make([]uint64, 256)
	b.Run("range", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			if err := f.LookupRange(uint64(i%1024)*256, entries); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("per-block", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			for j := range entries {
				e, err := f.Lookup(uint64(i%1024)*256 + uint64(j))
				if err != nil {
					b.Fatal(err)
				}
				entries[j] = e
			}
		}
	})
}

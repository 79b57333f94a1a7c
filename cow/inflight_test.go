package cow

import (
	"os"
	"testing"
)

// TestFlights: blocks in flight are kept as runs per copy; a cursor over
// the runs a range meets finds each block's copy, and removing a copy
// frees exactly its runs.
func TestFlights(t *testing.T) {
	var fl flights
	a, b := make(chan struct{}), make(chan struct{})
	fl.add([]uint64{3, 4, 5, 9, 10}, a) // two runs: 3..5, 9..10
	fl.add([]uint64{6, 20}, b)
	if len(fl) != 4 {
		t.Fatalf("%d runs, want 4: %+v", len(fl), fl)
	}
	cur := flightCursor{runs: fl.overlapping(0, 32, nil)}
	for blk := uint64(0); blk < 32; blk++ {
		ch, ok := cur.at(blk)
		want := map[uint64]chan struct{}{3: a, 4: a, 5: a, 9: a, 10: a, 6: b, 20: b}[blk]
		if ok != (want != nil) || ch != want {
			t.Fatalf("block %d: in flight %v under the wrong copy or none", blk, ok)
		}
	}
	if fl.meets(11, 20) || !fl.meets(11, 21) || !fl.meets(0, 4) || fl.meets(0, 3) {
		t.Fatal("meets is wrong at a run's edge")
	}
	if got := fl.overlapping(5, 10, nil); len(got) != 3 || got[0].first != 3 || got[1].first != 6 || got[2].first != 9 {
		t.Fatalf("overlapping(5, 10) = %+v, want the runs at 3, 6, 9 in order", got)
	}
	fl.remove(a)
	if len(fl) != 2 || fl.meets(0, 6) || !fl.meets(6, 7) {
		t.Fatalf("after removing a copy: %+v", fl)
	}
	fl.remove(b)
	if !fl.empty() {
		t.Fatal("flights left after every copy was removed")
	}
}

// BenchmarkRangeCopy1M is the CPU a 1 MiB first write costs the COW file
// on the ring's path — BeginRange, Publish, Finish; the data and index
// I/O are the caller's and not run — with 8 copies in flight, as at the
// first-write benchmark's queue depth.
func BenchmarkRangeCopy1M(b *testing.B) {
	const (
		dev   = 1 << 30
		n     = 256 // blocks of a 1 MiB write
		depth = 8
	)
	path := tempPath(b)
	var (
		f    *File
		ring [depth]*RangeCopy
		next uint64
	)
	drain := func() {
		for i, c := range ring {
			if c != nil {
				if err := c.Finish(nil); err != nil {
					b.Fatal(err)
				}
				ring[i] = nil
			}
		}
	}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if f == nil || next+n > dev/BlockSize {
			b.StopTimer()
			if f != nil {
				drain()
				f.Close(false)
				os.Remove(path)
			}
			f = mustCreate(b, path, Options{DeviceSize: dev, FileSize: dev + 8<<20})
			next = 0
			b.StartTimer()
		}
		if c := ring[i%depth]; c != nil {
			if err := c.Finish(nil); err != nil {
				b.Fatal(err)
			}
		}
		c, err := f.BeginRange(next, n)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Publish(); err != nil {
			b.Fatal(err)
		}
		ring[i%depth] = c
		next += n
	}
	b.StopTimer()
	drain()
	f.Close(false)
}

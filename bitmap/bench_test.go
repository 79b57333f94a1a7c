package bitmap

import (
	"math/rand/v2"
	"testing"
)

// A write to a block that is already recorded, bit by bit.
func BenchmarkSetAlreadySet(b *testing.B) {
	bm := New(1 << 20)
	bm.SetRange(0, 1<<20)
	i := uint64(12345)
	b.ReportAllocs()
	for b.Loop() {
		if bm.SetRange(i, 1) == 1 {
			b.Fatal("newly set")
		}
		i = (i + 4097) & (1<<20 - 1)
	}
}

func BenchmarkSetAlreadySetParallel(b *testing.B) {
	bm := New(1 << 20)
	bm.SetRange(0, 1<<20)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := rand.Uint64N(1 << 20)
		for pb.Next() {
			if bm.SetRange(i, 1) == 1 {
				b.Fatal("newly set")
			}
			i = (i + 4097) & (1<<20 - 1)
		}
	})
}

// TestRangeAlreadySet: the tracker's hot path, a 1 MiB write (256 blocks)
// whose blocks are all recorded already.
func BenchmarkTestRangeAlreadySet(b *testing.B) {
	bm := New(1 << 20)
	bm.SetRange(0, 1<<20)
	b.ReportAllocs()
	for b.Loop() {
		if !bm.TestRange(1000, 256) {
			b.Fatal("not set")
		}
	}
}

func BenchmarkTestRangeAlreadySetParallel(b *testing.B) {
	bm := New(1 << 20)
	bm.SetRange(0, 1<<20)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := rand.Uint64N(1<<20 - 256)
		for pb.Next() {
			if !bm.TestRange(i, 256) {
				b.Fatal("not set")
			}
			i = (i + 4097) % (1<<20 - 256)
		}
	})
}

func BenchmarkSetRange64K(b *testing.B) {
	const n = 1 << 16
	bm := New(n)
	b.ReportAllocs()
	for b.Loop() {
		clearAll(bm)
		if bm.SetRange(3, n-3) != n-3 {
			b.Fatal("count")
		}
	}
}

func BenchmarkSetNew(b *testing.B) {
	const n = 1 << 24
	bm := New(n)
	i := uint64(0)
	b.ReportAllocs()
	for b.Loop() {
		if i == n {
			b.StopTimer()
			clearAll(bm)
			i = 0
			b.StartTimer()
		}
		bm.SetRange(i, 1)
		i++
	}
}

package bitmap

import (
	"math/rand/v2"
	"testing"
)

// The hot path: a write to a block that is already recorded.
func BenchmarkSetAlreadySet(b *testing.B) {
	bm := New(1 << 20)
	bm.SetRange(0, 1<<20)
	i := uint64(12345)
	b.ReportAllocs()
	for b.Loop() {
		if bm.Set(i) {
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
			if bm.Set(i) {
				b.Fatal("newly set")
			}
			i = (i + 4097) & (1<<20 - 1)
		}
	})
}

// NewlySetRangeAlreadySet: a 1 MiB write (256 blocks) whose blocks are all
// recorded already.
func BenchmarkNewlySetRangeAlreadySet(b *testing.B) {
	bm := New(1 << 20)
	bm.SetRange(0, 1<<20)
	b.ReportAllocs()
	for b.Loop() {
		bm.NewlySet(1000, 256, func(uint64) { b.Fatal("newly set") })
	}
}

// NewlySet64K: 65536 bits, all newly set, one callback each.
func BenchmarkNewlySet64K(b *testing.B) {
	const n = 1 << 16
	bm := New(n)
	var sink uint64
	fn := func(i uint64) { sink += i }
	b.ReportAllocs()
	b.SetBytes(n / 8)
	for b.Loop() {
		b.StopTimer()
		bm.Clear()
		b.StartTimer()
		bm.NewlySet(0, n, fn)
	}
	if sink == 0 {
		b.Fatal("no callbacks")
	}
}

func BenchmarkSetRange64K(b *testing.B) {
	const n = 1 << 16
	bm := New(n)
	b.ReportAllocs()
	for b.Loop() {
		bm.Clear()
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
			bm.Clear()
			i = 0
			b.StartTimer()
		}
		bm.Set(i)
		i++
	}
}

func BenchmarkCount2p28(b *testing.B) {
	bm := New(1 << 28)
	b.ReportAllocs()
	for b.Loop() {
		bm.Count()
	}
}

func BenchmarkMarshalSparse2p28(b *testing.B) {
	bm := New(1 << 28)
	for i := uint64(0); i < 1<<28; i += 1 << 16 {
		bm.SetRange(i, 100)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := bm.MarshalBinary(); err != nil {
			b.Fatal(err)
		}
	}
}

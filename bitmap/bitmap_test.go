package bitmap

import (
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
)

// popcount counts b's set bits word by word (a test's view of the words).
func popcount(b *Bitmap) uint64 {
	var n uint64
	for i := range b.words {
		n += uint64(bits.OnesCount64(b.words[i].Load()))
	}
	return n
}

// clearAll clears every bit (a test's reset between rounds).
func clearAll(b *Bitmap) {
	for i := range b.words {
		b.words[i].Store(0)
	}
}

// tailClean reports whether the bits past Len() in the last word are zero.
func tailClean(b *Bitmap) bool {
	return b.nbits%64 == 0 || len(b.words) == 0 || b.words[len(b.words)-1].Load()>>(b.nbits%64) == 0
}

func TestEdgeSizes(t *testing.T) {
	for _, n := range []uint64{0, 1, 63, 64, 65} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			b := New(n)
			if b.nbits != n || popcount(b) != 0 {
				t.Fatalf("new: Len %d, %d bits set", b.nbits, popcount(b))
			}
			// Out of range: ignored, no panic.
			for _, i := range []uint64{n, n + 1, 64, 65, 128, math.MaxUint64} {
				if i < n {
					continue
				}
				if b.SetRange(i, 1) == 1 || b.TestRange(i, 1) {
					t.Fatalf("Set/Test(%d) past the end returned true", i)
				}
				if got := b.SetRange(i, 10); got != 0 {
					t.Fatalf("SetRange(%d, 10) = %d", i, got)
				}
				if got := b.SetRange(i, math.MaxUint64); got != 0 {
					t.Fatalf("SetRange(%d, max) = %d", i, got)
				}
			}
			if popcount(b) != 0 {
				t.Fatalf("out-of-range writes changed the bitmap: %d bits set", popcount(b))
			}
			if !b.TestRange(0, 0) || !b.TestRange(math.MaxUint64, 0) {
				t.Fatal("empty TestRange is not true")
			}
			if b.TestRange(0, n+1) {
				t.Fatal("TestRange past the end is true")
			}
			// Fill everything with an overflowing count.
			if got := b.SetRange(0, math.MaxUint64); got != n {
				t.Fatalf("SetRange(0, max) = %d, want %d", got, n)
			}
			if popcount(b) != n || (n > 0 && !b.TestRange(0, n)) || b.TestRange(0, n+1) || !tailClean(b) {
				t.Fatalf("after fill: %d bits set, TestRange %v", popcount(b), b.TestRange(0, n))
			}
			if b.SetRange(n, 1) == 1 || b.TestRange(n, 1) || popcount(b) != n {
				t.Fatal("bit past the end became visible after a fill")
			}
			if got := b.SetRange(0, n); got != 0 {
				t.Fatalf("refill: SetRange = %d, want 0", got)
			}
		})
	}
}

func TestZeroValue(t *testing.T) {
	var b Bitmap
	if b.nbits != 0 || b.SetRange(0, 1) == 1 || b.TestRange(0, 1) || b.SetRange(0, 100) != 0 || !b.TestRange(5, 0) || b.TestRange(0, 1) {
		t.Fatal("zero Bitmap is not an empty bitmap")
	}
}

func TestBytesFor(t *testing.T) {
	for _, c := range []struct{ n, words uint64 }{{0, 0}, {1, 1}, {63, 1}, {64, 1}, {65, 2}, {1 << 28, 1 << 22}, {math.MaxUint64, 1 << 58}} {
		if got, want := BytesFor(c.n), c.words*8+headerBytes; got != want {
			t.Errorf("BytesFor(%d) = %d, want %d", c.n, got, want)
		}
	}
	if headerBytes == 0 || headerBytes > 64 {
		t.Errorf("header %d bytes", headerBytes)
	}
	if got := uint64(len(New(1000).words)) * 8; BytesFor(1000)-headerBytes != got {
		t.Errorf("BytesFor(1000) does not match the allocation (%d word bytes)", got)
	}
}

func TestHugeSparse(t *testing.T) {
	const n = 1 << 28 // 32 MiB
	b := New(n)
	bitsSet := []uint64{0, 1, 63, 64, 4095, 1 << 20, n/2 - 1, n / 2, n - 65, n - 64, n - 1}
	for _, i := range bitsSet {
		if b.SetRange(i, 1) != 1 {
			t.Fatalf("Set(%d) not new", i)
		}
	}
	if got := b.SetRange(n-1000, 2000); got != 1000-3 {
		t.Fatalf("SetRange at the end = %d, want %d", got, 1000-3)
	}
	for _, r := range [][2]uint64{{0, 2}, {63, 2}, {4095, 1}, {1 << 20, 1}, {n/2 - 1, 2}, {n - 1000, 1000}} {
		if !b.TestRange(r[0], r[1]) || b.TestRange(r[0], r[1]+1) || (r[0] > 0 && b.TestRange(r[0]-1, 2)) {
			t.Fatalf("run [%d, +%d) is not exactly set", r[0], r[1])
		}
	}
	if popcount(b) != 2+2+1+1+2+1000 {
		t.Fatalf("%d bits set", popcount(b))
	}
	// Whole-map fill.
	before := popcount(b)
	if got := b.SetRange(0, n); got != n-before {
		t.Fatalf("fill: newly %d, want %d", got, n-before)
	}
	if popcount(b) != n || !b.TestRange(0, n) {
		t.Fatalf("fill: %d bits set", popcount(b))
	}
}

// TestConcurrentExactlyOnce has many goroutines set overlapping ranges by
// both routes (SetRange, and Set bit by bit) while readers test ranges;
// the newly set bits reported add up to exactly the union of the ranges,
// each bit set by Set is reported once, and the final map is that union.
func TestConcurrentExactlyOnce(t *testing.T) {
	const (
		n       = 1<<16 + 37
		writers = 16
		ops     = 400
	)
	b := New(n)
	reports := make([]atomic.Int32, n) // per bit: reports from Set
	var newlyTotal atomic.Uint64       // from both routes
	covered := make([][]run, writers)

	var readers, wg sync.WaitGroup
	stop := make(chan struct{})
	var readerErr atomic.Value
	for r := range 2 {
		readers.Go(func() {
			rr := rand.New(rand.NewPCG(uint64(r), 7))
			var last uint64
			for {
				select {
				case <-stop:
					return
				default:
				}
				switch r {
				case 0:
					c := popcount(b)
					if c < last {
						readerErr.Store(fmt.Errorf("set bits went down: %d after %d", c, last))
					}
					last = c
				case 1:
					// A range seen all set stays all set, bit by bit.
					first, count := rr.Uint64N(n), rr.Uint64N(300)
					if b.TestRange(first, count) {
						for i := first; i < first+count; i++ {
							if !b.TestRange(i, 1) {
								readerErr.Store(fmt.Errorf("bit %d clear after TestRange(%d, %d) was true", i, first, count))
							}
						}
					}
				}
			}
		})
	}

	start := make(chan struct{})
	for g := range writers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 99))
			<-start
			for range ops {
				// Ranges cluster on a few hot areas so they overlap a lot.
				first := (r.Uint64N(8)*n/8 + r.Uint64N(3000)) % n
				count := r.Uint64N(5000)
				if r.Uint64N(8) == 0 {
					first, count = r.Uint64N(n), 1
				}
				covered[g] = append(covered[g], run{first, count})
				if r.Uint64N(2) == 0 {
					newlyTotal.Add(b.SetRange(first, count))
					continue
				}
				for i := first; i < first+count && i < n; i++ {
					if b.SetRange(i, 1) == 1 {
						reports[i].Add(1)
						newlyTotal.Add(1)
					}
				}
			}
		})
	}
	close(start)
	wg.Wait()
	close(stop)
	readers.Wait()
	if err := readerErr.Load(); err != nil {
		t.Fatal(err)
	}

	want := make([]bool, n)
	for _, rs := range covered {
		for _, r := range rs {
			for i := r.first; i < r.first+r.count && i < n; i++ {
				want[i] = true
			}
		}
	}
	var wantCount uint64
	for i := range want {
		if want[i] {
			wantCount++
		}
		if b.TestRange(uint64(i), 1) != want[i] {
			t.Fatalf("bit %d = %v, want %v", i, b.TestRange(uint64(i), 1), want[i])
		}
		if reports[i].Load() > 1 {
			t.Fatalf("bit %d reported newly set %d times", i, reports[i].Load())
		}
	}
	if got := popcount(b); got != wantCount || newlyTotal.Load() != got {
		t.Fatalf("%d bits set, union %d, sum of newly %d", got, wantCount, newlyTotal.Load())
	}
}

// TestConcurrentSameRange: every goroutine sets the whole map at once, by
// SetRange or bit by bit.
func TestConcurrentSameRange(t *testing.T) {
	const n = 64*1024 + 5
	for rep := range 20 {
		b := New(n)
		var total atomic.Uint64
		var wg sync.WaitGroup
		start := make(chan struct{})
		for g := range 8 {
			wg.Go(func() {
				<-start
				if g%2 == 0 {
					total.Add(b.SetRange(0, n))
					return
				}
				for i := range uint64(n) {
					if b.SetRange(i, 1) == 1 {
						total.Add(1)
					}
				}
			})
		}
		close(start)
		wg.Wait()
		if total.Load() != n || popcount(b) != n {
			t.Fatalf("rep %d: sum of newly %d, %d bits set, want %d", rep, total.Load(), popcount(b), n)
		}
	}
}

// TestConcurrentSetSameBits: in many short rounds, goroutines released
// together race Set (or SetRange) over the same two words, so they often
// meet on a word between its load and its OR; each bit must still be
// reported newly set exactly once per round.
func TestConcurrentSetSameBits(t *testing.T) {
	const n = 128
	rounds := int64(20000)
	if raceEnabled {
		rounds = 2000
	}
	workers := max(runtime.GOMAXPROCS(0), 2)
	b := New(n)
	var round, done atomic.Int64
	var total atomic.Uint64
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for r := int64(1); r <= rounds; r++ {
				for round.Load() < r {
					runtime.Gosched()
				}
				var mine uint64
				if w%2 == 1 && r%2 == 0 {
					mine = b.SetRange(0, n/2) + b.SetRange(n/2, n/2)
				} else {
					for i := range uint64(n) {
						if b.SetRange(i, 1) == 1 {
							mine++
						}
					}
				}
				total.Add(mine)
				done.Add(1)
			}
		})
	}
	for r := int64(1); r <= rounds; r++ {
		clearAll(b)
		total.Store(0)
		done.Store(0)
		round.Store(r)
		for done.Load() < int64(workers) {
			runtime.Gosched()
		}
		if total.Load() != n || popcount(b) != n {
			t.Fatalf("round %d: sum of newly %d, %d bits set, want %d", r, total.Load(), popcount(b), n)
		}
	}
	wg.Wait()
}

package bitmap

import (
	"bytes"
	"encoding"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
)

var (
	_ encoding.BinaryMarshaler   = (*Bitmap)(nil)
	_ encoding.BinaryUnmarshaler = (*Bitmap)(nil)
	_ encoding.BinaryAppender    = (*Bitmap)(nil)
)

func runsOf(b *Bitmap) []run {
	var rs []run
	b.Runs(func(first, count uint64) bool {
		rs = append(rs, run{first, count})
		return true
	})
	return rs
}

func mustMarshal(t testing.TB, b *Bitmap) []byte {
	t.Helper()
	data, err := b.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestEdgeSizes(t *testing.T) {
	for _, n := range []uint64{0, 1, 63, 64, 65} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			b := New(n)
			if b.Len() != n || b.Count() != 0 || len(runsOf(b)) != 0 {
				t.Fatalf("new: Len %d Count %d runs %v", b.Len(), b.Count(), runsOf(b))
			}
			// Out of range: ignored, no panic.
			for _, i := range []uint64{n, n + 1, 64, 65, 128, math.MaxUint64} {
				if i < n {
					continue
				}
				if b.Set(i) || b.Test(i) {
					t.Fatalf("Set/Test(%d) past the end returned true", i)
				}
				if got := b.SetRange(i, 10); got != 0 {
					t.Fatalf("SetRange(%d, 10) = %d", i, got)
				}
				b.NewlySet(i, math.MaxUint64, func(j uint64) { t.Fatalf("NewlySet past the end reported %d", j) })
			}
			if b.Count() != 0 {
				t.Fatalf("out-of-range writes changed the bitmap: Count %d", b.Count())
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
			if b.Count() != n || (n > 0 && !b.TestRange(0, n)) || b.TestRange(0, n+1) {
				t.Fatalf("after fill: Count %d TestRange %v", b.Count(), b.TestRange(0, n))
			}
			if b.Set(n) || b.Test(n) || b.Count() != n {
				t.Fatal("bit past the end became visible after a fill")
			}
			if rs := runsOf(b); n > 0 && (len(rs) != 1 || rs[0] != (run{0, n})) {
				t.Fatalf("runs of a full map = %v", rs)
			}
			data := mustMarshal(t, b)
			if len(data) > minEncodedLen+8 {
				t.Fatalf("full map of %d bits encodes in %d bytes", n, len(data))
			}
			var back Bitmap
			if err := back.UnmarshalBinary(data); err != nil || back.Len() != n || back.Count() != n {
				t.Fatalf("round trip: err %v Len %d Count %d", err, back.Len(), back.Count())
			}
			b.Clear()
			if b.Count() != 0 || b.Len() != n {
				t.Fatal("Clear")
			}
		})
	}
}

func TestZeroValue(t *testing.T) {
	var b Bitmap
	if b.Len() != 0 || b.Set(0) || b.Test(0) || b.SetRange(0, 100) != 0 || b.Count() != 0 || !b.TestRange(5, 0) || b.TestRange(0, 1) {
		t.Fatal("zero Bitmap is not an empty bitmap")
	}
	b.NewlySet(0, 10, func(uint64) { t.Fatal("NewlySet on empty bitmap reported a bit") })
	b.Runs(func(uint64, uint64) bool { t.Fatal("Runs on empty bitmap"); return false })
	b.Clear()
	if _, err := b.MarshalBinary(); err != nil {
		t.Fatal(err)
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
		if !b.Set(i) {
			t.Fatalf("Set(%d) not new", i)
		}
	}
	if got := b.SetRange(n-1000, 2000); got != 1000-3 {
		t.Fatalf("SetRange at the end = %d, want %d", got, 1000-3)
	}
	want := []run{{0, 2}, {63, 2}, {4095, 1}, {1 << 20, 1}, {n/2 - 1, 2}, {n - 1000, 1000}}
	if rs := runsOf(b); fmt.Sprint(rs) != fmt.Sprint(want) {
		t.Fatalf("runs %v, want %v", rs, want)
	}
	if b.Count() != 2+2+1+1+2+1000 {
		t.Fatalf("Count %d", b.Count())
	}
	data := mustMarshal(t, b)
	if len(data) > 64 {
		t.Fatalf("sparse 2^28-bit map encodes in %d bytes, want a run list", len(data))
	}
	var back Bitmap
	if err := back.UnmarshalBinary(data); err != nil {
		t.Fatal(err)
	}
	if back.Len() != n || fmt.Sprint(runsOf(&back)) != fmt.Sprint(want) {
		t.Fatalf("round trip: Len %d runs %v", back.Len(), runsOf(&back))
	}

	// Whole-map fill and an almost full map also stay small.
	before := b.Count()
	if got := b.SetRange(0, n); got != n-before {
		t.Fatalf("fill: newly %d, want %d", got, n-before)
	}
	if b.Count() != n || !b.TestRange(0, n) {
		t.Fatalf("fill: Count %d", b.Count())
	}
	if data := mustMarshal(t, b); len(data) > 40 {
		t.Fatalf("full map encodes in %d bytes", len(data))
	}

	// A dense random map falls back to raw words, bounded by their size.
	// (A smaller map: under -race every atomic on a new word is costly.)
	r := rand.New(rand.NewPCG(1, 2))
	b = New(1 << 22)
	for i := range b.words {
		b.words[i].Store(r.Uint64())
	}
	data = mustMarshal(t, b)
	if got, want := len(data), minEncodedLen+(1<<22)/8; got != want {
		t.Fatalf("dense map encodes in %d bytes, want raw %d", got, want)
	}
	var dense Bitmap
	if err := dense.UnmarshalBinary(data); err != nil || dense.Count() != b.Count() {
		t.Fatalf("dense round trip: %v, Count %d want %d", err, dense.Count(), b.Count())
	}
}

// encode builds an encoding by hand, with a correct checksum.
func encode(kind uint16, nbits uint64, payload []byte) []byte {
	p := []byte(magic)
	p = binary.LittleEndian.AppendUint16(p, Version)
	p = binary.LittleEndian.AppendUint16(p, kind)
	p = binary.LittleEndian.AppendUint64(p, nbits)
	p = binary.LittleEndian.AppendUint64(p, uint64(len(payload)))
	p = append(p, payload...)
	return binary.LittleEndian.AppendUint32(p, crc32.Checksum(p, castagnoli))
}

func fixCRC(p []byte) []byte {
	p = bytes.Clone(p)
	if len(p) >= minEncodedLen {
		body := p[:len(p)-4]
		binary.LittleEndian.PutUint32(p[len(body):], crc32.Checksum(body, castagnoli))
	}
	return p
}

func TestEncodingFormat(t *testing.T) {
	b := New(200)
	b.SetRange(3, 2)
	b.Set(130)
	got := mustMarshal(t, b)
	want := encode(kindRuns, 200, []byte{3, 2, 125, 1})
	if !bytes.Equal(got, want) {
		t.Fatalf("encoding\n%x\nwant\n%x", got, want)
	}
	if string(got[:4]) != "DBBM" || got[4] != 1 || got[5] != 0 {
		t.Fatalf("header %x", got[:8])
	}
	// 64 bits alternating: runs would be 64 bytes, raw is 8.
	a := New(64)
	for i := uint64(0); i < 64; i += 2 {
		a.Set(i)
	}
	got = mustMarshal(t, a)
	if want := encode(kindRaw, 64, []byte{0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55}); !bytes.Equal(got, want) {
		t.Fatalf("raw encoding\n%x\nwant\n%x", got, want)
	}
	// AppendBinary appends.
	pre := []byte("prefix")
	out, _ := a.AppendBinary(bytes.Clone(pre))
	if !bytes.HasPrefix(out, pre) || !bytes.Equal(out[len(pre):], got) {
		t.Fatal("AppendBinary does not append the encoding")
	}
}

func TestUnmarshalErrors(t *testing.T) {
	good := encode(kindRuns, 200, []byte{3, 2, 125, 1})
	badMagic := bytes.Clone(good)
	badMagic[0] = 'X'
	badVersion := bytes.Clone(good)
	badVersion[4] = 2
	badCRC := bytes.Clone(good)
	badCRC[len(badCRC)-1] ^= 1
	flipped := bytes.Clone(good)
	flipped[24] ^= 1
	plen := fixCRC(func() []byte { p := bytes.Clone(good); p[16]++; return p }())

	for _, c := range []struct {
		name string
		data []byte
		want error
	}{
		{"nil", nil, ErrTruncated},
		{"short", good[:minEncodedLen-1], ErrTruncated},
		{"truncated", good[:len(good)-1], ErrChecksum},
		{"magic", badMagic, ErrBadMagic},
		{"version", badVersion, ErrBadVersion},
		{"crc", badCRC, ErrChecksum},
		{"payload bit flip", flipped, ErrChecksum},
		{"payload length", plen, ErrCorrupt},
		{"kind 0", encode(0, 200, nil), ErrCorrupt},
		{"kind 3", encode(3, 200, nil), ErrCorrupt},
		{"raw too short", encode(kindRaw, 65, make([]byte, 8)), ErrCorrupt},
		{"raw too long", encode(kindRaw, 64, make([]byte, 16)), ErrCorrupt},
		{"raw padding bit", encode(kindRaw, 65, []byte{0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0}), ErrCorrupt},
		{"raw huge", encode(kindRaw, math.MaxUint64, nil), ErrCorrupt},
		{"run empty", encode(kindRuns, 200, []byte{3, 0}), ErrCorrupt},
		{"run adjacent", encode(kindRuns, 200, []byte{3, 2, 0, 1}), ErrCorrupt},
		{"run past end", encode(kindRuns, 200, []byte{150, 51}), ErrCorrupt},
		{"gap past end", encode(kindRuns, 200, []byte{201, 1}), ErrCorrupt},
		{"gap overflow", encode(kindRuns, 200, []byte{3, 2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 1}), ErrCorrupt},
		{"count overflow", encode(kindRuns, math.MaxUint64, []byte{3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}), ErrCorrupt},
		{"varint overlong", encode(kindRuns, 200, []byte{3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}), ErrCorrupt},
		{"varint non-minimal", encode(kindRuns, 200, []byte{0x83, 0x00, 2}), ErrCorrupt},
		{"half a run", encode(kindRuns, 200, []byte{3}), ErrCorrupt},
		{"truncated varint", encode(kindRuns, 200, []byte{3, 0x82}), ErrCorrupt},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := New(200)
			r.SetRange(10, 20)
			before := mustMarshal(t, r)
			err := r.UnmarshalBinary(c.data)
			if !errors.Is(err, c.want) {
				t.Fatalf("err = %v, want %v", err, c.want)
			}
			t.Logf("%v", err)
			if after := mustMarshal(t, r); !bytes.Equal(after, before) {
				t.Fatal("receiver changed by a failed UnmarshalBinary")
			}
			var z Bitmap
			if err := z.UnmarshalBinary(c.data); !errors.Is(err, c.want) || z.Len() != 0 {
				t.Fatalf("zero receiver: err = %v, Len %d", err, z.Len())
			}
			if d, err := Decode(c.data, math.MaxUint64); !errors.Is(err, c.want) || d != nil {
				t.Fatalf("Decode: err = %v", err)
			}
		})
	}

	// Length checks that depend on the receiver or the limit.
	if err := New(100).UnmarshalBinary(good); !errors.Is(err, ErrLengthMismatch) {
		t.Fatalf("length mismatch: %v", err)
	}
	huge := encode(kindRuns, MaxUnmarshalBits+1, []byte{5, 1})
	var z Bitmap
	if err := z.UnmarshalBinary(huge); !errors.Is(err, ErrTooLarge) || z.Len() != 0 {
		t.Fatalf("huge into zero receiver: %v", err)
	}
	if _, err := Decode(huge, 1<<20); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Decode over limit: %v", err)
	}
	if _, err := Decode(good, 200); err != nil {
		t.Fatalf("Decode at limit: %v", err)
	}
}

// TestConcurrentExactlyOnce has many goroutines set overlapping ranges by
// every route while readers scan; every bit must be reported newly set
// exactly once in total, and the final map must be the union of the ranges.
func TestConcurrentExactlyOnce(t *testing.T) {
	const (
		n       = 1<<16 + 37
		writers = 16
		ops     = 400
	)
	b := New(n)
	reports := make([]atomic.Int32, n) // per bit: reports from Set / NewlySet
	var newlyTotal atomic.Uint64       // from every route
	covered := make([][]run, writers)

	var readers, wg sync.WaitGroup
	stop := make(chan struct{})
	var readerErr atomic.Value
	for r := range 3 {
		readers.Add(1)
		go func() {
			defer readers.Done()
			var last uint64
			for {
				select {
				case <-stop:
					return
				default:
				}
				switch r {
				case 0:
					c := b.Count()
					if c < last {
						readerErr.Store(fmt.Errorf("Count went down: %d after %d", c, last))
					}
					last = c
				case 1:
					var sum, end uint64
					b.Runs(func(first, count uint64) bool {
						if count == 0 || (sum > 0 && first <= end) || first+count > n {
							readerErr.Store(fmt.Errorf("bad run [%d,+%d) after end %d", first, count, end))
						}
						sum += count
						end = first + count
						return true
					})
				case 2:
					data, _ := b.MarshalBinary()
					if _, err := Decode(data, n); err != nil {
						readerErr.Store(fmt.Errorf("concurrent marshal: %w", err))
					}
					b.TestRange(0, n)
				}
			}
		}()
	}

	start := make(chan struct{})
	for g := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
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
				switch r.Uint64N(3) {
				case 0:
					newlyTotal.Add(b.SetRange(first, count))
				case 1:
					var prev uint64
					var k uint64
					b.NewlySet(first, count, func(i uint64) {
						if k > 0 && i <= prev {
							readerErr.Store(fmt.Errorf("NewlySet out of order: %d after %d", i, prev))
						}
						prev = i
						k++
						reports[i].Add(1)
					})
					newlyTotal.Add(k)
				case 2:
					for i := first; i < first+count && i < n; i++ {
						if b.Set(i) {
							reports[i].Add(1)
							newlyTotal.Add(1)
						}
					}
				}
			}
		}()
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
		if b.Test(uint64(i)) != want[i] {
			t.Fatalf("bit %d = %v, want %v", i, b.Test(uint64(i)), want[i])
		}
		if reports[i].Load() > 1 {
			t.Fatalf("bit %d reported newly set %d times", i, reports[i].Load())
		}
	}
	if got := b.Count(); got != wantCount || newlyTotal.Load() != got {
		t.Fatalf("Count %d, union %d, sum of newly %d", got, wantCount, newlyTotal.Load())
	}
	t.Logf("%d bits set, %d reported individually", wantCount, func() (s int) {
		for i := range reports {
			s += int(reports[i].Load())
		}
		return
	}())
}

// TestConcurrentSameRange: every goroutine sets the whole map at once.
func TestConcurrentSameRange(t *testing.T) {
	const n = 64*1024 + 5
	for rep := range 20 {
		b := New(n)
		var total atomic.Uint64
		var wg sync.WaitGroup
		start := make(chan struct{})
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				if g%2 == 0 {
					total.Add(b.SetRange(0, n))
				} else {
					b.NewlySet(0, n, func(uint64) { total.Add(1) })
				}
			}()
		}
		close(start)
		wg.Wait()
		if total.Load() != n || b.Count() != n {
			t.Fatalf("rep %d: sum of newly %d, Count %d, want %d", rep, total.Load(), b.Count(), n)
		}
	}
}

// TestConcurrentUnmarshalInPlace: unmarshaling into a sized receiver races
// cleanly (atomic stores) with writers.
func TestConcurrentUnmarshalInPlace(t *testing.T) {
	const n = 10000
	src := New(n)
	src.SetRange(100, 5000)
	data := mustMarshal(t, src)
	b := New(n)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range 200 {
				if g == 0 && k%20 == 0 {
					if err := b.UnmarshalBinary(data); err != nil {
						t.Error(err)
					}
				}
				b.Set(uint64(g*2000 + k))
				b.Count()
			}
		}()
	}
	wg.Wait()
	if !b.TestRange(100, 5000) {
		t.Fatalf("Count %d", b.Count())
	}
}

func TestCountRuns(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	for _, n := range []uint64{0, 1, 63, 64, 65, 130, 1000} {
		for range 50 {
			b := New(n)
			for range r.Uint64N(n/4 + 2) {
				b.SetRange(r.Uint64N(n+1), r.Uint64N(70))
			}
			if got, want := b.countRuns(), uint64(len(runsOf(b))); got != want {
				t.Fatalf("n=%d: countRuns %d, Runs gives %d", n, got, want)
			}
		}
	}
}

// TestConcurrentSetSameBits: in many short rounds, goroutines released
// together race Set over the same two words, so they often meet on a word
// between its load and its OR; each bit must still be reported newly set
// exactly once per round.
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
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := int64(1); r <= rounds; r++ {
				for round.Load() < r {
					runtime.Gosched()
				}
				var mine uint64
				for i := range uint64(n) {
					if b.Set(i) {
						mine++
					}
				}
				total.Add(mine)
				done.Add(1)
			}
		}()
	}
	for r := int64(1); r <= rounds; r++ {
		b.Clear()
		total.Store(0)
		done.Store(0)
		round.Store(r)
		for done.Load() < int64(workers) {
			runtime.Gosched()
		}
		if total.Load() != n || b.Count() != n {
			t.Fatalf("round %d: sum of newly %d, Count %d, want %d", r, total.Load(), b.Count(), n)
		}
	}
	wg.Wait()
}

package bitmap

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// source supplies the numbers that drive a random operation sequence: a
// PRNG in the model test, the fuzzer's bytes in FuzzOps.
type source interface {
	// n returns a number in [0, limit); limit > 0.
	n(limit uint64) uint64
	// done reports that the source is exhausted.
	done() bool
}

type randSource struct{ r *rand.Rand }

func (s randSource) n(limit uint64) uint64 { return s.r.Uint64N(limit) }
func (s randSource) done() bool            { return false }

type byteSource struct{ p []byte }

func (s *byteSource) n(limit uint64) uint64 {
	var v uint64
	for k := uint64(1); k < limit && k != 0; k <<= 8 {
		if len(s.p) == 0 {
			break
		}
		v = v<<8 | uint64(s.p[0])
		s.p = s.p[1:]
	}
	return v % limit
}
func (s *byteSource) done() bool { return len(s.p) == 0 }

// checker runs operations on a Bitmap and on a reference model and fails
// the test at the first difference.
type checker struct {
	t     testing.TB
	b     *Bitmap
	model map[uint64]bool
	log   []string // operations so far, for failure messages
}

func newChecker(t testing.TB, nbits uint64) *checker {
	return &checker{t: t, b: New(nbits), model: map[uint64]bool{}}
}

func (c *checker) logf(format string, args ...any) {
	c.log = append(c.log, fmt.Sprintf(format, args...))
	if len(c.log) > 40 {
		c.log = c.log[1:]
	}
}

func (c *checker) failf(format string, args ...any) {
	c.t.Helper()
	c.t.Fatalf("nbits=%d: %s\nlast operations:\n  %s", c.b.nbits, fmt.Sprintf(format, args...), joinLines(c.log))
}

func joinLines(l []string) string {
	var buf bytes.Buffer
	for i, s := range l {
		if i > 0 {
			buf.WriteString("\n  ")
		}
		buf.WriteString(s)
	}
	return buf.String()
}

// clampModel is the model's idea of [first, first+count) ∩ [0, n).
func (c *checker) clampModel(first, count uint64) (lo, hi uint64) {
	n := c.b.nbits
	if first >= n {
		return 0, 0
	}
	hi = n
	if count < n-first {
		hi = first + count
	}
	return first, hi
}

func (c *checker) set(i uint64) {
	c.logf("Set(%d)", i)
	want := i < c.b.nbits && !c.model[i]
	if got := c.b.SetRange(i, 1) == 1; got != want {
		c.failf("Set(%d) = %v, want %v", i, got, want)
	}
	if i < c.b.nbits {
		c.model[i] = true
	}
}

func (c *checker) test(i uint64) {
	c.logf("Test(%d)", i)
	if got, want := c.b.TestRange(i, 1), c.model[i]; got != want {
		c.failf("Test(%d) = %v, want %v", i, got, want)
	}
}

func (c *checker) setRange(first, count uint64) {
	c.logf("SetRange(%d, %d)", first, count)
	lo, hi := c.clampModel(first, count)
	var want uint64
	for i := lo; i < hi; i++ {
		if !c.model[i] {
			want++
			c.model[i] = true
		}
	}
	if got := c.b.SetRange(first, count); got != want {
		c.failf("SetRange(%d, %d) = %d newly set, want %d", first, count, got, want)
	}
}

func (c *checker) testRange(first, count uint64) {
	c.logf("TestRange(%d, %d)", first, count)
	want := true
	if count > 0 {
		if first >= c.b.nbits || count > c.b.nbits-first {
			want = false
		} else {
			for i := first; i < first+count; i++ {
				if !c.model[i] {
					want = false
					break
				}
			}
		}
	}
	if got := c.b.TestRange(first, count); got != want {
		c.failf("TestRange(%d, %d) = %v, want %v", first, count, got, want)
	}
}

// fresh starts over with a new, empty bitmap of the same length (bits are
// never cleared; without this a long sequence soon fills the map).
func (c *checker) fresh() {
	c.logf("New(%d)", c.b.nbits)
	c.b = New(c.b.nbits)
	clear(c.model)
}

type run struct{ first, count uint64 }

// same checks that b holds exactly the model's bits, by Test and by words.
func (c *checker) same(b *Bitmap, what string) {
	c.t.Helper()
	if b.nbits != c.b.nbits {
		c.failf("%s: Len() = %d, want %d", what, b.nbits, c.b.nbits)
	}
	for i := uint64(0); i < b.nbits+2; i++ {
		if b.TestRange(i, 1) != c.model[i] {
			c.failf("%s: bit %d = %v, want %v", what, i, b.TestRange(i, 1), c.model[i])
		}
	}
	if got, want := popcount(b), uint64(len(c.model)); got != want {
		c.failf("%s: %d bits set, want %d", what, got, want)
	}
	if !tailClean(b) {
		c.failf("%s: bits set past Len()", what)
	}
}

// step runs one operation chosen by src.
func (c *checker) step(src source) {
	n := c.b.nbits
	index := func() uint64 {
		switch src.n(16) {
		case 0:
			return math.MaxUint64 - src.n(3)
		case 1:
			return n + src.n(130) // at and past the end
		case 2:
			return src.n(4)*64 + src.n(3) - 1 // around word boundaries (wraps to MaxUint64)
		default:
			return src.n(n + 1)
		}
	}
	length := func() uint64 {
		switch src.n(16) {
		case 0:
			return math.MaxUint64 - src.n(3)
		case 1:
			return n + src.n(3)
		case 2:
			return src.n(5)*64 + src.n(3) - 1
		case 3:
			return 0
		default:
			return src.n(200)
		}
	}
	switch op := src.n(13); {
	case op < 3:
		c.set(index())
	case op < 5:
		c.test(index())
	case op < 8:
		c.setRange(index(), length())
	case op < 11:
		c.testRange(index(), length())
	case op < 12:
		c.same(c.b, "full check")
	default:
		if src.n(4) == 0 {
			c.fresh()
		}
	}
}

var modelSizes = []uint64{0, 1, 2, 63, 64, 65, 127, 128, 129, 191, 200, 640, 1000, 4096 + 17}

func TestModel(t *testing.T) {
	seed := uint64(rand.Int64())
	t.Logf("seed %d", seed)
	for _, n := range modelSizes {
		for rep := range 4 {
			t.Run(fmt.Sprintf("n=%d/%d", n, rep), func(t *testing.T) {
				src := randSource{rand.New(rand.NewPCG(seed, n*8+uint64(rep)))}
				c := newChecker(t, n)
				for range 1500 {
					c.step(src)
				}
				c.same(c.b, "final")
			})
		}
	}
}

// FuzzOps interprets its input as a bitmap size followed by a sequence of
// operations, and checks each against the model.
func FuzzOps(f *testing.F) {
	f.Add([]byte{0, 0})
	f.Add([]byte{0, 65, 5, 0, 0, 1, 9, 9, 9, 0, 0, 3, 7, 7, 2})
	f.Add([]byte{1, 0, 7, 3, 0, 200, 100, 10, 255, 255, 255, 4, 19, 0, 1})
	f.Add(bytes.Repeat([]byte{17, 3, 200, 9, 0, 64, 128}, 12))
	f.Fuzz(func(t *testing.T, data []byte) {
		src := &byteSource{data}
		c := newChecker(t, src.n(1<<11))
		for steps := 0; !src.done() && steps < 300; steps++ {
			c.step(src)
		}
		c.same(c.b, "final")
	})
}

package bitmap

import (
	"math/bits"
	"sync/atomic"
	"unsafe"
)

// Bitmap is a fixed-size set of bits indexed from 0 to Len()-1. The zero
// value is an empty bitmap of length 0. A Bitmap must not be copied after
// first use; share it by pointer.
type Bitmap struct {
	nbits uint64
	words []atomic.Uint64 // bits past nbits in the last word are always zero
}

// headerBytes is the fixed cost of a Bitmap besides its words.
const headerBytes = uint64(unsafe.Sizeof(Bitmap{}))

// wordsFor is the number of 64-bit words that hold nbits bits; it does not
// overflow for any nbits.
func wordsFor(nbits uint64) uint64 {
	w := nbits / 64
	if nbits%64 != 0 {
		w++
	}
	return w
}

// BytesFor reports the memory, in bytes, that New(nbits) allocates and
// keeps: the word array plus the fixed Bitmap header. It lets a caller
// check a bitmap against a memory budget before creating it.
func BytesFor(nbits uint64) uint64 {
	return wordsFor(nbits)*8 + headerBytes
}

// New returns a bitmap of nbits bits, all clear. It allocates
// BytesFor(nbits) bytes; a size that cannot be allocated panics like make
// does, so callers with untrusted sizes should check BytesFor first.
func New(nbits uint64) *Bitmap {
	return &Bitmap{nbits: nbits, words: make([]atomic.Uint64, wordsFor(nbits))}
}

// Len returns the number of bits.
func (b *Bitmap) Len() uint64 { return b.nbits }

// Test reports whether bit i is set. It returns false for i >= Len().
func (b *Bitmap) Test(i uint64) bool {
	if i >= b.nbits {
		return false
	}
	return b.words[i/64].Load()&(1<<(i%64)) != 0
}

// Set sets bit i and reports whether this call changed it from clear to
// set. When several goroutines set the same bit at once exactly one of them
// gets true. For i >= Len() it does nothing and returns false.
//
// This is the hot path: a bit that is already set costs one atomic load.
func (b *Bitmap) Set(i uint64) bool {
	if i >= b.nbits {
		return false
	}
	w := &b.words[i/64]
	m := uint64(1) << (i % 64)
	if w.Load()&m != 0 {
		return false
	}
	return w.Or(m)&m == 0
}

// clamp limits the range [first, first+count) to [0, Len()) without
// overflowing and returns the end (exclusive) of the clamped range; end <=
// first means the range is empty.
func (b *Bitmap) clamp(first, count uint64) (end uint64) {
	if first >= b.nbits {
		return first
	}
	if count > b.nbits-first {
		return b.nbits
	}
	return first + count
}

// rangeMask is the mask of the bits of word wi that lie in [first, end),
// given that the word overlaps that range.
func rangeMask(wi, first, end uint64) uint64 {
	lo, hi := wi*64, wi*64+64
	m := ^uint64(0)
	if first > lo {
		m <<= first - lo
	}
	if end < hi {
		m &= (1 << (end - lo)) - 1
	}
	return m
}

// SetRange sets bits [first, first+count), clamped to [0, Len()), and
// returns how many of them this call changed from clear to set. Whole
// words that are already full cost one atomic load each; other whole words
// are set with one atomic OR.
func (b *Bitmap) SetRange(first, count uint64) (newly uint64) {
	end := b.clamp(first, count)
	if end <= first {
		return 0
	}
	for wi := first / 64; wi <= (end-1)/64; wi++ {
		m := rangeMask(wi, first, end)
		w := &b.words[wi]
		if w.Load()&m == m {
			continue
		}
		old := w.Or(m)
		newly += uint64(bits.OnesCount64(m &^ old))
	}
	return newly
}

// NewlySet sets bits [first, first+count), clamped to [0, Len()), and
// calls fn, in increasing order, with each bit that this call changed from
// clear to set. Across concurrent callers every bit is reported to exactly
// one fn. fn runs after its bit's word has been updated and must not call
// back into an operation that expects the bit to be clear.
func (b *Bitmap) NewlySet(first, count uint64, fn func(i uint64)) {
	end := b.clamp(first, count)
	if end <= first {
		return
	}
	for wi := first / 64; wi <= (end-1)/64; wi++ {
		m := rangeMask(wi, first, end)
		w := &b.words[wi]
		if w.Load()&m == m {
			continue
		}
		nw := m &^ w.Or(m)
		for nw != 0 {
			fn(wi*64 + uint64(bits.TrailingZeros64(nw)))
			nw &= nw - 1
		}
	}
}

// TestRange reports whether every bit in [first, first+count) is set. An
// empty range (count 0) is all set; a range that extends past Len() is
// not, since bits past the end are never set.
func (b *Bitmap) TestRange(first, count uint64) bool {
	if count == 0 {
		return true
	}
	if first >= b.nbits || count > b.nbits-first {
		return false
	}
	end := first + count
	for wi := first / 64; wi <= (end-1)/64; wi++ {
		m := rangeMask(wi, first, end)
		if b.words[wi].Load()&m != m {
			return false
		}
	}
	return true
}

// Count returns the number of set bits.
func (b *Bitmap) Count() uint64 {
	var n uint64
	for i := range b.words {
		n += uint64(bits.OnesCount64(b.words[i].Load()))
	}
	return n
}

// Clear clears every bit. It is word by word, not atomic as a whole: a
// bit set concurrently with Clear may or may not survive it.
func (b *Bitmap) Clear() {
	for i := range b.words {
		b.words[i].Store(0)
	}
}

// nextSet returns the index of the first set bit at or after from, or
// Len() if there is none.
func (b *Bitmap) nextSet(from uint64) uint64 {
	if from >= b.nbits {
		return b.nbits
	}
	wi := from / 64
	w := b.words[wi].Load() &^ (1<<(from%64) - 1)
	for w == 0 {
		wi++
		if wi >= uint64(len(b.words)) {
			return b.nbits
		}
		w = b.words[wi].Load()
	}
	return min(wi*64+uint64(bits.TrailingZeros64(w)), b.nbits)
}

// nextClear returns the index of the first clear bit at or after from, or
// Len() if there is none.
func (b *Bitmap) nextClear(from uint64) uint64 {
	if from >= b.nbits {
		return b.nbits
	}
	wi := from / 64
	w := ^b.words[wi].Load() &^ (1<<(from%64) - 1)
	for w == 0 {
		wi++
		if wi >= uint64(len(b.words)) {
			return b.nbits
		}
		w = ^b.words[wi].Load()
	}
	return min(wi*64+uint64(bits.TrailingZeros64(w)), b.nbits)
}

// Runs calls fn with each maximal run of set bits, [first, first+count),
// in increasing order, and stops early when fn returns false. Consecutive
// runs are never adjacent (count >= 1 and a clear bit lies between them).
// Under concurrent writes the runs reflect each word as it was read.
func (b *Bitmap) Runs(fn func(first, count uint64) bool) {
	var start, end uint64
	have := false
	for i := uint64(0); i < b.nbits; {
		s := b.nextSet(i)
		if s >= b.nbits {
			break
		}
		e := b.nextClear(s)
		if e == s { // only possible if bit s was cleared concurrently
			i = s + 1
			continue
		}
		if have && s == end { // bit set concurrently between the two reads: merge
			end = e
		} else {
			if have && !fn(start, end-start) {
				return
			}
			start, end, have = s, e, true
		}
		i = e
	}
	if have {
		fn(start, end-start)
	}
}

package bitmap

import (
	"math/bits"
	"sync/atomic"
	"unsafe"
)

// Bitmap is a fixed-size set of bits indexed from 0 to nbits-1. The zero
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

// Bytes reports the memory b holds (BytesFor of its length).
func (b *Bitmap) Bytes() uint64 { return BytesFor(b.nbits) }

// clamp limits the range [first, first+count) to [0, nbits) without
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

// SetRange sets bits [first, first+count), clamped to [0, nbits), and
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

// TestRange reports whether every bit in [first, first+count) is set. An
// empty range (count 0) is all set; a range that extends past the end is
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

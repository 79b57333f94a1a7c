package bitmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math/bits"
)

// Encoding, version 1. All integers are little-endian.
//
//	offset  size  field
//	0       4     magic "DBBM"
//	4       2     version = 1
//	6       2     payload kind: 1 = raw words, 2 = runs
//	8       8     number of bits (Len)
//	16      8     payload length in bytes
//	24      n     payload
//	24+n    4     CRC32C (Castagnoli) of bytes [0, 24+n)
//
// Raw payload: ceil(Len/64) 64-bit words, bit i in word i/64 at bit i%64;
// bits past Len in the last word must be zero.
//
// Runs payload: for each maximal run of set bits, in increasing order, two
// unsigned varints (encoding/binary Uvarint, minimal length): the number of
// clear bits between the end of the previous run (or bit 0) and the run's
// first bit, then the run's length. Lengths are >= 1, gaps after the first
// run are >= 1, and runs end at or before Len, so every bitmap has exactly
// one runs encoding.
//
// The encoder writes whichever payload is shorter (raw on a tie).
const (
	magic         = "DBBM"
	Version       = 1 // encoding version written by MarshalBinary
	kindRaw       = 1
	kindRuns      = 2
	headerSize    = 24
	trailerSize   = 4
	minEncodedLen = headerSize + trailerSize
)

// MaxUnmarshalBits is the largest bit count that UnmarshalBinary allocates
// for an empty receiver (2^36 bits: 8 GiB of memory, a 256 TiB device at
// 4 KiB blocks). A receiver that already has a length is filled in place
// and has no such limit.
const MaxUnmarshalBits = 1 << 36

// Errors returned (wrapped, with details) by UnmarshalBinary and Decode.
var (
	ErrTruncated      = errors.New("bitmap: encoding truncated")
	ErrBadMagic       = errors.New("bitmap: bad magic (not a bitmap encoding)")
	ErrBadVersion     = errors.New("bitmap: unsupported encoding version")
	ErrChecksum       = errors.New("bitmap: checksum mismatch")
	ErrCorrupt        = errors.New("bitmap: corrupt encoding")
	ErrLengthMismatch = errors.New("bitmap: bit count mismatch")
	ErrTooLarge       = errors.New("bitmap: bit count too large")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// MarshalBinary encodes the bitmap (see the format above). It never
// fails. Under concurrent writes the result is a valid encoding of the
// words as they were read.
func (b *Bitmap) MarshalBinary() ([]byte, error) {
	return b.AppendBinary(nil)
}

// AppendBinary appends the encoding of MarshalBinary to dst.
func (b *Bitmap) AppendBinary(dst []byte) ([]byte, error) {
	start := len(dst)
	rawLen := uint64(len(b.words)) * 8

	dst = append(dst, magic...)
	dst = binary.LittleEndian.AppendUint16(dst, Version)
	dst = binary.LittleEndian.AppendUint16(dst, 0) // kind, filled in below
	dst = binary.LittleEndian.AppendUint64(dst, b.nbits)
	dst = binary.LittleEndian.AppendUint64(dst, 0) // payload length, below
	payload := len(dst)

	// Try runs first, unless a quick count shows they cannot be shorter
	// (each run takes at least two bytes), and give up as soon as they are
	// no shorter than raw.
	kind := uint16(kindRuns)
	short := 2*b.countRuns() < rawLen
	if short {
		var prevEnd uint64
		b.Runs(func(first, count uint64) bool {
			dst = binary.AppendUvarint(dst, first-prevEnd)
			dst = binary.AppendUvarint(dst, count)
			prevEnd = first + count
			short = uint64(len(dst)-payload) < rawLen
			return short
		})
	}
	if !short || uint64(len(dst)-payload) >= rawLen {
		kind = kindRaw
		dst = dst[:payload]
		if free := cap(dst) - len(dst); uint64(free) < rawLen+trailerSize {
			grown := make([]byte, len(dst), uint64(len(dst))+rawLen+trailerSize)
			copy(grown, dst)
			dst = grown
		}
		for i := range b.words {
			dst = binary.LittleEndian.AppendUint64(dst, b.words[i].Load())
		}
	}

	binary.LittleEndian.PutUint16(dst[start+6:], kind)
	binary.LittleEndian.PutUint64(dst[start+16:], uint64(len(dst)-payload))
	sum := crc32.Checksum(dst[start:], castagnoli)
	return binary.LittleEndian.AppendUint32(dst, sum), nil
}

// countRuns returns the number of runs of set bits (a run starts at a set
// bit whose lower neighbour is clear), with one pass of word operations.
func (b *Bitmap) countRuns() uint64 {
	var runs, carry uint64 // carry: the top bit of the previous word
	for i := range b.words {
		w := b.words[i].Load()
		runs += uint64(bits.OnesCount64(w &^ (w<<1 | carry)))
		carry = w >> 63
	}
	return runs
}

// decoded is a fully validated encoding.
type decoded struct {
	nbits   uint64
	kind    uint16
	payload []byte
}

// parse validates data completely, so applying it cannot fail.
func parse(data []byte) (decoded, error) {
	var d decoded
	if len(data) < minEncodedLen {
		return d, fmt.Errorf("%w: %d bytes, a bitmap encoding is at least %d", ErrTruncated, len(data), minEncodedLen)
	}
	if string(data[:4]) != magic {
		return d, fmt.Errorf("%w: got %q, want %q", ErrBadMagic, data[:4], magic)
	}
	if v := binary.LittleEndian.Uint16(data[4:]); v != Version {
		return d, fmt.Errorf("%w: version %d, this build reads version %d", ErrBadVersion, v, Version)
	}
	body := data[:len(data)-trailerSize]
	stored := binary.LittleEndian.Uint32(data[len(body):])
	if sum := crc32.Checksum(body, castagnoli); sum != stored {
		return d, fmt.Errorf("%w: stored CRC32C %08x, computed %08x over %d bytes", ErrChecksum, stored, sum, len(body))
	}
	d.kind = binary.LittleEndian.Uint16(data[6:])
	d.nbits = binary.LittleEndian.Uint64(data[8:])
	plen := binary.LittleEndian.Uint64(data[16:])
	if have := uint64(len(body) - headerSize); plen != have {
		return d, fmt.Errorf("%w: header says %d payload bytes, found %d", ErrCorrupt, plen, have)
	}
	d.payload = body[headerSize:]
	switch d.kind {
	case kindRaw:
		return d, checkRaw(d.nbits, d.payload)
	case kindRuns:
		return d, walkRuns(d.nbits, d.payload, nil)
	default:
		return d, fmt.Errorf("%w: unknown payload kind %d", ErrCorrupt, d.kind)
	}
}

func checkRaw(nbits uint64, p []byte) error {
	want := wordsFor(nbits) * 8
	if uint64(len(p)) != want {
		return fmt.Errorf("%w: raw payload of %d bytes, %d bits need %d", ErrCorrupt, len(p), nbits, want)
	}
	if tail := nbits % 64; tail != 0 {
		last := binary.LittleEndian.Uint64(p[len(p)-8:])
		if last>>tail != 0 {
			return fmt.Errorf("%w: bits set past the end (bit count %d)", ErrCorrupt, nbits)
		}
	}
	return nil
}

// uvarint reads one minimal-length unsigned varint.
func uvarint(p []byte, off int) (uint64, int, error) {
	v, n := binary.Uvarint(p[off:])
	switch {
	case n == 0:
		return 0, 0, fmt.Errorf("%w: run list truncated at payload byte %d", ErrCorrupt, off)
	case n < 0:
		return 0, 0, fmt.Errorf("%w: varint overflow at payload byte %d", ErrCorrupt, off)
	case n > 1 && p[off+n-1] == 0:
		return 0, 0, fmt.Errorf("%w: non-minimal varint at payload byte %d", ErrCorrupt, off)
	}
	return v, off + n, nil
}

// walkRuns validates a runs payload and, if fn is not nil, calls it with
// each run.
func walkRuns(nbits uint64, p []byte, fn func(first, count uint64)) error {
	var pos uint64
	for off, i := 0, 0; off < len(p); i++ {
		at := off
		gap, off1, err := uvarint(p, off)
		if err != nil {
			return err
		}
		count, off2, err := uvarint(p, off1)
		if err != nil {
			return err
		}
		off = off2
		switch {
		case count == 0:
			return fmt.Errorf("%w: run %d (payload byte %d) is empty", ErrCorrupt, i, at)
		case gap == 0 && i > 0:
			return fmt.Errorf("%w: run %d (payload byte %d) touches the previous run", ErrCorrupt, i, at)
		case gap > nbits-pos || count > nbits-pos-gap:
			return fmt.Errorf("%w: run %d (payload byte %d) ends past bit count %d", ErrCorrupt, i, at, nbits)
		}
		if fn != nil {
			fn(pos+gap, count)
		}
		pos += gap + count
	}
	return nil
}

// fill replaces b's contents (b.Len() == d.nbits) with d's, using atomic
// stores only.
func (d decoded) fill(b *Bitmap) {
	switch d.kind {
	case kindRaw:
		for i := range b.words {
			b.words[i].Store(binary.LittleEndian.Uint64(d.payload[8*i:]))
		}
	case kindRuns:
		b.Clear()
		_ = walkRuns(d.nbits, d.payload, func(first, count uint64) { b.SetRange(first, count) })
	}
}

// UnmarshalBinary replaces b's contents with an encoding made by
// MarshalBinary. If b has a length (b.Len() > 0) the encoding must have the
// same bit count, and b is overwritten in place with atomic stores (safe,
// though not atomic as a whole, against concurrent use). If b is empty
// (the zero Bitmap or New(0)), it takes the encoded length, up to
// MaxUnmarshalBits; this must not race with other use of b.
//
// Bad magic, version, checksum, lengths or payload are reported with an
// error wrapping one of the Err* values, and b is left unchanged. It never
// panics on any input.
func (b *Bitmap) UnmarshalBinary(data []byte) error {
	d, err := parse(data)
	if err != nil {
		return err
	}
	if b.nbits == 0 {
		if d.nbits > MaxUnmarshalBits {
			return fmt.Errorf("%w: %d bits, the limit for an empty receiver is %d", ErrTooLarge, d.nbits, uint64(MaxUnmarshalBits))
		}
		nb := New(d.nbits)
		d.fill(nb)
		b.nbits, b.words = nb.nbits, nb.words
		return nil
	}
	if d.nbits != b.nbits {
		return fmt.Errorf("%w: encoding has %d bits, bitmap has %d", ErrLengthMismatch, d.nbits, b.nbits)
	}
	d.fill(b)
	return nil
}

// Decode returns a new bitmap from an encoding made by MarshalBinary,
// refusing (with ErrTooLarge) encodings of more than maxBits bits before
// allocating anything. Errors are as for UnmarshalBinary.
func Decode(data []byte, maxBits uint64) (*Bitmap, error) {
	d, err := parse(data)
	if err != nil {
		return nil, err
	}
	if d.nbits > maxBits {
		return nil, fmt.Errorf("%w: %d bits, the limit is %d", ErrTooLarge, d.nbits, maxBits)
	}
	b := New(d.nbits)
	d.fill(b)
	return b, nil
}

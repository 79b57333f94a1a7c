package bitmap

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// fuzzMaxBits bounds what the fuzz target allocates for one input.
const fuzzMaxBits = 1 << 20

func FuzzUnmarshal(f *testing.F) {
	for _, n := range []uint64{0, 1, 63, 64, 65, 200, 1000} {
		b := New(n)
		f.Add(mustMarshal(f, b))
		b.SetRange(n/3, n/2)
		f.Add(mustMarshal(f, b))
		for i := uint64(0); i < n; i += 3 {
			b.Set(i)
		}
		f.Add(mustMarshal(f, b)) // raw
	}
	f.Add([]byte{})
	f.Add([]byte("DBBM"))
	f.Add(encode(kindRuns, 200, []byte{0x83, 0x00, 2}))
	f.Add(encode(kindRaw, 65, make([]byte, 16)))
	f.Add(encode(kindRuns, 1<<40, []byte{5, 1}))

	f.Fuzz(func(t *testing.T, data []byte) {
		checkDecoding(t, data)
		// Most mutations break the checksum; also try the input with a
		// fixed-up checksum so the fuzzer reaches the payload checks.
		if fixed := fixCRC(data); !bytes.Equal(fixed, data) {
			checkDecoding(t, fixed)
		}
	})
}

// checkDecoding: every decoding route agrees on whether data is valid and
// on the result; a valid encoding round-trips, and re-encodes to the same
// bytes when the encoder picks the same payload kind (each kind has one
// encoding per bitmap).
func checkDecoding(t *testing.T, data []byte) {
	var claimed uint64 // the header's bit count, if there is one
	if len(data) >= 16 {
		claimed = binary.LittleEndian.Uint64(data[8:])
	}
	b, err := Decode(data, fuzzMaxBits)

	// A sized receiver must agree with Decode and be unchanged on error.
	if claimed > 0 && claimed <= fuzzMaxBits {
		r := New(claimed)
		r.SetRange(claimed/2, 3)
		before := mustMarshal(t, r)
		rerr := r.UnmarshalBinary(data)
		if (rerr == nil) != (err == nil) {
			t.Fatalf("UnmarshalBinary(sized) err %v, Decode err %v", rerr, err)
		}
		if rerr != nil {
			if after := mustMarshal(t, r); !bytes.Equal(after, before) {
				t.Fatal("failed UnmarshalBinary changed the receiver")
			}
		} else if !equalBits(r, b) {
			t.Fatal("UnmarshalBinary(sized) and Decode disagree")
		}
	}
	// An empty receiver allocates up to MaxUnmarshalBits; keep it small.
	if claimed <= fuzzMaxBits {
		var z Bitmap
		zerr := z.UnmarshalBinary(data)
		if (zerr == nil) != (err == nil) {
			t.Fatalf("UnmarshalBinary(zero) err %v, Decode err %v", zerr, err)
		}
		if zerr != nil && z.Len() != 0 {
			t.Fatal("failed UnmarshalBinary changed the empty receiver")
		}
		if zerr == nil && !equalBits(&z, b) {
			t.Fatal("UnmarshalBinary(zero) and Decode disagree")
		}
	}
	if err != nil {
		if b != nil {
			t.Fatal("Decode returned a bitmap and an error")
		}
		return
	}

	// Invariants of a decoded bitmap.
	var sum, end uint64
	first := true
	b.Runs(func(f, c uint64) bool {
		if c == 0 || (!first && f <= end) || f+c > b.Len() || f+c < f {
			t.Fatalf("bad run [%d, +%d) after %d", f, c, end)
		}
		sum += c
		end = f + c
		first = false
		return true
	})
	if sum != b.Count() {
		t.Fatalf("runs cover %d bits, Count %d", sum, b.Count())
	}
	if b.Len()%64 != 0 && len(b.words) > 0 && b.words[len(b.words)-1].Load()>>(b.Len()%64) != 0 {
		t.Fatal("decoded bitmap has bits past the end")
	}

	enc := mustMarshal(t, b)
	b2, err := Decode(enc, fuzzMaxBits)
	if err != nil {
		t.Fatalf("re-encoding does not decode: %v", err)
	}
	if !equalBits(b, b2) {
		t.Fatal("round trip changed the bits")
	}
	if enc2 := mustMarshal(t, b2); !bytes.Equal(enc, enc2) {
		t.Fatal("encoding is not stable")
	}
	if enc[6] == data[6] && !bytes.Equal(enc, data) {
		t.Fatalf("same kind, different bytes:\n%x\n%x", data, enc)
	}
}

func equalBits(a, b *Bitmap) bool {
	if a.Len() != b.Len() {
		return false
	}
	for i := range a.words {
		if a.words[i].Load() != b.words[i].Load() {
			return false
		}
	}
	return true
}

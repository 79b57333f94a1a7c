package cow

import (
	"bytes"
	"errors"
	"math"
	"strings"
	"syscall"
	"testing"
)

// goldenHeader is a header built byte by byte from dattobd's struct
// cow_header layout (little-endian, as on x86-64), independent of the
// encoder under test.
func goldenHeader() []byte {
	b := make([]byte, HeaderSize)
	copy(b[0x00:], []byte{0xA8, 0x12, 0x00, 0x00})                         // magic 4776 = 0x12A8
	copy(b[0x04:], []byte{0x03, 0x00, 0x00, 0x00})                         // flags CLEAN|INDEX_ONLY
	copy(b[0x08:], []byte{0x40, 0x30, 0x20, 0x10, 0x00, 0x00, 0x00, 0x00}) // fpos 0x10203040
	copy(b[0x10:], []byte{0x00, 0x00, 0x04, 0x03, 0x02, 0x01, 0x00, 0x00}) // fsize 0x010203040000
	copy(b[0x18:], []byte{0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08}) // seqid 0x0807060504030201
	for i := range 16 {
		b[0x20+i] = 0xA0 + byte(i) // uuid A0 A1 ... AF
	}
	copy(b[0x30:], []byte{0x01, 0, 0, 0, 0, 0, 0, 0})                      // version 1
	copy(b[0x38:], []byte{0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11}) // nr_changed_blocks
	return b
}

func goldenStruct() Header {
	h := Header{
		Flags: FlagClean | FlagIndexOnly, FPos: 0x10203040, FSize: 0x010203040000,
		SeqID: 0x0807060504030201, Version: 1, NrChangedBlocks: 0x1122334455667788,
	}
	for i := range 16 {
		h.UUID[i] = 0xA0 + byte(i)
	}
	return h
}

func TestHeaderGolden(t *testing.T) {
	want := goldenHeader()
	got, err := goldenStruct().MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		for i := range want {
			if got[i] != want[i] {
				t.Fatalf("MarshalBinary differs from the golden header at byte %#x: got %#x, want %#x", i, got[i], want[i])
			}
		}
	}
	h, err := parseHeader(want)
	if err != nil {
		t.Fatal(err)
	}
	if h != goldenStruct() {
		t.Fatalf("parseHeader(golden) = %+v, want %+v", h, goldenStruct())
	}
}

// TestHeaderFieldOffsets sets one field at a time and checks that exactly
// its bytes, at the documented offset, change.
func TestHeaderFieldOffsets(t *testing.T) {
	base, _ := Header{}.MarshalBinary()
	if len(base) != HeaderSize {
		t.Fatalf("MarshalBinary gives %d bytes, want %d", len(base), HeaderSize)
	}
	if !bytes.Equal(base[:4], []byte{0xA8, 0x12, 0, 0}) {
		t.Fatalf("magic bytes %x", base[:4])
	}
	for i := 4; i < HeaderSize; i++ {
		if base[i] != 0 {
			t.Fatalf("byte %#x of a zero header is %#x", i, base[i])
		}
	}
	var u [16]byte
	for i := range u {
		u[i] = byte(0xF0 + i)
	}
	cases := []struct {
		name string
		off  int
		want []byte
		h    Header
	}{
		{"flags", 0x04, []byte{0x05, 0, 0, 0x80}, Header{Flags: 0x80000005}},
		{"fpos", 0x08, []byte{1, 2, 3, 4, 5, 6, 7, 8}, Header{FPos: 0x0807060504030201}},
		{"fsize", 0x10, []byte{9, 10, 11, 12, 13, 14, 15, 16}, Header{FSize: 0x100F0E0D0C0B0A09}},
		{"seqid", 0x18, []byte{17, 0, 0, 0, 0, 0, 0, 0x18}, Header{SeqID: 0x1800000000000011}},
		{"uuid", 0x20, u[:], Header{UUID: u}},
		{"version", 0x30, []byte{1, 0, 0, 0, 0, 0, 0, 0}, Header{Version: 1}},
		{"nr_changed_blocks", 0x38, []byte{0xEE, 0xDD, 0, 0, 0, 0, 0, 0x7F}, Header{NrChangedBlocks: 0x7F0000000000DDEE}},
	}
	for _, c := range cases {
		b, _ := c.h.MarshalBinary()
		for i := range b {
			in := i >= c.off && i < c.off+len(c.want)
			switch {
			case in && b[i] != c.want[i-c.off]:
				t.Errorf("%s: byte %#x = %#x, want %#x", c.name, i, b[i], c.want[i-c.off])
			case !in && b[i] != base[i]:
				t.Errorf("%s: byte %#x outside the field changed to %#x", c.name, i, b[i])
			}
		}
	}
}

func validHeader() Header {
	return Header{FPos: 20, FSize: 1 << 20, SeqID: 3, Version: 1, NrChangedBlocks: 7, UUID: [16]byte{1, 2, 3}}
}

func TestHeaderRoundTrip(t *testing.T) {
	for _, h := range []Header{
		validHeader(),
		{Flags: FlagClean, FPos: minSlot, FSize: HeaderSize + SectionBytes, SeqID: 1, Version: 1},
		{Flags: FlagIndexOnly | FlagClean, FPos: 1 << 40, FSize: 1 << 52, SeqID: math.MaxUint64, Version: 1, NrChangedBlocks: math.MaxUint64},
		{FPos: 100, FSize: 100*BlockSize - 1, Version: 0}, // fpos = ceil(fsize/4096): dattobd's last append
	} {
		b, err := h.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		g, err := parseHeader(b)
		if err != nil {
			t.Fatalf("%+v: %v", h, err)
		}
		if g != h {
			t.Fatalf("round trip: got %+v, want %+v", g, h)
		}
	}
}

func TestParseHeaderSpecialFields(t *testing.T) {
	h := validHeader()
	h.Flags = FlagClean | FlagVmallocUpper
	b, _ := h.MarshalBinary()
	g, err := parseHeader(b)
	if err != nil {
		t.Fatal(err)
	}
	if g.Flags != FlagClean {
		t.Fatalf("VMALLOC_UPPER not cleared: flags %#x", g.Flags)
	}
	// Version 0 has no nr_changed_blocks: whatever is at 0x38 reads as 0.
	h = validHeader()
	h.Version = 0
	b, _ = h.MarshalBinary()
	if g, err = parseHeader(b); err != nil || g.NrChangedBlocks != 0 || g.Version != 0 {
		t.Fatalf("version 0: %+v, %v", g, err)
	}
	// The reserved space is ignored.
	b, _ = validHeader().MarshalBinary()
	b[0x40], b[HeaderSize-1] = 0xFF, 0xFF
	if g, err = parseHeader(b); err != nil || g != validHeader() {
		t.Fatalf("reserved bytes: %+v, %v", g, err)
	}
}

func TestParseHeaderRejects(t *testing.T) {
	good, _ := validHeader().MarshalBinary()
	mod := func(f func(h *Header)) []byte {
		h := validHeader()
		f(&h)
		b, _ := h.MarshalBinary()
		return b
	}
	badMagic := append([]byte(nil), good...)
	badMagic[0] = 0xA9
	cases := []struct {
		name, msg string
		b         []byte
	}{
		{"nil", "0 bytes", nil},
		{"short", "4095 bytes", good[:HeaderSize-1]},
		{"long", "4097 bytes", append(append([]byte(nil), good...), 0)},
		{"zeros", "bad magic", make([]byte, HeaderSize)},
		{"magic", "bad magic", badMagic},
		{"version 2", "version 2", mod(func(h *Header) { h.Version = 2 })},
		{"version huge", "version", mod(func(h *Header) { h.Version = math.MaxUint64 })},
		{"flag 8", "flags 0x8", mod(func(h *Header) { h.Flags = FlagClean | 8 })},
		{"flag high", "flags 0x80000000", mod(func(h *Header) { h.Flags = 1 << 31 })},
		{"fpos 0", "fpos 0", mod(func(h *Header) { h.FPos = 0 })},
		{"fpos 1", "fpos 1 ", mod(func(h *Header) { h.FPos = 1 })},
		{"fpos 8", "fpos 8 ", mod(func(h *Header) { h.FPos = 8 })},
		{"fpos past fsize", "beyond fsize", mod(func(h *Header) { h.FPos = h.FSize/BlockSize + 1 })},
		{"fpos huge", "beyond fsize", mod(func(h *Header) { h.FPos = math.MaxUint64 })},
		{"fsize small", "fsize", mod(func(h *Header) { h.FSize = HeaderSize + SectionBytes - 1; h.FPos = minSlot })},
		{"fsize 0", "fsize 0", mod(func(h *Header) { h.FSize = 0 })},
		{"fsize huge", "out of range", mod(func(h *Header) { h.FSize = math.MaxUint64 })},
		{"fsize over int64", "out of range", mod(func(h *Header) { h.FSize = math.MaxInt64 - 100 })},
	}
	for _, c := range cases {
		_, err := parseHeader(c.b)
		if err == nil {
			t.Errorf("%s: accepted", c.name)
			continue
		}
		if !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v is not ErrCorrupt", c.name, err)
		}
		if !strings.Contains(err.Error(), c.msg) {
			t.Errorf("%s: message %q does not mention %q", c.name, err, c.msg)
		}
	}
}

func TestBlocksAndDataOffset(t *testing.T) {
	for _, c := range []struct {
		size   int64
		blocks uint64
		off    int64
	}{
		{-1, 0, HeaderSize},
		{0, 0, HeaderSize},
		{1, 1, HeaderSize + SectionBytes},
		{4095, 1, HeaderSize + SectionBytes},
		{4096, 1, HeaderSize + SectionBytes},
		{4097, 2, HeaderSize + SectionBytes},
		{16 << 20, 4096, HeaderSize + SectionBytes},         // one full section
		{16<<20 + 1, 4097, HeaderSize + 2*SectionBytes},     // the partial tail needs a second section
		{1 << 40, 1 << 28, HeaderSize + 65536*SectionBytes}, // 1 TiB: 65536 sections, a 2 GiB index
		{math.MaxInt64, 1 << 51, HeaderSize + (1<<39)*SectionBytes},
	} {
		if b := Blocks(c.size); b != c.blocks {
			t.Errorf("Blocks(%d) = %d, want %d", c.size, b, c.blocks)
		}
		if o := DataOffset(c.blocks); o != c.off {
			t.Errorf("DataOffset(%d) = %d, want %d", c.blocks, o, c.off)
		}
	}
}

func TestErrorsWrap(t *testing.T) {
	if !errors.Is(ErrFull, syscall.EFBIG) {
		t.Fatal("ErrFull does not wrap EFBIG")
	}
	e := full("cow file x max size exceeded (1/2)")
	if !errors.Is(e, ErrFull) || !errors.Is(e, syscall.EFBIG) || e.Error() != "cow file x max size exceeded (1/2)" {
		t.Fatalf("full error %q does not match", e)
	}
}

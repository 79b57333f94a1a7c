package cow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"syscall"
)

// Format constants. They are dattobd's (src/dattobd.h, src/cow_manager.h);
// docs/cow-format.md describes the layout they define.
const (
	// BlockSize is the tracking granularity and the size of a data slot.
	BlockSize = 4096
	// HeaderSize is the size of the header block at the start of the file.
	HeaderSize = 4096
	// Magic identifies a COW file (0x12A8).
	Magic = 4776
	// SectionEntries is the number of index entries in one section, the
	// unit in which the index is cached, read and written.
	SectionEntries = 4096
	// SectionBytes is the on-disk (and in-memory) size of one section.
	SectionBytes = SectionEntries * 8

	// FlagClean is set only by an orderly close; every open clears it.
	FlagClean = 1
	// FlagIndexOnly marks an incremental file: the data store was dropped.
	FlagIndexOnly = 2
	// FlagVmallocUpper is an in-memory allocator hint dattobd leaks to disk.
	// It means nothing to this implementation and is cleared on load.
	FlagVmallocUpper = 4

	// Version is the format version written to new files
	// (COW_VERSION_CHANGED_BLOCKS: the header carries nr_changed_blocks).
	Version = 1

	// DefaultCacheBytes is the index memory budget (-c) when none is given.
	// dattobd's is 300 MiB; ours is smaller so that a server at default
	// settings stays under 64 MiB whatever the device size (README). A
	// smaller cache costs only write-backs and re-reads of evicted sections.
	DefaultCacheBytes = 24 << 20
	// MinDataBytes is the smallest data store a default-sized file gets:
	// Options.FileSize = 0 means max(10% of the device, DataOffset+MinDataBytes).
	MinDataBytes = 1 << 20

	knownFlags = FlagClean | FlagIndexOnly | FlagVmallocUpper
	// minSlot is the lowest slot any valid file can have: the data store
	// starts after the header and at least one index section.
	minSlot = (HeaderSize + SectionBytes) / BlockSize
)

// Field offsets inside the header block (little-endian, see the format doc).
const (
	offMagic   = 0x00
	offFlags   = 0x04
	offFPos    = 0x08
	offFSize   = 0x10
	offSeqID   = 0x18
	offUUID    = 0x20
	offVersion = 0x30
	offNrChg   = 0x38
	headerUsed = 0x40
)

// ErrFull reports that the data store has no free slot. It wraps
// syscall.EFBIG, as dattobd reports it; the snapshot must fail closed.
var ErrFull error = &wrapErr{msg: "cow store full", target: syscall.EFBIG}

// ErrCorrupt reports a header or index that cannot be trusted.
var ErrCorrupt = errors.New("cow file corrupt")

// ErrNotClean reports a file whose header lacks FlagClean: it was not
// closed in an orderly way, so its index is untrusted (dattobd refuses it
// with "cow file not left in clean state").
var ErrNotClean = errors.New("cow file not left in clean state")

// ErrMode reports an operation that the file's mode does not allow, such
// as copying data into an index-only file or writing a read-only one.
var ErrMode = errors.New("operation not allowed in this cow file mode")

// ErrChangeList reports an index-only file (an incremental change list)
// opened as a snapshot. It matches ErrMode too.
var ErrChangeList error = &wrapErr{msg: "cow file is an incremental change list, not a snapshot", target: ErrMode}

// wrapErr is an error with its own one-line message that also matches a
// sentinel (errors.Is), so messages do not end in ": cow file corrupt".
type wrapErr struct {
	msg    string
	target error
}

func (e *wrapErr) Error() string { return e.msg }
func (e *wrapErr) Unwrap() error { return e.target }

func corrupt(format string, a ...any) error {
	return &wrapErr{msg: fmt.Sprintf(format, a...), target: ErrCorrupt}
}

func full(format string, a ...any) error {
	return &wrapErr{msg: fmt.Sprintf(format, a...), target: ErrFull}
}

func modeErr(format string, a ...any) error {
	return &wrapErr{msg: fmt.Sprintf(format, a...), target: ErrMode}
}

// Header is the COW file header (struct cow_header in dattobd).
type Header struct {
	Flags           uint32   // FlagClean | FlagIndexOnly (FlagVmallocUpper is cleared on parse)
	FPos            uint64   // next free data slot, in BlockSize units from the start of the file
	FSize           uint64   // allocated (allowed) file size in bytes
	SeqID           uint64   // snapshot sequence number: 1 for a new series, +1 per transition-to-snapshot
	UUID            [16]byte // snapshot series identifier
	Version         uint64   // 0 or 1
	NrChangedBlocks uint64   // index entries that went from 0 to non-zero (version 1 only)
}

// MarshalBinary encodes h as exactly HeaderSize bytes, little-endian, with
// the reserved space (0x40..0xFFF) zero. It never fails.
func (h Header) MarshalBinary() ([]byte, error) {
	b := make([]byte, HeaderSize)
	le := binary.LittleEndian
	le.PutUint32(b[offMagic:], Magic)
	le.PutUint32(b[offFlags:], h.Flags)
	le.PutUint64(b[offFPos:], h.FPos)
	le.PutUint64(b[offFSize:], h.FSize)
	le.PutUint64(b[offSeqID:], h.SeqID)
	copy(b[offUUID:offUUID+16], h.UUID[:])
	le.PutUint64(b[offVersion:], h.Version)
	le.PutUint64(b[offNrChg:], h.NrChangedBlocks)
	return b, nil
}

// parseHeader decodes and validates a header block. b must be exactly
// HeaderSize bytes. It checks the magic, the version (0 or 1), that no
// unknown flag is set, and that fpos and fsize are plausible on their own
// (checks against a device size are Open's). FlagVmallocUpper is accepted
// and cleared. For version 0, which has no nr_changed_blocks field, the
// count reads as 0. The reserved space is ignored. It never panics.
func parseHeader(b []byte) (Header, error) {
	if len(b) != HeaderSize {
		return Header{}, corrupt("cow header is %d bytes, want %d", len(b), HeaderSize)
	}
	le := binary.LittleEndian
	if m := le.Uint32(b[offMagic:]); m != Magic {
		return Header{}, corrupt("bad magic number %#x (want %#x): not a cow file", m, Magic)
	}
	h := Header{
		Flags:           le.Uint32(b[offFlags:]),
		FPos:            le.Uint64(b[offFPos:]),
		FSize:           le.Uint64(b[offFSize:]),
		SeqID:           le.Uint64(b[offSeqID:]),
		Version:         le.Uint64(b[offVersion:]),
		NrChangedBlocks: le.Uint64(b[offNrChg:]),
	}
	copy(h.UUID[:], b[offUUID:offUUID+16])
	if h.Version > Version {
		return Header{}, corrupt("unknown cow format version %d (this program knows 0 and %d)", h.Version, Version)
	}
	if h.Version == 0 {
		h.NrChangedBlocks = 0
	}
	if u := h.Flags &^ knownFlags; u != 0 {
		return Header{}, corrupt("unknown cow header flags %#x", u)
	}
	h.Flags &^= FlagVmallocUpper
	if h.FSize > math.MaxInt64-BlockSize {
		return Header{}, corrupt("cow header fsize %d is out of range", h.FSize)
	}
	if h.FSize < HeaderSize+SectionBytes {
		return Header{}, corrupt("cow header fsize %d is smaller than a header and one index section (%d)", h.FSize, HeaderSize+SectionBytes)
	}
	if h.FPos < minSlot {
		return Header{}, corrupt("cow header fpos %d is below the first possible data slot %d", h.FPos, minSlot)
	}
	// dattobd refuses to append once fpos*4096 >= fsize, so after the last
	// append fpos is at most ceil(fsize/4096).
	if h.FPos > (h.FSize+BlockSize-1)/BlockSize {
		return Header{}, corrupt("cow header fpos %d (byte %d) is beyond fsize %d", h.FPos, h.FPos*BlockSize, h.FSize)
	}
	return h, nil
}

// Blocks is the number of index entries for a device of deviceSize bytes:
// deviceSize/BlockSize rounded UP, so that a partial last block is tracked
// too (dattobd rounds down and leaves such a tail unprotected; see the
// format doc for the compatibility consequence). Negative sizes give 0.
func Blocks(deviceSize int64) uint64 {
	if deviceSize <= 0 {
		return 0
	}
	return (uint64(deviceSize) + BlockSize - 1) / BlockSize
}

// DataOffset is the byte offset of the data store for an index of blocks
// entries: the header plus whole sections, HeaderSize +
// ceil(blocks/SectionEntries)*SectionBytes.
func DataOffset(blocks uint64) int64 {
	return HeaderSize + int64(sections(blocks))*SectionBytes
}

func sections(blocks uint64) uint64 {
	return (blocks + SectionEntries - 1) / SectionEntries
}

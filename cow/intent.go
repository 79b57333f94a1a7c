package cow

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

// The write-intent record makes incremental tracking survive a crash.
//
// The index in memory is written back lazily, so after a crash (kill -9,
// power cut) the on-disk index can miss recent marks. Before a write into
// a region of the device is let through, the region is recorded in the
// header's reserved space and fsynced (group commit: every waiting writer
// shares one fsync); a periodic Checkpoint writes the index back and
// clears the regions that saw no new mark since. After a crash, Open
// (ReloadIncremental) marks every block of every recorded region: the
// result is a superset of the blocks written, never missing one. Regions are coarse (at least
// 4 MiB, and the regions after a new one are recorded with it) so that
// only the first write into a stretch of the device pays for an fsync.
//
// The record lives only in files that are open: a clean close zeroes it,
// so a cleanly closed file is byte-for-byte what dattobd writes.
const (
	intentOff      = 0x400              // record start in the header block
	intentMagic    = 0x544e45544e494244 // "DBDINTNT", little-endian
	intentBitsOff  = 0x20               // bitmap start inside the record
	intentMaxBits  = (HeaderSize - intentOff - intentBitsOff) * 8
	minRegionShift = 22 // 4 MiB
	// readAhead is how many regions after a newly recorded one are
	// recorded with it: a sequential writer then pays one commit per
	// (1+readAhead) regions, at the price of a larger superset after a
	// crash (bounded by the checkpoint interval).
	readAhead = 3
)

// intentState is the write-intent bookkeeping of a File, guarded by
// File.mu except where noted.
type intentState struct {
	enabled bool
	shift   uint // region size is 1 << shift bytes
	nbits   uint64
	durable []byte // regions recorded on disk: a write into one may proceed
	dirty   []byte // regions marked since the last checkpoint began
}

// regionShift is the region size for a device of blocks 4 KiB blocks: the
// smallest power of two of at least 4 MiB that fits the record.
func regionShift(blocks uint64) uint {
	shift := uint(minRegionShift)
	for (blocks*BlockSize+(1<<shift)-1)>>shift > intentMaxBits {
		shift++
	}
	return shift
}

func (s *intentState) init(blocks uint64) {
	s.shift = regionShift(blocks)
	s.nbits = (blocks*BlockSize + (1 << s.shift) - 1) >> s.shift
	s.durable = make([]byte, (s.nbits+7)/8)
	s.dirty = make([]byte, (s.nbits+7)/8)
}

func (s *intentState) regions(first, last uint64) (lo, hi uint64) {
	return first * BlockSize >> s.shift, ((last*BlockSize - 1) >> s.shift) + 1
}

func testBit(b []byte, i uint64) bool { return b[i/8]&(1<<(i%8)) != 0 }
func setBit(b []byte, i uint64)       { b[i/8] |= 1 << (i % 8) }

// put writes the record for the regions in set into hdr (a header block).
func (s *intentState) put(hdr []byte, set []byte) {
	r := hdr[intentOff:]
	clear(r)
	le := binary.LittleEndian
	le.PutUint64(r[0:], intentMagic)
	le.PutUint32(r[8:], uint32(s.shift))
	le.PutUint64(r[16:], s.nbits)
	copy(r[intentBitsOff:], set)
	le.PutUint32(r[12:], crc32.Checksum(r, castagnoli))
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// parseIntent decodes the record of a header block for a device of blocks
// 4 KiB blocks. ok is false when there is no record; a record that is
// present but does not check out is an error.
func parseIntent(hdr []byte, blocks uint64) (s intentState, ok bool, err error) {
	r := append([]byte(nil), hdr[intentOff:]...)
	le := binary.LittleEndian
	if le.Uint64(r[0:]) != intentMagic {
		return s, false, nil
	}
	sum := le.Uint32(r[12:])
	le.PutUint32(r[12:], 0)
	if crc32.Checksum(r, castagnoli) != sum {
		return s, false, corrupt("write-intent record fails its checksum (torn header write?)")
	}
	s.init(blocks)
	if shift, n := uint(le.Uint32(r[8:])), le.Uint64(r[16:]); shift != s.shift || n != s.nbits {
		return s, false, corrupt("write-intent record describes %d regions of 2^%d bytes, not %d of 2^%d (a file of another device?)",
			n, shift, s.nbits, s.shift)
	}
	copy(s.durable, r[intentBitsOff:])
	return s, true, nil
}

// headerBytes encodes the header block: the header fields, and the intent
// record with the durable regions when intent logging is on. Caller holds mu.
func (f *File) headerBytes() []byte {
	if f.intent.enabled {
		return f.headerWith(f.intent.durable)
	}
	return f.headerWith(nil)
}

// headerWith encodes the header block with the intent record naming the
// regions in set (none when set is nil) and the failure record, if any.
// Every header write goes through it, so no write drops either record.
// Caller holds mu.
func (f *File) headerWith(set []byte) []byte {
	b, _ := f.hdr.MarshalBinary()
	if set != nil {
		f.intent.put(b, set)
	}
	if f.failure != nil {
		putFailure(b, f.failure)
	}
	return b
}

// EnableIntent turns on write-intent logging for an index-only file open
// for writing (incremental mode): it writes back the index and a header
// with an empty record and fsyncs, so every mark made so far is on disk,
// and from then on MarkRange reports when a write must wait for
// CommitIntent. Calling it again is harmless.
func (f *File) EnableIntent() error {
	f.opMu.Lock()
	defer f.opMu.Unlock()
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.writable(); err != nil {
		return err
	}
	if f.hdr.Flags&FlagIndexOnly == 0 {
		return modeErr("cow file %s still has its data store: write-intent logging is for incremental files", f.path)
	}
	if f.intent.enabled {
		return nil
	}
	f.intent.init(f.blocks)
	f.intent.enabled = true
	if err := f.flushSections(); err != nil {
		f.intent.enabled = false
		return fmt.Errorf("cow file %s: write index: %w", f.path, unwrapPath(err))
	}
	if err := f.writeHeaderSync(); err != nil {
		f.intent.enabled = false
		return err
	}
	return nil
}

// writeHeaderSync writes the header block and fsyncs the file. Caller
// holds mu.
func (f *File) writeHeaderSync() error { return f.writeAndSync(f.headerBytes()) }

// MarkRange records blocks [first, last) as changed (entries 0 become 1
// and are counted) and reports whether a write to them must wait for
// CommitIntent: true when write-intent logging is on and a region they lie
// in is not yet recorded on disk.
func (f *File) MarkRange(first, last uint64) (mustCommit bool, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.writable(); err != nil {
		return false, err
	}
	if last <= first {
		return false, nil
	}
	if err := f.usable(last - 1); err != nil {
		return false, err
	}
	if _, err := f.markBlocks(first, last); err != nil {
		return false, err
	}
	if !f.intent.enabled {
		return false, nil
	}
	lo, hi := f.intent.regions(first, last)
	for r := lo; r < hi; r++ {
		setBit(f.intent.dirty, r)
		if !testBit(f.intent.durable, r) {
			mustCommit = true
		}
	}
	return mustCommit, nil
}

// markBlocks sets the entry of every unchanged block in [first, last) to
// 1 (changed, no data kept), with one section lookup per section, and
// returns how many it set. Caller holds mu and has checked the range.
func (f *File) markBlocks(first, last uint64) (uint64, error) {
	cur := entryCursor{f: f}
	var marked uint64
	for b := first; b < last; b++ {
		e, err := cur.entry(b)
		if err != nil {
			return marked, err
		}
		if e == 0 {
			if _, err := cur.setEntry(b, 1); err != nil {
				return marked, err
			}
			f.countChange(0)
			marked++
		}
	}
	return marked, nil
}

// IntentAll records every region of the device on disk as possibly
// written, before it returns. A crash from then on recovers the file with
// every block marked changed: a full copy, never a miss. It guards a
// stretch in which writes may reach the device without being marked here
// (the instant a snapshot into another file is being taken); the next
// checkpoint or a clean close trims the record again.
func (f *File) IntentAll() error {
	f.opMu.Lock()
	defer f.opMu.Unlock()
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.writable(); err != nil {
		return err
	}
	if !f.intent.enabled {
		return modeErr("cow file %s has no write-intent record", f.path)
	}
	for r := uint64(0); r < f.intent.nbits; r++ {
		setBit(f.intent.durable, r)
		setBit(f.intent.dirty, r)
	}
	return f.writeHeaderSync()
}

// CommitIntent returns once every region marked so far is recorded on
// disk. Concurrent callers share commits: one writes the header and
// fsyncs, the others find their regions recorded when it is done.
func (f *File) CommitIntent() error {
	f.opMu.Lock() // one header writer at a time: commits batch behind it
	defer f.opMu.Unlock()
	f.mu.Lock()
	if err := f.writable(); err != nil {
		f.mu.Unlock()
		return err
	}
	if !f.intent.enabled || covered(f.intent.dirty, f.intent.durable) {
		f.mu.Unlock()
		return nil
	}
	target := orBits(f.intent.durable, f.intent.dirty)
	for r := uint64(0); r < f.intent.nbits; r++ {
		if testBit(f.intent.dirty, r) && !testBit(f.intent.durable, r) {
			for k := r + 1; k <= r+readAhead && k < f.intent.nbits; k++ {
				setBit(target, k)
			}
		}
	}
	b := f.headerWith(target)
	f.mu.Unlock()
	err := f.writeAndSync(b)
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.intent.durable = orBits(f.intent.durable, target)
	f.mu.Unlock()
	return nil
}

// Checkpoint writes the index back and fsyncs it, then clears from the
// record every region that saw no mark since the checkpoint began: their
// marks are on disk now, so a crash no longer needs the coarse regions.
// Without write-intent logging it is Sync.
func (f *File) Checkpoint() error {
	f.opMu.Lock()
	defer f.opMu.Unlock()
	f.mu.Lock()
	if err := f.writable(); err != nil {
		f.mu.Unlock()
		return err
	}
	clear(f.intent.dirty)
	err := f.flushSections()
	hdr := f.headerBytes()
	f.mu.Unlock()
	if err != nil {
		return fmt.Errorf("cow file %s: write index: %w", f.path, unwrapPath(err))
	}
	if err := f.writeAndSync(hdr); err != nil {
		return err
	}
	if !f.intent.enabled {
		return nil
	}
	// Every mark made before the dirty set was cleared is on disk now. The
	// regions marked since stay recorded; while the smaller record is
	// being written, only regions in both the old and the new one count
	// as durable.
	f.mu.Lock()
	target := append([]byte(nil), f.intent.dirty...)
	f.intent.durable = andBits(f.intent.durable, target)
	b := f.headerWith(target)
	f.mu.Unlock()
	if err := f.writeAndSync(b); err != nil {
		return err
	}
	f.mu.Lock()
	f.intent.durable = target
	f.mu.Unlock()
	return nil
}

func (f *File) writeAndSync(hdr []byte) error {
	if _, err := f.s.WriteAt(hdr, 0); err != nil {
		return fmt.Errorf("cow file %s: write header: %w", f.path, unwrapPath(err))
	}
	if err := f.s.Sync(); err != nil {
		return fmt.Errorf("cow file %s: fsync: %w", f.path, unwrapPath(err))
	}
	return nil
}

func covered(sub, super []byte) bool {
	for i := range sub {
		if sub[i]&^super[i] != 0 {
			return false
		}
	}
	return true
}

func orBits(a, b []byte) []byte {
	out := make([]byte, len(a))
	for i := range a {
		out[i] = a[i] | b[i]
	}
	return out
}

func andBits(a, b []byte) []byte {
	out := make([]byte, len(a))
	for i := range a {
		out[i] = a[i] & b[i]
	}
	return out
}

package cow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/dbdublk/dbdublk/internal/dio"
)

// CopyOnWriteRange preserves the pre-snapshot data of the blocks
// first..first+len(old)/BlockSize-1, whose current contents old holds
// (len(old) a multiple of BlockSize), first write wins: the blocks whose
// entry is 0 get consecutive slots at fpos and their data is written with
// one I/O, and only then are their entries set, so a 1 MiB first write
// costs one write to the store instead of 256. Blocks already preserved
// are skipped; blocks another call is copying are waited for, so
// concurrent calls copy each block once. The data I/O runs without the
// file's lock, so copies of different blocks proceed in parallel. It
// returns how many blocks it copied. When the store has too few free slots
// for the blocks it would copy, it returns ErrFull (wrapping EFBIG) and
// changes nothing. If the write fails, its blocks stay unchanged (entry 0)
// and the error is returned. If a concurrent copy it waited for failed, it
// reports an error.
func (f *File) CopyOnWriteRange(first uint64, old []byte) (int, error) {
	if len(old)%BlockSize != 0 {
		return 0, fmt.Errorf("cow file %s: CopyOnWriteRange needs whole blocks, got %d bytes", f.path, len(old))
	}
	n := uint64(len(old) / BlockSize)
	if n == 0 {
		return 0, nil
	}
	f.mu.Lock()
	r, err := f.reserve(first, n, true)
	f.mu.Unlock()
	if err != nil {
		return 0, err
	}
	k := uint64(len(r.mine))
	if k > 0 {
		var err error
		data := gather(old, first, r.mine)
		if _, werr := f.writeData(data, int64(r.slot)*BlockSize); werr != nil {
			err = fmt.Errorf("cow file %s: write data slots %d..%d: %w", f.path, r.slot, r.slot+k-1, unwrapPath(werr))
		}
		if err = f.finishRange(r.mine, r.slot, r.ch, err); err != nil {
			return 0, err
		}
	}
	for i, w := range r.waits {
		<-w
		e, err := f.Lookup(r.busy[i])
		if err != nil {
			return int(k), err
		}
		if e == 0 {
			return int(k), fmt.Errorf("cow file %s: a concurrent copy of block %d failed", f.path, r.busy[i])
		}
	}
	return int(k), nil
}

// reservation is what reserve set aside for one range copy: the blocks it
// copies (mine, ascending) into consecutive slots from slot, marked in
// flight under ch; and the blocks another copy holds, with what to wait
// on for them.
type reservation struct {
	mine  []uint64
	slot  uint64
	ch    chan struct{}
	busy  []uint64
	waits []chan struct{}
}

// reserve finds, among blocks first..first+n-1, those not yet preserved
// and gives them slots, marking them in flight. A block another copy has
// in flight is busy: with wait it is listed for the caller to wait on,
// without it reserve reserves nothing and returns ErrCopyBusy. A block in
// flight counts as busy even once its entry is set, until its copy
// finishes (see RangeCopy). Caller holds mu.
func (f *File) reserve(first, n uint64, wait bool) (reservation, error) {
	var r reservation
	if err := f.writable(); err != nil {
		return r, err
	}
	if f.hdr.Flags&FlagIndexOnly != 0 {
		return r, modeErr("cow file %s is index-only: it has no data store to copy block %d into", f.path, first)
	}
	if err := f.usable(first + n - 1); err != nil {
		return r, err
	}
	f.overlap = f.inflight.overlapping(first, first+n, f.overlap)
	busy := flightCursor{runs: f.overlap}
	entries := entryCursor{f: f}
	for b := first; b < first+n; b++ {
		if ch, ok := busy.at(b); ok {
			if !wait {
				return reservation{}, ErrCopyBusy
			}
			r.busy = append(r.busy, b)
			r.waits = append(r.waits, ch)
			continue
		}
		e, err := entries.entry(b)
		if err != nil {
			return reservation{}, err
		}
		if e == 0 {
			if r.mine == nil {
				r.mine = make([]uint64, 0, first+n-b)
			}
			r.mine = append(r.mine, b)
		}
	}
	k := uint64(len(r.mine))
	if k == 0 {
		return r, nil
	}
	if f.hdr.FPos+k > f.hdr.FSize/BlockSize {
		return reservation{}, full("cow file %s max size exceeded (%d+%d/%d)", f.path, f.hdr.FPos*BlockSize, k*BlockSize, f.hdr.FSize)
	}
	r.slot = f.hdr.FPos
	f.hdr.FPos += k
	r.ch = make(chan struct{})
	f.inflight.add(r.mine, r.ch)
	return r, nil
}

// ErrCopyBusy is BeginRange's error when another copy has a block of the
// range in flight: nothing was reserved; CopyOnWriteRange waits for it.
var ErrCopyBusy = errors.New("blocks of the range are being copied by another call")

// RangeCopy is a range copy whose I/O the caller runs itself, without
// blocking (on a ublk queue's ring), in the order CopyOnWriteRange keeps:
//
//  1. BeginRange reserves slots for the blocks not yet preserved;
//  2. the caller reads their old data and writes it at DataTarget;
//  3. Publish sets their index entries and returns the index bytes to
//     write through, so that a server that dies keeps them (as
//     CopyOnWriteRange does);
//  4. once those writes are done, Finish releases the blocks.
//
// Until Finish the blocks stay in flight: other copies wait for them and
// AllPreserved does not report them, so no write of them reaches the
// device before their entries are written through. Finish must always be
// called, with the first failure if there was one.
type RangeCopy struct {
	f         *File
	first     uint64
	r         reservation
	published bool
	entries   []byte // the index bytes Publish returns, back to back
	index     []IndexWrite
}

// IndexWrite is one write of index entries through the file: Buf at byte
// Off of descriptor FD.
type IndexWrite struct {
	FD  int
	Off int64
	Buf []byte
}

// Stageable reports whether the file's copies can run as a RangeCopy: its
// storage must write index entries byte for byte through a descriptor.
// A COW file on the device itself cannot (its O_DIRECT index writes read,
// modify and write whole blocks, which concurrent copies would undo).
func (f *File) Stageable() bool {
	_, ok := f.s.(*fileStorage)
	return ok && !f.readOnly
}

// BeginRange starts a RangeCopy of blocks first..first+n-1. It returns
// ErrCopyBusy when another copy has one of them in flight, ErrFull when
// the store has too few free slots, and refuses a file that is not
// Stageable; in all those cases nothing is reserved. A copy with no
// Blocks (all preserved) needs only Finish.
func (f *File) BeginRange(first, n uint64) (*RangeCopy, error) {
	if !f.Stageable() {
		return nil, modeErr("cow file %s: its copies cannot run outside it", f.path)
	}
	if n == 0 {
		return &RangeCopy{f: f, first: first}, nil
	}
	f.mu.Lock()
	r, err := f.reserve(first, n, false)
	f.mu.Unlock()
	if err != nil {
		return nil, err
	}
	return &RangeCopy{f: f, first: first, r: r}, nil
}

// Blocks are the blocks this copy preserves, ascending: their old data,
// back to back, is what goes to DataTarget.
func (c *RangeCopy) Blocks() []uint64 { return c.r.mine }

// DataTarget says where the copied data goes: len(Blocks())*BlockSize
// bytes at byte off of descriptor fd. Large copies go to the file's
// O_DIRECT descriptor (their buffer must then be aligned for it), small
// ones through the page cache, as CopyOnWriteRange writes them.
func (c *RangeCopy) DataTarget() (fd int, off int64) {
	s := c.f.s.(*fileStorage)
	off = int64(c.r.slot) * BlockSize
	if s.direct != nil && len(c.r.mine)*BlockSize >= directMin {
		return int(s.direct.Fd()), off
	}
	return int(s.f.Fd()), off
}

// Publish sets the entries of the copied blocks, whose data is written,
// and returns the writes that put them through to the file (one per run
// of adjacent blocks in one index section). The returned buffers belong to
// c until Finish.
func (c *RangeCopy) Publish() ([]IndexWrite, error) {
	f := c.f
	f.mu.Lock()
	defer f.mu.Unlock()
	c.published = true
	c.entries = slices.Grow(c.entries[:0], 8*len(c.r.mine))[:8*len(c.r.mine)]
	c.index = c.index[:0]
	fd := int(f.s.(*fileStorage).f.Fd())
	blocks := c.r.mine
	set := entryCursor{f: f}
	for i := 0; i < len(blocks); {
		j := i
		for ; j < len(blocks) && (j == i || blocks[j] == blocks[j-1]+1 && blocks[j]/SectionEntries == blocks[i]/SectionEntries); j++ {
			old, err := set.setEntry(blocks[j], c.r.slot+uint64(j))
			if err != nil {
				// Entries set stay valid (their data is written); the
				// rest stay 0 and their slots are not reused.
				return nil, err
			}
			f.countChange(old)
			binary.LittleEndian.PutUint64(c.entries[8*j:], c.r.slot+uint64(j))
		}
		c.index = append(c.index, IndexWrite{FD: fd, Off: sectionOffset(blocks[i]/SectionEntries) + int64(blocks[i]%SectionEntries)*8, Buf: c.entries[8*i : 8*j]})
		i = j
	}
	return c.index, nil
}

// Finish ends the copy: err is the first failure of its I/O, nil when the
// data and the index writes all completed. A copy that failed before
// Publish gives its slots back when nothing was reserved after them; its
// blocks stay unpreserved. Either way its blocks are released to the
// copies waiting for them. Finish returns err, described.
func (c *RangeCopy) Finish(err error) error {
	if len(c.r.mine) == 0 {
		return err
	}
	k := uint64(len(c.r.mine))
	if err != nil {
		err = fmt.Errorf("cow file %s: copy of blocks %d..%d to slots %d..%d: %w", c.f.path, c.r.mine[0], c.r.mine[k-1], c.r.slot, c.r.slot+k-1, err)
	}
	f := c.f
	f.mu.Lock()
	defer f.mu.Unlock()
	if err != nil && !c.published && f.hdr.FPos == c.r.slot+k {
		f.hdr.FPos = c.r.slot
	}
	f.release(c.r.ch)
	return err
}

// release takes blocks out of flight and wakes their waiters. Caller holds
// mu.
func (f *File) release(ch chan struct{}) {
	f.inflight.remove(ch)
	close(ch)
	if f.inflight.empty() {
		f.idle.Broadcast()
	}
}

// writeData writes whole data slots, through the storage's bulk path
// where it has one.
func (f *File) writeData(data []byte, off int64) (int, error) {
	if w, ok := f.s.(bulkWriter); ok {
		return w.writeData(data, off)
	}
	return f.s.WriteAt(data, off)
}

// gather returns the data of blocks (a sorted subset of the blocks old
// starts at first) back to back: old itself when they are all of it.
func gather(old []byte, first uint64, blocks []uint64) []byte {
	if len(blocks)*BlockSize == len(old) {
		return old
	}
	lo := (blocks[0] - first) * BlockSize
	if blocks[len(blocks)-1]-blocks[0]+1 == uint64(len(blocks)) { // one contiguous run
		return old[lo : lo+uint64(len(blocks))*BlockSize]
	}
	out := make([]byte, 0, len(blocks)*BlockSize)
	for _, b := range blocks {
		o := (b - first) * BlockSize
		out = append(out, old[o:o+BlockSize]...)
	}
	return out
}

// finishRange publishes a range copy (data first, then the entries) or
// undoes its reservation, and wakes the blocks' waiters.
func (f *File) finishRange(blocks []uint64, slot uint64, ch chan struct{}, err error) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := uint64(len(blocks))
	if err == nil {
		set := entryCursor{f: f}
		for i, b := range blocks {
			old, serr := set.setEntry(b, slot+uint64(i))
			if serr != nil {
				err = serr
				// Entries already set stay valid: their data is written.
				// The rest stay 0; their slots are simply not reused.
				break
			}
			f.countChange(old) // old is 1 if MarkRange ran meanwhile: counted already
		}
		if err == nil {
			err = f.writeEntriesThrough(blocks)
		}
	} else if f.hdr.FPos == slot+k {
		f.hdr.FPos = slot // nothing was allocated after us: give the slots back
	}
	f.release(ch)
	return err
}

// AllPreserved reports whether every block in [first, last) has its data
// in the store, taking the file's lock once for the whole range.
func (f *File) AllPreserved(first, last uint64) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if last <= first {
		return true, nil
	}
	if err := f.usable(last - 1); err != nil {
		return false, err
	}
	if f.inflight.meets(first, last) {
		return false, nil // their entries may not be written through yet
	}
	entries := entryCursor{f: f}
	for b := first; b < last; b++ {
		e, err := entries.entry(b)
		if err != nil {
			return false, err
		}
		if e <= 1 { // 1 marks a change whose data was not kept
			return false, nil
		}
	}
	return true, nil
}

// rebuildFromIndex recomputes fpos and nr_changed_blocks from the index on
// disk (ResumeSnapshot), checking that every entry names a data slot.
// Caller is open, before the file is shared.
func (f *File) rebuildFromIndex() error {
	lo, hi := f.firstSlot(), f.hdr.FSize/BlockSize
	maxSlot, count := uint64(0), uint64(0)
	buf := make([]byte, 8*SectionBytes)
	for b := uint64(0); b < f.blocks; {
		n := min(uint64(len(buf)/8), f.blocks-b)
		chunk := buf[:n*8]
		if _, err := f.s.ReadAt(chunk, HeaderSize+int64(b)*8); err != nil {
			return fmt.Errorf("cow file %s: read index: %w", f.path, unwrapPath(err))
		}
		for i := uint64(0); i < n; i++ {
			e := binary.LittleEndian.Uint64(chunk[i*8:])
			if e == 0 {
				continue
			}
			count++
			if e == 1 {
				continue
			}
			if e < lo || e >= hi {
				return corrupt("cow file %s: index entry of block %d is %d, outside the data slots %d..%d", f.path, b+i, e, lo, hi)
			}
			maxSlot = max(maxSlot, e)
		}
		b += n
	}
	if maxSlot >= f.hdr.FPos {
		f.hdr.FPos = maxSlot + 1
	}
	if f.hdr.Version >= Version {
		f.hdr.NrChangedBlocks = count
	}
	return nil
}

// writeEntriesThrough writes the index entries of blocks (ascending) to
// the file at once, one write per run of adjacent blocks, so that a
// server that dies keeps them in the page cache (ResumeSnapshot). Caller
// holds mu; the entries are in cached sections.
func (f *File) writeEntriesThrough(blocks []uint64) error {
	for i := 0; i < len(blocks); {
		j := i + 1
		for j < len(blocks) && blocks[j] == blocks[j-1]+1 && blocks[j]/SectionEntries == blocks[i]/SectionEntries {
			j++
		}
		s, err := f.section(blocks[i] / SectionEntries)
		if err != nil {
			return err
		}
		lo := (blocks[i] % SectionEntries) * 8
		hi := (blocks[j-1]%SectionEntries)*8 + 8
		p := s.b[lo:hi]
		if _, ok := f.s.(*deviceStorage); ok {
			// The device is written in whole blocks: write the blocks of
			// the section that hold the entries, from memory, where the
			// section is exact (under mu, as every index write), rather
			// than have the storage read them back to modify them.
			lo, hi = lo/BlockSize*BlockSize, (hi+BlockSize-1)/BlockSize*BlockSize
			if f.indexScratch == nil {
				f.indexScratch = dio.AlignedBuf(SectionBytes)
			}
			p = f.indexScratch[:hi-lo]
			copy(p, s.b[lo:hi])
		}
		if _, err := f.s.WriteAt(p, sectionOffset(s.idx)+int64(lo)); err != nil {
			return fmt.Errorf("cow file %s: write index entries: %w", f.path, unwrapPath(err))
		}
		i = j
	}
	return nil
}

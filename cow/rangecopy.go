package cow

import (
	"encoding/binary"
	"fmt"
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
	if err := f.writable(); err != nil {
		f.mu.Unlock()
		return 0, err
	}
	if f.hdr.Flags&FlagIndexOnly != 0 {
		f.mu.Unlock()
		return 0, modeErr("cow file %s is index-only: it has no data store to copy block %d into", f.path, first)
	}
	if err := f.usable(first + n - 1); err != nil {
		f.mu.Unlock()
		return 0, err
	}
	var mine []uint64         // blocks this call copies, in order
	var busy []uint64         // blocks another call is copying
	var waits []chan struct{} // and what to wait on for them
	for b := first; b < first+n; b++ {
		e, err := f.entry(b)
		if err != nil {
			f.mu.Unlock()
			return 0, err
		}
		if e != 0 {
			continue
		}
		if ch, ok := f.inflight[b]; ok {
			busy = append(busy, b)
			waits = append(waits, ch)
			continue
		}
		mine = append(mine, b)
	}
	k := uint64(len(mine))
	var slot uint64
	var ch chan struct{}
	if k > 0 {
		if f.hdr.FPos+k > f.hdr.FSize/BlockSize {
			err := full("cow file %s max size exceeded (%d+%d/%d)", f.path, f.hdr.FPos*BlockSize, k*BlockSize, f.hdr.FSize)
			f.mu.Unlock()
			return 0, err
		}
		slot = f.hdr.FPos
		f.hdr.FPos += k
		ch = make(chan struct{})
		for _, b := range mine {
			f.inflight[b] = ch
		}
	}
	f.mu.Unlock()

	if k > 0 {
		var err error
		data := gather(old, first, mine)
		if _, werr := f.writeData(data, int64(slot)*BlockSize); werr != nil {
			err = fmt.Errorf("cow file %s: write data slots %d..%d: %w", f.path, slot, slot+k-1, unwrapPath(werr))
		}
		if err = f.finishRange(mine, slot, ch, err); err != nil {
			return 0, err
		}
	}
	for i, w := range waits {
		<-w
		e, err := f.Lookup(busy[i])
		if err != nil {
			return int(k), err
		}
		if e == 0 {
			return int(k), fmt.Errorf("cow file %s: a concurrent copy of block %d failed", f.path, busy[i])
		}
	}
	return int(k), nil
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
		for i, b := range blocks {
			old, serr := f.setEntry(b, slot+uint64(i))
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
	for _, b := range blocks {
		delete(f.inflight, b)
	}
	close(ch)
	if len(f.inflight) == 0 {
		f.idle.Broadcast()
	}
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
	for b := first; b < last; b++ {
		e, err := f.entry(b)
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
		if _, err := f.s.WriteAt(s.b[lo:hi], sectionOffset(s.idx)+int64(lo)); err != nil {
			return fmt.Errorf("cow file %s: write index entries: %w", f.path, unwrapPath(err))
		}
		i = j
	}
	return nil
}

package cow

import (
	"encoding/binary"
	"errors"
	"io"
	"math"
	"slices"
)

// section is one resident index section: 4096 little-endian u64 entries,
// kept in the on-disk byte order so that loading and writing back are
// plain copies. Only resident sections exist in memory; nothing is kept
// per section of the device, so memory does not grow with device size.
type section struct {
	idx        uint64
	dirty      bool
	prev, next *section // LRU list; head.next is the most recently used
	b          [SectionBytes]byte
}

// indexCache holds at most limit sections, evicting the least recently
// used one (after writing it back if dirty) to make room. All of it is
// guarded by File.mu.
type indexCache struct {
	m     map[uint64]*section
	head  section // sentinel of the LRU ring (its buffer is never used)
	limit int
}

func (c *indexCache) init(limit int) {
	c.m = make(map[uint64]*section)
	c.head.prev, c.head.next = &c.head, &c.head
	c.limit = limit
}

func (c *indexCache) unlink(s *section) {
	s.prev.next, s.next.prev = s.next, s.prev
	s.prev, s.next = nil, nil
}

func (c *indexCache) pushFront(s *section) {
	s.prev, s.next = &c.head, c.head.next
	c.head.next.prev = s
	c.head.next = s
}

// limitSections converts a byte budget into a section count (at least 1).
func limitSections(bytes int64) int {
	if bytes <= 0 {
		bytes = DefaultCacheBytes
	}
	n := bytes / SectionBytes
	if n < 1 {
		n = 1
	}
	if n > math.MaxInt32 {
		n = math.MaxInt32
	}
	return int(n)
}

func sectionOffset(idx uint64) int64 { return HeaderSize + int64(idx)*SectionBytes }

// section returns the resident section idx, loading it (and evicting the
// least recently used section first if the cache is full). Caller holds mu.
func (f *File) section(idx uint64) (*section, error) {
	c := &f.cache
	if s, ok := c.m[idx]; ok {
		if c.head.next != s {
			c.unlink(s)
			c.pushFront(s)
		}
		return s, nil
	}
	var s *section
	for len(c.m) >= c.limit {
		victim := c.head.prev
		if err := f.writeSection(victim); err != nil {
			return nil, err
		}
		c.unlink(victim)
		delete(c.m, victim.idx)
		s = victim // reuse its buffer
	}
	if s == nil {
		s = new(section)
	}
	s.idx, s.dirty = idx, false
	if err := f.readSection(s); err != nil {
		return nil, err
	}
	c.m[idx] = s
	c.pushFront(s)
	return s, nil
}

func (f *File) readSection(s *section) error {
	n, err := f.s.ReadAt(s.b[:], sectionOffset(s.idx))
	if n == len(s.b) {
		return nil
	}
	if errors.Is(err, io.EOF) {
		return corrupt("cow file %s is truncated: index section %d (bytes %d..%d) is past its end",
			f.path, s.idx, sectionOffset(s.idx), sectionOffset(s.idx)+SectionBytes)
	}
	return err
}

// writeSection writes s back if it is dirty. Caller holds mu.
func (f *File) writeSection(s *section) error {
	if !s.dirty {
		return nil
	}
	if _, err := f.s.WriteAt(s.b[:], sectionOffset(s.idx)); err != nil {
		return err
	}
	s.dirty = false
	return nil
}

// flushSections writes back every dirty section, in file order. Caller
// holds mu.
func (f *File) flushSections() error {
	var dirty []uint64
	for idx, s := range f.cache.m {
		if s.dirty {
			dirty = append(dirty, idx)
		}
	}
	slices.Sort(dirty)
	for _, idx := range dirty {
		if err := f.writeSection(f.cache.m[idx]); err != nil {
			return err
		}
	}
	return nil
}

// shrink evicts least recently used sections until the cache is within its
// limit. A section that cannot be written back stays resident. Caller
// holds mu.
func (f *File) shrink() error {
	c := &f.cache
	for len(c.m) > c.limit {
		victim := c.head.prev
		if err := f.writeSection(victim); err != nil {
			return err
		}
		c.unlink(victim)
		delete(c.m, victim.idx)
	}
	return nil
}

// entryCursor reads and sets the entries of blocks visited in ascending
// order, looking their section up once per section instead of once per
// block. It is valid while the caller holds mu and calls nothing that
// shrinks the cache.
type entryCursor struct {
	f *File
	s *section
}

func (c *entryCursor) load(block uint64) error {
	if c.s != nil && c.s.idx == block/SectionEntries {
		return nil
	}
	s, err := c.f.section(block / SectionEntries)
	c.s = s
	return err
}

// entry reads the index entry of block (in the device's range).
func (c *entryCursor) entry(block uint64) (uint64, error) {
	if err := c.load(block); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(c.s.b[(block%SectionEntries)*8:]), nil
}

// setEntry sets the index entry of block and returns its previous value.
func (c *entryCursor) setEntry(block, v uint64) (uint64, error) {
	if err := c.load(block); err != nil {
		return 0, err
	}
	p := c.s.b[(block%SectionEntries)*8:]
	old := binary.LittleEndian.Uint64(p)
	binary.LittleEndian.PutUint64(p, v)
	c.s.dirty = true
	return old, nil
}

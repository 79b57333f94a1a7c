package cow

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sync"
	"syscall"
)

// Options configure Create.
type Options struct {
	// DeviceSize is the size in bytes of the tracked device (> 0).
	DeviceSize int64
	// FileSize is the number of bytes to preallocate for the whole file:
	// header, index and data store. It is rounded up to BlockSize and must
	// hold at least the header and index (DataOffset). 0 means 10% of
	// DeviceSize (rounded up to BlockSize), but never less than
	// DataOffset+MinDataBytes. Ignored with IndexOnly.
	FileSize int64
	// CacheBytes bounds the memory of the index cache (at least one 32 KiB
	// section is always allowed). 0 means DefaultCacheBytes.
	CacheBytes int64
	// UUID identifies the snapshot series; zero means a new random
	// (version 4) UUID.
	UUID [16]byte
	// SeqID is the snapshot sequence number; 0 means 1.
	SeqID uint64
	// IndexOnly creates an incremental file: header and index only, no
	// data store.
	IndexOnly bool
}

// File is an open COW file. All methods are safe for concurrent use.
type File struct {
	path string
	// s is where the file's bytes are: the file through its filesystem,
	// or its extents on the device for a COW file on the snapshotted
	// volume (mapped.go). The File owns it; only MoveToDevice replaces it,
	// before the File is shared.
	s        Storage
	readOnly bool

	// opMu serializes the operations that change the file's extent,
	// storage or lifecycle (Expand, TruncateToIndex, MoveToDevice, Sync,
	// Close) and every header write of an open file (so an older header
	// never lands after a newer one). It is taken before mu.
	opMu sync.Mutex

	mu     sync.Mutex
	hdr    Header
	blocks uint64
	// dataOffset is where the data store starts. For a read-only file whose
	// index extent is not known yet (see ReadOnly) it is an upper bound.
	dataOffset int64
	// indexEnd is the end of the index as far as the file itself tells
	// (read-only files); extentKnown says whether it is exact.
	indexEnd       int64
	extentKnown    bool
	closed         bool
	cache          indexCache
	inflight       flights     // blocks whose range copy is doing its I/O
	overlap        []flight    // reserve's scratch: the flights a range meets
	idle           sync.Cond   // broadcast when inflight becomes empty
	intent         intentState // write-intent logging (incremental mode)
	failure        *Failure    // the failure record, once tracking has failed (failure.go)
	failureDurable bool        // failure is on disk (fsynced)
	ino            uint64      // inode of a file moved to its device (MoveToDevice)
	indexScratch   []byte      // aligned copy of index blocks for a device write (under mu)
}

func newFile(path string, s Storage, readOnly bool, hdr Header, blocks uint64, dataOffset int64, cacheBytes int64) *File {
	f := &File{
		path: path, s: s, readOnly: readOnly, hdr: hdr, blocks: blocks,
		dataOffset: dataOffset, indexEnd: dataOffset, extentKnown: true,
	}
	f.idle.L = &f.mu
	f.cache.init(limitSections(cacheBytes))
	return f
}

// Create makes a new COW file at path: it refuses an existing path,
// preallocates the whole file (removing it again if that fails), and
// writes a dirty header. Every index entry reads as 0.
func Create(path string, opt Options) (*File, error) {
	if opt.DeviceSize <= 0 {
		return nil, fmt.Errorf("cow file %s: device size %d is not a positive number of bytes", path, opt.DeviceSize)
	}
	blocks := Blocks(opt.DeviceSize)
	dataOff := DataOffset(blocks)
	size, err := fileSize(opt, dataOff)
	if err != nil {
		return nil, fmt.Errorf("cow file %s: %w", path, err)
	}
	hdr := Header{
		FPos: uint64(dataOff) / BlockSize, FSize: uint64(size),
		SeqID: opt.SeqID, UUID: opt.UUID, Version: Version,
	}
	if opt.IndexOnly {
		hdr.Flags = FlagIndexOnly
	}
	if hdr.SeqID == 0 {
		hdr.SeqID = 1
	}
	if hdr.UUID == ([16]byte{}) {
		if _, err := rand.Read(hdr.UUID[:]); err != nil {
			return nil, fmt.Errorf("cow file %s: generate uuid: %w", path, err)
		}
		hdr.UUID[6] = hdr.UUID[6]&0x0f | 0x40 // version 4
		hdr.UUID[8] = hdr.UUID[8]&0x3f | 0x80 // RFC 4122 variant
	}

	// O_EXCL and O_NOFOLLOW: a name planted there (a file, a symbolic
	// link) is refused, never followed; from here on the file is reached
	// only through this descriptor.
	fh, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, createError(path, err)
	}
	s := newFileStorage(fh, false)
	fail := func(err error) (*File, error) {
		s.Close()
		os.Remove(path)
		return nil, err
	}
	if err := s.allocate(0, size); err != nil {
		switch {
		case errors.Is(err, syscall.ENOSPC):
			return fail(&wrapErr{msg: fmt.Sprintf("cow file %s: not enough space to preallocate %d bytes", path, size), target: err})
		case errors.Is(err, syscall.EFBIG):
			return fail(&wrapErr{msg: fmt.Sprintf("cow file %s: %d bytes is more than the filesystem allows for one file", path, size), target: err})
		}
		return fail(fmt.Errorf("cow file %s: preallocate %d bytes: %w", path, size, err))
	}
	f := newFile(path, s, false, hdr, blocks, dataOff, opt.CacheBytes)
	if err := f.writeHeader(); err != nil {
		return fail(fmt.Errorf("cow file %s: write header: %w", path, err))
	}
	if err := s.Sync(); err != nil {
		return fail(fmt.Errorf("cow file %s: fsync: %w", path, err))
	}
	return f, nil
}

func fileSize(opt Options, dataOff int64) (int64, error) {
	if opt.IndexOnly {
		return dataOff, nil
	}
	switch {
	case opt.FileSize < 0:
		return 0, fmt.Errorf("file size %d is negative", opt.FileSize)
	case opt.FileSize == 0:
		size := roundUp(opt.DeviceSize / 10)
		return max(size, dataOff+MinDataBytes), nil
	case opt.FileSize > math.MaxInt64-BlockSize:
		return 0, fmt.Errorf("file size %d is out of range", opt.FileSize)
	}
	size := roundUp(opt.FileSize)
	if size < dataOff {
		return 0, fmt.Errorf("file size %d is too small: the header and index of a %d-byte device take %d bytes",
			opt.FileSize, opt.DeviceSize, dataOff)
	}
	return size, nil
}

func roundUp(n int64) int64 { return (n + BlockSize - 1) / BlockSize * BlockSize }

func createError(path string, err error) error {
	switch {
	case errors.Is(err, syscall.EEXIST):
		return &wrapErr{msg: fmt.Sprintf("cow file %s already exists", path), target: os.ErrExist}
	case errors.Is(err, syscall.ENOENT):
		return &wrapErr{msg: fmt.Sprintf("cow file %s: directory %s does not exist", path, filepath.Dir(path)), target: os.ErrNotExist}
	case errors.Is(err, syscall.ENOTDIR):
		return &wrapErr{msg: fmt.Sprintf("cow file %s: %s is not a directory", path, filepath.Dir(path)), target: err}
	}
	return fmt.Errorf("cow file %s: %w", path, unwrapPath(err))
}

func openError(path string, err error) error {
	if errors.Is(err, syscall.ENOENT) {
		return &wrapErr{msg: fmt.Sprintf("cow file %s does not exist", path), target: os.ErrNotExist}
	}
	return fmt.Errorf("cow file %s: %w", path, unwrapPath(err))
}

// unwrapPath drops os.PathError's "open <path>:" prefix; the caller names
// the path itself.
func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// readHeader reads and parses the header of the file whose bytes s holds,
// after checking that it is long enough for one; it also returns the
// file's size.
func readHeader(s Storage, path string) (Header, int64, *Failure, error) {
	size, err := s.Size()
	if err != nil {
		return Header{}, 0, nil, fmt.Errorf("cow file %s: %w", path, unwrapPath(err))
	}
	if size == 0 {
		return Header{}, 0, nil, corrupt("cow file %s is empty", path)
	}
	if size < HeaderSize {
		return Header{}, 0, nil, corrupt("cow file %s is truncated: %d bytes, shorter than the %d-byte header", path, size, HeaderSize)
	}
	b := make([]byte, HeaderSize)
	if _, err := s.ReadAt(b, 0); err != nil {
		return Header{}, 0, nil, fmt.Errorf("cow file %s: read header: %w", path, unwrapPath(err))
	}
	h, err := parseHeader(b)
	if err != nil {
		return Header{}, 0, nil, fmt.Errorf("cow file %s: %w", path, err)
	}
	x, err := parseFailure(b)
	if err != nil {
		return Header{}, 0, nil, fmt.Errorf("cow file %s: %w", path, err)
	}
	return h, size, x, nil
}

// Mode says what Open accepts and how it recovers a file left dirty.
type Mode int

const (
	// ReadOnly opens any COW file for reading only (update-img) and never
	// writes to it. deviceSize and cacheBytes are ignored: the header does
	// not record the device size, so the extent of the index is taken
	// from the file:
	//
	//   - an index-only file truncated to its index (the normal case, and
	//     what update-img is given) ends where its index ends: Blocks() is
	//     exact up to the last section (4096 blocks);
	//   - for any other file (snapshot mode) only an upper bound is known
	//     (the index ends at or before fpos); Blocks() reports that bound
	//     and ChangedRuns refuses to run until SetDeviceSize gives the
	//     device size.
	//
	// It checks that the file is long enough for its index and data. A file
	// without FlagClean is accepted; its index is untrusted, and the caller
	// decides (update-img refuses it).
	ReadOnly Mode = iota
	// ReloadSnapshot reopens a cleanly closed snapshot, which must still
	// hold its data store; an incremental file is refused untouched.
	ReloadSnapshot
	// ResumeSnapshot reopens a snapshot whose server died while the
	// machine kept running. Its file may be dirty, but the page cache
	// holds every write the dead server made, and CopyOnWriteRange writes
	// a block's data before its index entry and writes entries through to
	// the file before a write may overwrite the block: so every entry in
	// the file names a slot with the block's old data. fpos and
	// nr_changed_blocks are rebuilt from the index (slots written without
	// an entry are simply not reused). It must not be used after a machine
	// crash or power cut, where the page cache was lost: there only a
	// clean file is intact (ReloadSnapshot).
	ResumeSnapshot
	// ReloadIncremental reopens an incremental (index-only) file, clean,
	// or left dirty by a crash if it carries a valid write-intent record:
	// every block of every region the record names is marked as changed (a
	// superset of what was written before the crash), and write-intent
	// logging is on when Open returns. A dirty file without a record, or
	// with one that fails its checks, is refused (ErrNotClean or
	// ErrCorrupt) and left untouched.
	ReloadIncremental
)

// Recovered says what Open found in a file left dirty (ResumeSnapshot,
// ReloadIncremental).
type Recovered struct {
	// Crashed is true when the file was not closed cleanly (and, for an
	// incremental file, its write-intent record was replayed).
	Crashed bool
	// Regions and RegionBytes describe the replayed record; Marked is how
	// many blocks it newly marked as changed.
	Regions     int
	RegionBytes int64
	Marked      uint64
}

// Open opens the COW file whose bytes s holds; path only names it in
// messages. It owns s from then on: on any error s is closed, and
// File.Close closes it.
//
// Every mode but ReadOnly reopens the file for writing for a device of
// deviceSize bytes (dattobd's reload), with an index cache of cacheBytes
// (0 = DefaultCacheBytes). It checks the file's mode (FlagIndexOnly)
// against the one asked for, and refuses a file without FlagClean
// (ErrNotClean) unless the mode says how to recover it, a file whose index
// would overlap its data for this device size, and a truncated file
// (ErrCorrupt), all before it writes anything; it then rewrites the header
// without FlagClean (and fsyncs it) before anything else can change the
// file.
func Open(path string, s Storage, mode Mode, deviceSize, cacheBytes int64) (*File, Recovered, error) {
	hdr, size, failure, err := readHeader(s, path)
	if err != nil {
		s.Close()
		return nil, Recovered{}, err
	}
	switch mode {
	case ReadOnly:
		f, err := openReadOnly(path, s, hdr, size)
		if f != nil {
			f.failure, f.failureDurable = failure, failure != nil
		}
		return f, Recovered{}, err
	case ReloadSnapshot, ResumeSnapshot, ReloadIncremental:
		if failure != nil {
			s.Close()
			return nil, Recovered{}, failedErr(path, failure)
		}
		return openWritable(path, s, hdr, size, mode, deviceSize, cacheBytes)
	}
	s.Close()
	return nil, Recovered{}, fmt.Errorf("cow file %s: unknown open mode %d", path, mode)
}

// openReadOnly is Open in ReadOnly mode.
func openReadOnly(path string, s Storage, hdr Header, size int64) (*File, error) {
	dataEnd := int64(hdr.FPos) * BlockSize
	var indexEnd int64
	known := false
	if hdr.Flags&FlagIndexOnly != 0 && size <= dataEnd {
		// Truncated to its index: the file's length is the data offset.
		if size < HeaderSize+SectionBytes || (size-HeaderSize)%SectionBytes != 0 {
			s.Close()
			return nil, corrupt("cow file %s is truncated: %d bytes is not a header plus whole %d-byte index sections", path, size, SectionBytes)
		}
		indexEnd, known = size, true
	} else {
		if size < dataEnd {
			s.Close()
			return nil, corrupt("cow file %s is truncated: %d bytes, but its data runs to byte %d", path, size, dataEnd)
		}
		indexEnd = HeaderSize + (dataEnd-HeaderSize)/SectionBytes*SectionBytes
	}
	f := newFile(path, s, true, hdr, uint64(indexEnd-HeaderSize)/8, indexEnd, 0)
	f.indexEnd, f.extentKnown = indexEnd, known
	return f, nil
}

// openWritable is Open in the modes that write: the checks and recovery,
// on any storage.
func openWritable(path string, s Storage, hdr Header, size int64, mode Mode, deviceSize, cacheBytes int64) (*File, Recovered, error) {
	var rec Recovered
	fail := func(err error) (*File, Recovered, error) {
		s.Close()
		return nil, rec, err
	}
	if deviceSize <= 0 {
		return fail(fmt.Errorf("cow file %s: device size %d is not a positive number of bytes", path, deviceSize))
	}
	switch indexOnly := hdr.Flags&FlagIndexOnly != 0; {
	case mode == ReloadIncremental && !indexOnly:
		return fail(modeErr("cow file %s holds a snapshot (it has a data store), not an incremental change list", path))
	case mode != ReloadIncremental && indexOnly:
		return fail(&wrapErr{msg: fmt.Sprintf("cow file %s is an incremental change list (index only), not a snapshot", path), target: ErrChangeList})
	}
	blocks := Blocks(deviceSize)
	var intent intentState
	dirty := hdr.Flags&FlagClean == 0
	switch {
	case dirty && mode == ResumeSnapshot:
		rec.Crashed = true
	case dirty && mode == ReloadSnapshot:
		// dattobd's words, and what to do about it.
		return fail(&wrapErr{msg: fmt.Sprintf("cow file %s not left in clean state (a snapshot cannot be trusted after a crash); a full backup is required", path), target: ErrNotClean})
	case dirty:
		raw := make([]byte, HeaderSize)
		if _, err := s.ReadAt(raw, 0); err != nil {
			return fail(fmt.Errorf("cow file %s: read header: %w", path, unwrapPath(err)))
		}
		var ok bool
		var err error
		intent, ok, err = parseIntent(raw, blocks)
		if err != nil {
			return fail(&wrapErr{msg: fmt.Sprintf("cow file %s was not closed cleanly and its %v; a full backup is required", path, err), target: ErrCorrupt})
		}
		if !ok || hdr.Flags&FlagIndexOnly == 0 {
			return fail(&wrapErr{msg: fmt.Sprintf("cow file %s not left in clean state and holds no write-intent record (a snapshot, or a file of another program); a full backup is required", path), target: ErrNotClean})
		}
		rec.Crashed = true
	}
	dataOff := DataOffset(blocks)
	dataEnd := int64(hdr.FPos) * BlockSize
	switch {
	case dataEnd < dataOff:
		return fail(corrupt("cow file %s: its data starts at byte %d, inside the %d-byte index of a %d-byte device (a file of another device?)",
			path, dataEnd, dataOff, deviceSize))
	case size < dataOff:
		return fail(corrupt("cow file %s is truncated: %d bytes, its index needs %d", path, size, dataOff))
	case hdr.Flags&FlagIndexOnly == 0 && size < int64(hdr.FSize):
		return fail(corrupt("cow file %s is truncated: %d bytes, its header says %d are allocated", path, size, hdr.FSize))
	}
	hdr.Flags &^= FlagClean
	f := newFile(path, s, false, hdr, blocks, dataOff, cacheBytes)
	if rec.Crashed && mode == ResumeSnapshot {
		if err := f.rebuildFromIndex(); err != nil {
			return fail(err)
		}
	}
	if rec.Crashed && mode == ReloadIncremental {
		// Keep the record as it is until the replayed marks are on disk:
		// a crash during recovery must find it again.
		f.intent = intent
		f.intent.enabled = true
		n, rb := 0, int64(1)<<intent.shift
		for r := uint64(0); r < intent.nbits; r++ {
			if !testBit(intent.durable, r) {
				continue
			}
			n++
			first := r << intent.shift / BlockSize
			last := min(first+uint64(rb)/BlockSize, blocks)
			marked, err := f.markBlocks(first, last)
			if err != nil {
				return fail(err)
			}
			rec.Marked += marked
			setBit(f.intent.dirty, r)
		}
		rec.Regions, rec.RegionBytes = n, rb
		if err := f.flushSections(); err != nil {
			return fail(fmt.Errorf("cow file %s: write index: %w", path, unwrapPath(err)))
		}
	}
	if err := f.writeHeader(); err != nil {
		return fail(fmt.Errorf("cow file %s: write header: %w", path, err))
	}
	if err := s.Sync(); err != nil {
		return fail(fmt.Errorf("cow file %s: fsync: %w", path, err))
	}
	return f, rec, nil
}

// SetDeviceSize tells a read-only file the size of its device. It checks
// that the file's index matches that size (exactly, when the index extent
// is known from the file; otherwise that it fits below the data) and
// limits Blocks, Lookup and ChangedRuns to the device's blocks.
func (f *File) SetDeviceSize(deviceSize int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.readOnly {
		return modeErr("cow file %s: SetDeviceSize is for read-only files; Open takes the device size", f.path)
	}
	if deviceSize <= 0 {
		return fmt.Errorf("cow file %s: device size %d is not a positive number of bytes", f.path, deviceSize)
	}
	blocks := Blocks(deviceSize)
	need := DataOffset(blocks)
	have := uint64(f.indexEnd-HeaderSize) / SectionBytes
	if f.extentKnown && need != f.indexEnd {
		return fmt.Errorf("cow file %s: its index covers %d sections (a device of %d to %d bytes), not %d bytes",
			f.path, have, (have-1)*SectionEntries*BlockSize+1, have*SectionEntries*BlockSize, deviceSize)
	}
	if need > f.indexEnd {
		return fmt.Errorf("cow file %s: a %d-byte device needs a %d-byte index, which would overlap the file's data at byte %d",
			f.path, deviceSize, need-HeaderSize, f.indexEnd)
	}
	f.blocks, f.dataOffset = blocks, need
	f.extentKnown = true
	f.indexEnd = need
	return nil
}

func (f *File) writeHeader() error {
	_, err := f.s.WriteAt(f.headerBytes(), 0)
	return err
}

func (f *File) closedErr() error {
	return &wrapErr{msg: fmt.Sprintf("cow file %s is closed", f.path), target: os.ErrClosed}
}

// usable checks, with mu held, that the file is open and in range.
func (f *File) usable(block uint64) error {
	if f.closed {
		return f.closedErr()
	}
	if block >= f.blocks {
		return fmt.Errorf("cow file %s: block %d is beyond the device's %d blocks", f.path, block, f.blocks)
	}
	return nil
}

// writable checks, with mu held, that the file may be modified.
func (f *File) writable() error {
	if f.closed {
		return f.closedErr()
	}
	if f.readOnly {
		return modeErr("cow file %s is open read-only", f.path)
	}
	return nil
}

// OSFile is the open file behind f when f is reached through its
// filesystem (nil for a COW file on the snapshotted volume's extents), to
// hand to another process, which opens it with StorageOf.
func (f *File) OSFile() *os.File {
	if s, ok := f.s.(*fileStorage); ok {
		return s.f
	}
	return nil
}

// Path returns the file's path.
func (f *File) Path() string { return f.path }

// Header returns the current header (with FlagClean clear while the file
// is open read-write).
func (f *File) Header() Header {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.hdr
}

// Blocks returns the number of index entries in use: Blocks(deviceSize).
// For a read-only file see ReadOnly and SetDeviceSize.
func (f *File) Blocks() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.blocks
}

// NrChangedBlocks returns the number of entries that went from 0 to
// non-zero (dattobd counts them for version 1 files only).
func (f *File) NrChangedBlocks() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.hdr.NrChangedBlocks
}

// firstSlot is the lowest slot a valid entry may name. Caller holds mu.
func (f *File) firstSlot() uint64 {
	if f.readOnly && !f.extentKnown {
		return minSlot
	}
	return uint64(f.dataOffset) / BlockSize
}

// Lookup returns block's index entry: 0 (unchanged), 1 (changed, no data
// kept) or the slot holding its pre-snapshot data. In a file with a data
// store, an entry that names no written slot is reported as ErrCorrupt.
func (f *File) Lookup(block uint64) (uint64, error) {
	var e [1]uint64
	err := f.LookupRange(block, e[:])
	return e[0], err
}

// LookupRange is Lookup of blocks first, first+1, … into entries, under
// one lock and with one section lookup per section: a large read of the
// snapshot asks for hundreds of adjacent blocks at once.
func (f *File) LookupRange(first uint64, entries []uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	cur := entryCursor{f: f}
	for i := range entries {
		block := first + uint64(i)
		if err := f.usable(block); err != nil {
			return err
		}
		e, err := cur.entry(block)
		if err != nil {
			return err
		}
		if e > 1 && f.hdr.Flags&FlagIndexOnly == 0 && (e < f.firstSlot() || e >= f.hdr.FPos) {
			return corrupt("cow file %s: index entry of block %d is %d, outside the data slots %d..%d",
				f.path, block, e, f.firstSlot(), f.hdr.FPos)
		}
		entries[i] = e
	}
	return nil
}

func (f *File) countChange(old uint64) {
	if old == 0 && f.hdr.Version >= Version {
		f.hdr.NrChangedBlocks++
	}
}

// ReadBlock reads the 4 KiB of preserved data in slot (an entry returned by
// Lookup) into p, which must be BlockSize bytes.
func (f *File) ReadBlock(slot uint64, p []byte) error {
	if len(p) != BlockSize {
		return fmt.Errorf("cow file %s: ReadBlock needs a %d-byte buffer, got %d", f.path, BlockSize, len(p))
	}
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return f.closedErr()
	}
	if f.hdr.Flags&FlagIndexOnly != 0 {
		f.mu.Unlock()
		return modeErr("cow file %s is index-only: it holds no data", f.path)
	}
	lo, hi := f.firstSlot(), f.hdr.FPos
	f.mu.Unlock()
	if slot < lo || slot >= hi {
		return fmt.Errorf("cow file %s: slot %d is outside the data slots %d..%d", f.path, slot, lo, hi)
	}
	n, err := f.s.ReadAt(p, int64(slot)*BlockSize)
	if n == BlockSize {
		return nil
	}
	if errors.Is(err, io.EOF) {
		return corrupt("cow file %s is truncated: data slot %d is past its end", f.path, slot)
	}
	return fmt.Errorf("cow file %s: read data slot %d: %w", f.path, slot, unwrapPath(err))
}

// SlotSource says where data slot slot's BlockSize bytes are: at offset at
// of descriptor fd, which belongs to f and stays valid while f is open. It
// is for reads made without f, such as a zero-copy read straight into a
// request's pages; its checks are ReadBlock's.
func (f *File) SlotSource(slot uint64) (fd int, at int64, err error) {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return -1, 0, f.closedErr()
	}
	if f.hdr.Flags&FlagIndexOnly != 0 {
		f.mu.Unlock()
		return -1, 0, modeErr("cow file %s is index-only: it holds no data", f.path)
	}
	lo, hi := f.firstSlot(), f.hdr.FPos
	f.mu.Unlock()
	if slot < lo || slot >= hi {
		return -1, 0, fmt.Errorf("cow file %s: slot %d is outside the data slots %d..%d", f.path, slot, lo, hi)
	}
	l, ok := f.s.(locator)
	if !ok {
		return -1, 0, modeErr("cow file %s: its storage cannot say where slot %d is", f.path, slot)
	}
	fd, at, err = l.locate(int64(slot) * BlockSize)
	if err != nil {
		return -1, 0, fmt.Errorf("cow file %s: slot %d: %w", f.path, slot, err)
	}
	return fd, at, nil
}

// Expand grows the data store by bytes (rounded up to BlockSize): it
// preallocates them at the end of the allowed size and only then raises
// fsize, so no slot is ever handed out beyond allocated space and no
// existing slot is touched.
func (f *File) Expand(bytes int64) error {
	if bytes <= 0 {
		return fmt.Errorf("cow file %s: expansion of %d bytes is not positive", f.path, bytes)
	}
	f.opMu.Lock()
	defer f.opMu.Unlock()
	f.mu.Lock()
	err := f.writable()
	if err == nil && f.hdr.Flags&FlagIndexOnly != 0 {
		err = modeErr("cow file %s is index-only: it has no data store to expand", f.path)
	}
	off := int64(f.hdr.FSize)
	f.mu.Unlock()
	if err != nil {
		return err
	}
	if bytes > math.MaxInt64-BlockSize-off {
		return fmt.Errorf("cow file %s: expansion by %d bytes is out of range", f.path, bytes)
	}
	n := roundUp(bytes)
	a, ok := f.s.(allocator)
	if !ok {
		return modeErr("cow file %s lives on the snapshotted volume: growing it during the snapshot could take blocks the snapshot still needs; give it enough room with -f", f.path)
	}
	if err := a.allocate(off, n); err != nil {
		if errors.Is(err, syscall.ENOSPC) {
			return &wrapErr{msg: fmt.Sprintf("cow file %s: not enough space to expand by %d bytes", f.path, n), target: err}
		}
		return fmt.Errorf("cow file %s: expand by %d bytes: %w", f.path, n, unwrapPath(err))
	}
	f.mu.Lock()
	f.hdr.FSize = uint64(off + n)
	f.mu.Unlock()
	return nil
}

// SetCacheLimit changes the index cache budget (0 = DefaultCacheBytes; at
// least one section) and evicts down to it, writing dirty sections back.
// If a write-back fails the section stays resident and the next eviction
// retries; the cache never grows while it is over the limit.
func (f *File) SetCacheLimit(bytes int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cache.limit = limitSections(bytes)
	if !f.closed {
		f.shrink()
	}
}

// CacheBytes returns the memory held by resident index sections (32 KiB
// each; a few dozen bytes of bookkeeping per section come on top).
func (f *File) CacheBytes() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return int64(len(f.cache.m)) * SectionBytes
}

// TruncateToIndex turns a snapshot file into an incremental one: it sets
// FlagIndexOnly (from then on CopyOnWriteRange fails), waits for copies in
// progress, sets fsize to the data offset and fpos to the first slot
// (the data store is gone), writes back the index and the header, and
// truncates the file to its index. Entries keep their values: a slot
// number still means "changed". If it fails it may be called again; on a
// file that is index-only already it redoes the write-back and truncation.
func (f *File) TruncateToIndex() error {
	f.opMu.Lock()
	defer f.opMu.Unlock()
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.writable(); err != nil {
		return err
	}
	if f.hdr.Flags&FlagIndexOnly == 0 {
		f.hdr.Flags |= FlagIndexOnly
		for !f.inflight.empty() {
			f.idle.Wait()
		}
		f.hdr.FSize = uint64(f.dataOffset)
		f.hdr.FPos = uint64(f.dataOffset) / BlockSize
	}
	if err := f.flushSections(); err != nil {
		return fmt.Errorf("cow file %s: write index: %w", f.path, unwrapPath(err))
	}
	if err := f.writeHeader(); err != nil {
		return fmt.Errorf("cow file %s: write header: %w", f.path, unwrapPath(err))
	}
	if err := f.s.Truncate(f.dataOffset); err != nil {
		return fmt.Errorf("cow file %s: truncate to its index: %w", f.path, unwrapPath(err))
	}
	if err := f.s.Sync(); err != nil {
		return fmt.Errorf("cow file %s: fsync: %w", f.path, unwrapPath(err))
	}
	return nil
}

// Sync writes back the dirty index sections and the (dirty) header, then
// fsyncs the file. The fsync runs without the file's lock.
func (f *File) Sync() error {
	f.opMu.Lock()
	defer f.opMu.Unlock()
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return f.closedErr()
	}
	if f.readOnly {
		f.mu.Unlock()
		return nil
	}
	err := f.flushSections()
	if err == nil {
		err = f.writeHeader()
	}
	f.mu.Unlock()
	if err == nil {
		err = f.s.Sync()
	}
	if err != nil {
		return fmt.Errorf("cow file %s: sync: %w", f.path, unwrapPath(err))
	}
	return nil
}

// Mapped reports whether the file's bytes are read and written at its
// extents on the device (a COW file on the snapshotted volume).
func (f *File) Mapped() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.s.(*deviceStorage)
	return ok
}

// Close refuses new operations, waits for copies in progress, writes back
// the index and the header and fsyncs. With clean, and only if all of that
// succeeded and no failure is recorded, it then sets FlagClean in the header and fsyncs again, so a
// clean header never describes an index that is not on disk. A read-only
// file is just closed.
func (f *File) Close(clean bool) error {
	f.opMu.Lock()
	defer f.opMu.Unlock()
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return f.closedErr()
	}
	f.closed = true
	if f.readOnly {
		f.cache.init(1)
		f.mu.Unlock()
		return f.s.Close()
	}
	for !f.inflight.empty() {
		f.idle.Wait()
	}
	err := f.flushSections()
	if err == nil {
		err = f.writeHeader()
	}
	if err == nil {
		err = f.s.Sync()
	}
	if err == nil && clean && f.failure == nil {
		f.hdr.Flags |= FlagClean
		f.intent.enabled = false // a clean file needs no record: its index is whole
		if err = f.writeHeader(); err == nil {
			err = f.s.Sync()
		}
	}
	f.cache.init(1) // drop the sections
	f.mu.Unlock()
	if cerr := f.s.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("cow file %s: close: %w", f.path, unwrapPath(err))
	}
	return nil
}

// ChangedRuns calls fn for every maximal run of blocks whose entry is not
// 0, in block order. It reads the index from the file 256 KiB at a time
// (taking the newer contents of cached sections), so its memory does not
// depend on the device size; on a read-only file it also skips holes
// (SEEK_DATA), so a sparse or unwritten index costs no reads. fn runs
// without the file's lock. ChangedRuns stops at fn's first error and
// returns it.
func (f *File) ChangedRuns(fn func(first, count uint64) error) error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return f.closedErr()
	}
	if !f.extentKnown {
		f.mu.Unlock()
		return fmt.Errorf("cow file %s has a data store, so its header does not tell where its index ends; give the device size (SetDeviceSize)", f.path)
	}
	blocks := f.blocks
	seeker, canSeek := f.s.(dataSeeker)
	canSeek = canSeek && f.readOnly // nothing caches dirty sections: the file is the truth
	f.mu.Unlock()

	const chunk = 8 // sections per read
	buf := make([]byte, chunk*SectionBytes)
	r := runs{fn: fn}
	nsect := sections(blocks)
	for s := uint64(0); s < nsect; {
		if canSeek {
			next, ok := seeker.nextData(sectionOffset(s))
			if !ok {
				break // zeros to the end
			}
			if skip := uint64(next-HeaderSize) / SectionBytes; skip > s {
				if err := r.end(); err != nil {
					return err
				}
				s = skip
				continue
			}
		}
		k := min(chunk, nsect-s)
		b := buf[:k*SectionBytes]
		f.mu.Lock()
		if f.closed {
			f.mu.Unlock()
			return f.closedErr()
		}
		n, err := f.s.ReadAt(b, sectionOffset(s))
		if n != len(b) {
			f.mu.Unlock()
			if errors.Is(err, io.EOF) {
				return corrupt("cow file %s is truncated: its index ends before byte %d", f.path, sectionOffset(s+k))
			}
			return fmt.Errorf("cow file %s: read index: %w", f.path, unwrapPath(err))
		}
		for i := range k {
			if sec, ok := f.cache.m[s+i]; ok {
				copy(b[i*SectionBytes:], sec.b[:])
			}
		}
		f.mu.Unlock()
		base := s * SectionEntries
		if err := r.scan(b[:8*min(blocks-base, k*SectionEntries)], base); err != nil {
			return err
		}
		s += k
	}
	return r.end()
}

// runs accumulates maximal runs of non-zero entries for ChangedRuns.
type runs struct {
	fn          func(first, count uint64) error
	first, size uint64
}

var zeroGroup [512]byte // 64 entries

// scan feeds the little-endian entries in b, the first one for block base.
func (r *runs) scan(b []byte, base uint64) error {
	for i := 0; i < len(b); {
		if i%len(zeroGroup) == 0 && len(b)-i >= len(zeroGroup) && bytes.Equal(b[i:i+len(zeroGroup)], zeroGroup[:]) {
			if err := r.end(); err != nil {
				return err
			}
			i += len(zeroGroup)
			continue
		}
		if binary.LittleEndian.Uint64(b[i:]) != 0 {
			if r.size == 0 {
				r.first = base + uint64(i/8)
			}
			r.size++
		} else if err := r.end(); err != nil {
			return err
		}
		i += 8
	}
	return nil
}

func (r *runs) end() error {
	if r.size == 0 {
		return nil
	}
	first, size := r.first, r.size
	r.size = 0
	return r.fn(first, size)
}

package cow

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// CreateOnVolume creates a COW file at path on the filesystem of the
// volume being snapshotted (see mapped.go). It is Create, plus: the index
// is written (zeros) through the filesystem, so that the filesystem reads
// back what is later written at its extents on the device (the data store
// stays preallocated, never read through the filesystem); the file is
// synced, its extents read, its cached pages dropped, and from then on the
// File reads and writes device at those extents only. The extents are
// returned for reloads, which open the file without its filesystem.
func CreateOnVolume(path, device string, opt Options) (*File, []Extent, error) {
	f, err := Create(path, opt)
	if err != nil {
		return nil, nil, err
	}
	fail := func(err error) (*File, []Extent, error) {
		f.Close(false)
		os.Remove(path)
		return nil, nil, err
	}
	zeros := make([]byte, 1<<20)
	for off := int64(HeaderSize); off < f.dataOffset; off += int64(len(zeros)) {
		n := min(int64(len(zeros)), f.dataOffset-off)
		if _, err := f.file.WriteAt(zeros[:n], off); err != nil {
			return fail(fmt.Errorf("cow file %s: write its index: %w", path, unwrapPath(err)))
		}
	}
	if err := f.file.Sync(); err != nil {
		return fail(fmt.Errorf("cow file %s: fsync: %w", path, unwrapPath(err)))
	}
	extents, err := FileExtents(path, int64(f.hdr.FSize))
	if err != nil {
		return fail(fmt.Errorf("cow file %s: %w", path, err))
	}
	m, err := openMapped(device, extents)
	if err != nil {
		return fail(fmt.Errorf("cow file %s: open %s: %w", path, device, err))
	}
	unix.Fadvise(int(f.file.Fd()), 0, 0, unix.FADV_DONTNEED)
	f.mu.Lock()
	if f.direct != nil {
		f.direct.Close()
		f.direct = nil
	}
	f.file.Close()
	f.file = nil
	f.f = m
	f.mu.Unlock()
	return f, extents, nil
}

// OnVolume says how OpenOnVolume opens a file.
type OnVolume int

const (
	// ReloadSnapshot: a cleanly closed snapshot (OpenSnapshot).
	ReloadSnapshot OnVolume = iota
	// ResumeSnapshot: a snapshot whose server died (RecoverSnapshot).
	ResumeSnapshot
	// ReloadIncremental: an incremental file, clean or crashed (Recover).
	ReloadIncremental
)

// OpenOnVolume opens a COW file on the snapshotted volume at its recorded
// extents on device, without its filesystem (which may not be mounted
// yet, as at boot). path only names it in messages.
func OpenOnVolume(path, device string, extents []Extent, deviceSize, cacheBytes int64, how OnVolume) (*File, Recovered, error) {
	m, err := openMapped(device, extents)
	if err != nil {
		return nil, Recovered{}, fmt.Errorf("cow file %s: open %s: %w", path, device, err)
	}
	hdr, size, err := readHeaderFrom(m, m.size, path)
	if err != nil {
		m.Close()
		return nil, Recovered{}, err
	}
	o := openOpts{want: wantDataStore}
	switch how {
	case ResumeSnapshot:
		o.trustDirtyIndex = true
	case ReloadIncremental:
		o = openOpts{want: wantIndexOnly, replayIntent: true}
	}
	return openOn(m, nil, hdr, size, path, deviceSize, cacheBytes, o)
}

// DropCache drops the page cache of the file at path, so that readers
// through its filesystem see what was written at its extents on the
// device. It is best effort.
func DropCache(path string) {
	if fh, err := os.Open(path); err == nil {
		unix.Fadvise(int(fh.Fd()), 0, 0, unix.FADV_DONTNEED)
		fh.Close()
	}
}

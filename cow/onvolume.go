package cow

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// MoveToDevice puts a new COW file on the filesystem of the volume being
// snapshotted (see mapped.go) onto that volume's device: the index is
// written (zeros) through the filesystem, so that the filesystem reads
// back what is later written at its extents on the device (the data store
// stays preallocated, never read through the filesystem); the file is
// synced, its extents read (fileExtents), its cached pages dropped, and
// from then on the File reads and writes device at those extents only. It
// returns the extents, for reloads that open the file without its
// filesystem (DeviceStorage).
//
// It is for a file fresh from Create, before the File is shared: it
// refuses one in which anything was recorded. If it fails, the File is
// unchanged, still on its filesystem.
func (f *File) MoveToDevice(device string) ([]Extent, error) {
	f.opMu.Lock()
	defer f.opMu.Unlock()
	f.mu.Lock()
	err := f.writable()
	fs, isFile := f.s.(*fileStorage)
	switch {
	case err != nil:
	case !isFile:
		err = modeErr("cow file %s is not a file on its filesystem: it cannot move to %s", f.path, device)
	case f.hdr.NrChangedBlocks != 0 || f.hdr.FPos != uint64(f.dataOffset)/BlockSize || len(f.inflight) > 0:
		err = modeErr("cow file %s is not new: only a file nothing was recorded in yet can move to %s", f.path, device)
	}
	dataOff, size := f.dataOffset, int64(f.hdr.FSize)
	f.mu.Unlock()
	if err != nil {
		return nil, err
	}
	zeros := make([]byte, 1<<20)
	for off := int64(HeaderSize); off < dataOff; off += int64(len(zeros)) {
		n := min(int64(len(zeros)), dataOff-off)
		if _, err := fs.WriteAt(zeros[:n], off); err != nil {
			return nil, fmt.Errorf("cow file %s: write its index: %w", f.path, unwrapPath(err))
		}
	}
	if err := fs.Sync(); err != nil {
		return nil, fmt.Errorf("cow file %s: fsync: %w", f.path, unwrapPath(err))
	}
	extents, err := fileExtents(f.path, size)
	if err != nil {
		return nil, fmt.Errorf("cow file %s: %w", f.path, err)
	}
	d, err := DeviceStorage(device, extents)
	if err != nil {
		return nil, fmt.Errorf("cow file %s: open %s: %w", f.path, device, err)
	}
	fs.dropCache()
	f.mu.Lock()
	f.s = d
	f.mu.Unlock()
	fs.Close()
	return extents, nil
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

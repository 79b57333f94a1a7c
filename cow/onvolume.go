package cow

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/internal/linux"
)

// MoveToDevice puts a new COW file on the filesystem of the volume being
// snapshotted (see mapped.go) onto that volume's device: the index is
// written (zeros) through the filesystem, so that the filesystem reads
// back what is later written at its extents on the device (the data store
// stays preallocated, never read through the filesystem); the file is
// synced, its extents read (FileExtents), its cached pages dropped, and
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
	case f.hdr.NrChangedBlocks != 0 || f.hdr.FPos != uint64(f.dataOffset)/BlockSize || !f.inflight.empty():
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
	extents, err := FileExtents(fs.f, f.path, size)
	if err != nil {
		return nil, fmt.Errorf("cow file %s: %w", f.path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(fs.f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("cow file %s: %w", f.path, err)
	}
	d, err := DeviceStorage(device, extents)
	if err != nil {
		return nil, fmt.Errorf("cow file %s: open %s: %w", f.path, device, err)
	}
	// Its blocks are written raw from now on: rm, mv or a defragmenter
	// must not free or move them (the owner clears the flag when the
	// file is released).
	if err := SetImmutable(fs.f, true); err != nil {
		d.Close()
		return nil, fmt.Errorf("cow file %s: its filesystem cannot mark it immutable (%v), so its blocks could be freed under the server; put it on another filesystem", f.path, err)
	}
	fs.dropCache()
	f.mu.Lock()
	f.s = d
	f.ino = st.Ino
	f.mu.Unlock()
	fs.Close()
	return extents, nil
}

// Inode is the inode number of a COW file moved to its device (0 for any
// other): what OpenVerified checks a later open by name against.
func (f *File) Inode() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ino
}

// OpenVerified opens the COW file on the volume at path again, through
// its filesystem (read-only: it is immutable; never following a symbolic
// link), and checks that it is the file with inode ino on the filesystem
// of device dev: a name swapped for another file meanwhile is refused, not
// used.
func OpenVerified(path string, dev, ino uint64) (*os.File, error) {
	fh, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("cow file %s: %w", path, unwrapPath(err))
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(fh.Fd()), &st); err != nil {
		fh.Close()
		return nil, fmt.Errorf("cow file %s: %w", path, err)
	}
	if st.Ino != ino || uint64(st.Dev) != dev || st.Mode&unix.S_IFMT != unix.S_IFREG {
		fh.Close()
		return nil, fmt.Errorf("cow file %s is not the file the server wrote (inode %d on %d:%d, expected %d on %d:%d): refused",
			path, st.Ino, unix.Major(uint64(st.Dev)), unix.Minor(uint64(st.Dev)), ino, unix.Major(dev), unix.Minor(dev))
	}
	return fh, nil
}

// SetImmutable sets or clears the file's immutable flag (FS_IMMUTABLE_FL).
func SetImmutable(f *os.File, on bool) error {
	flags, err := linux.InodeFlags(int(f.Fd()))
	if err != nil {
		return err
	}
	if on {
		flags |= linux.FlagImmutable
	} else {
		flags &^= linux.FlagImmutable
	}
	return linux.SetInodeFlags(int(f.Fd()), flags)
}

// TruncatePinned shortens an immutable COW file open as fh (OpenVerified)
// to size through its filesystem, giving the space past it back, and
// leaves it immutable.
func TruncatePinned(fh *os.File, size int64) error {
	if err := SetImmutable(fh, false); err != nil {
		return err
	}
	w, err := os.OpenFile(fdPath(fh), os.O_WRONLY, 0)
	if err == nil {
		err = w.Truncate(size)
		w.Close()
	}
	return errors.Join(err, SetImmutable(fh, true))
}

// DropCache drops the page cache of an open file, so that readers through
// its filesystem see what was written at its extents on the device. It is
// best effort.
func DropCache(f *os.File) {
	unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
}

// CreateOnVolume creates a COW file on the filesystem of the volume being
// snapshotted, moves it onto device (MoveToDevice) and closes it, clean:
// what it returns is all the server needs to open the file at its extents
// (Open with DeviceStorage), and what later opens by name check
// (OpenVerified). It runs in the helper process that does the server's
// work on its own volume's filesystem (internal/frontfs). On error,
// nothing is left behind.
func CreateOnVolume(path, device string, opt Options) (extents []Extent, ino uint64, err error) {
	f, err := Create(path, opt)
	if err != nil {
		return nil, 0, err
	}
	extents, err = f.MoveToDevice(device)
	if err != nil {
		f.Close(false)
		os.Remove(path) // still a plain file: MoveToDevice failed
		return nil, 0, err
	}
	ino = f.Inode()
	if err := f.Close(true); err != nil {
		if fh, oerr := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0); oerr == nil {
			SetImmutable(fh, false)
			fh.Close()
		}
		os.Remove(path)
		return nil, 0, err
	}
	return extents, ino, nil
}

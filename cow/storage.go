package cow

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/dbdublk/dbdublk/internal/dio"
	"golang.org/x/sys/unix"
)

// Storage is where a COW file's bytes are: the file through its
// filesystem (FileStorage), or the file's extents on the snapshotted
// device (DeviceStorage, a COW file on the volume itself). A File owns its
// Storage and closes it.
type Storage interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Sync() error
	Truncate(size int64) error
	Size() (int64, error)
	Close() error
}

// What only some storages can do; a File finds these by type assertion.
type (
	// allocator reserves bytes before they are used (Create, Expand).
	allocator interface {
		allocate(off, n int64) error
	}
	// dataSeeker skips holes: the offset of the first byte at or after
	// off that is not in a hole, false if there is none (ChangedRuns on a
	// read-only file).
	dataSeeker interface {
		nextData(off int64) (int64, bool)
	}
	// bulkWriter writes whole data slots, large ones without a page-cache
	// copy (CopyOnWriteRange).
	bulkWriter interface {
		writeData(p []byte, off int64) (int, error)
	}
	// locator says which descriptor and offset hold the block at off,
	// for reads made without the storage (see File.SlotSource).
	locator interface {
		locate(off int64) (fd int, at int64, err error)
	}
)

// fileStorage is a COW file through its filesystem. A writable one also
// holds the file opened with O_DIRECT (nil where the filesystem refuses
// it), for large aligned data writes; Close closes both.
type fileStorage struct {
	f      *os.File
	direct *os.File
}

// FileStorage opens the COW file at path through its filesystem; readOnly
// opens it O_RDONLY. It refuses a path that is not a regular file, a
// symbolic link included (it is not followed).
func FileStorage(path string, readOnly bool) (Storage, error) {
	flag := os.O_RDWR | syscall.O_NOFOLLOW
	if readOnly {
		flag = os.O_RDONLY | syscall.O_NOFOLLOW
	}
	fh, err := os.OpenFile(path, flag, 0)
	if errors.Is(err, syscall.ELOOP) {
		return nil, fmt.Errorf("cow file %s is a symbolic link; give the file itself", path)
	}
	if err != nil {
		return nil, openError(path, err)
	}
	return StorageOf(fh, path, readOnly)
}

// StorageOf is FileStorage of a COW file already open as fh (named path in
// messages), such as one passed by another process; it takes fh over
// (closing it on error). It refuses anything but a regular file.
func StorageOf(fh *os.File, path string, readOnly bool) (Storage, error) {
	st, err := fh.Stat()
	if err != nil {
		fh.Close()
		return nil, fmt.Errorf("cow file %s: %w", path, unwrapPath(err))
	}
	if !st.Mode().IsRegular() {
		fh.Close()
		return nil, fmt.Errorf("cow file %s is not a regular file", path)
	}
	return newFileStorage(fh, readOnly), nil
}

// newFileStorage takes fh over; a writable one gets its O_DIRECT twin,
// opened through the descriptor (/proc/self/fd), never by the name again.
func newFileStorage(fh *os.File, readOnly bool) *fileStorage {
	s := &fileStorage{f: fh}
	if !readOnly {
		if d, err := os.OpenFile(fdPath(fh), os.O_WRONLY|syscall.O_DIRECT, 0); err == nil {
			s.direct = d
		}
	}
	return s
}

// fdPath names an open file by its descriptor: opening it reaches the same
// inode whatever its name has become.
func fdPath(f *os.File) string { return fmt.Sprintf("/proc/self/fd/%d", f.Fd()) }

func (s *fileStorage) ReadAt(p []byte, off int64) (int, error)  { return s.f.ReadAt(p, off) }
func (s *fileStorage) WriteAt(p []byte, off int64) (int, error) { return s.f.WriteAt(p, off) }
func (s *fileStorage) Sync() error                              { return s.f.Sync() }
func (s *fileStorage) Truncate(size int64) error                { return s.f.Truncate(size) }

func (s *fileStorage) Size() (int64, error) {
	st, err := s.f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

func (s *fileStorage) Close() error {
	if s.direct != nil {
		s.direct.Close()
		s.direct = nil
	}
	return s.f.Close()
}

func (s *fileStorage) allocate(off, n int64) error          { return preallocate(s.f, off, n) }
func (s *fileStorage) locate(off int64) (int, int64, error) { return int(s.f.Fd()), off, nil }
func (s *fileStorage) nextData(off int64) (int64, bool)     { return nextData(s.f, off) }

// writeData writes whole slots. Large writes go with O_DIRECT when data is
// aligned for it (no page-cache copy: a 1 MiB copy is a DMA from the
// caller's buffer); small ones through the page cache, where the
// filesystem converts the preallocated (unwritten) extents in batches at
// writeback instead of once per write.
func (s *fileStorage) writeData(data []byte, off int64) (int, error) {
	if s.direct != nil && len(data) >= directMin && dio.IsAligned(data) {
		n, err := s.direct.WriteAt(data, off)
		if !errors.Is(err, syscall.EINVAL) {
			return n, err
		}
	}
	return s.f.WriteAt(data, off)
}

// directMin is the smallest data write issued with O_DIRECT.
const directMin = 64 << 10

// dropCache drops the file's cached pages (best effort).
func (s *fileStorage) dropCache() {
	unix.Fadvise(int(s.f.Fd()), 0, 0, unix.FADV_DONTNEED)
}

package cow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sort"
	"sync"
	"syscall"
	"unsafe"

	"github.com/dbdublk/dbdublk/internal/dio"
	"golang.org/x/sys/unix"
)

// A COW file on the snapshotted volume itself (dattobd's default layout)
// must not be written through the filesystem: those writes would come back
// through the very device being tracked, to be copied and tracked again,
// and could deadlock on it. Its blocks are preallocated through the
// filesystem before the snapshot, their places on the device are read
// with FIEMAP, and from then on the file's bytes are read and written at
// those places on the real device (a mapped storage).

// Extent maps Length bytes of a file at Logical to the device at Physical.
type Extent struct {
	Logical  int64 `json:"logical"`
	Physical int64 `json:"physical"`
	Length   int64 `json:"length"`
}

// FIEMAP, linux/fiemap.h and linux/fs.h.
const (
	fsIocFiemap       = 0xC020660B
	fiemapFlagSync    = 0x1
	fiemapExtentLast  = 0x1
	fiemapBadFlags    = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x2000 // unknown, delalloc, encoded, encrypted, not aligned, inline, tail, shared
	fiemapHeaderBytes = 32
	fiemapExtentBytes = 56
)

// FileExtents returns where the first size bytes of the file at path lie
// on its device, after syncing it. It refuses a file with a hole in that
// range, or with extents a raw write would corrupt or could not reach
// (inline, delayed, encoded, encrypted, shared with another file) or that
// are not aligned to BlockSize.
func FileExtents(path string, size int64) ([]Extent, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	const batch = 256
	buf := make([]byte, fiemapHeaderBytes+batch*fiemapExtentBytes)
	var out []Extent
	for start := int64(0); start < size; {
		clear(buf)
		le := binary.NativeEndian
		le.PutUint64(buf[0:], uint64(start))
		le.PutUint64(buf[8:], uint64(size-start))
		le.PutUint32(buf[16:], fiemapFlagSync)
		le.PutUint32(buf[24:], batch)
		if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
			return nil, fmt.Errorf("FIEMAP %s: %w", path, errno)
		}
		n := int(le.Uint32(buf[20:]))
		if n == 0 {
			break
		}
		last := false
		for i := 0; i < n; i++ {
			e := buf[fiemapHeaderBytes+i*fiemapExtentBytes:]
			x := Extent{Logical: int64(le.Uint64(e[0:])), Physical: int64(le.Uint64(e[8:])), Length: int64(le.Uint64(e[16:]))}
			flags := le.Uint32(e[40:])
			if flags&fiemapBadFlags != 0 {
				return nil, fmt.Errorf("%s has an extent (flags %#x) that cannot be written on the device directly", path, flags)
			}
			if x.Logical%BlockSize != 0 || x.Physical%BlockSize != 0 || x.Length%BlockSize != 0 {
				return nil, fmt.Errorf("%s has an extent not aligned to %d bytes (filesystem block size below 4 KiB?)", path, BlockSize)
			}
			out = append(out, x)
			start = x.Logical + x.Length
			last = flags&fiemapExtentLast != 0
		}
		if last {
			break
		}
	}
	return checkExtents(path, out, size)
}

// checkExtents verifies that extents cover [0, size) without holes or
// overlaps, clipped to size.
func checkExtents(path string, xs []Extent, size int64) ([]Extent, error) {
	sort.Slice(xs, func(i, j int) bool { return xs[i].Logical < xs[j].Logical })
	var out []Extent
	pos := int64(0)
	for _, x := range xs {
		if pos >= size {
			break
		}
		if x.Logical != pos || x.Length <= 0 || x.Physical < 0 {
			return nil, fmt.Errorf("%s is not fully allocated at byte %d (a hole: it must be preallocated)", path, pos)
		}
		x.Length = min(x.Length, size-pos)
		out = append(out, x)
		pos += x.Length
	}
	if pos < size {
		return nil, fmt.Errorf("%s is not fully allocated at byte %d (a hole: it must be preallocated)", path, pos)
	}
	return out, nil
}

// mappedStorage is a COW file's bytes at its extents on the device, with
// O_DIRECT: what the device holds is what the file holds. Unaligned
// requests go through an aligned bounce buffer (read, modify, write).
type mappedStorage struct {
	dev     *os.File
	extents []Extent
	size    int64
	mu      sync.Mutex // serializes read-modify-write of partial blocks
}

func openMapped(device string, extents []Extent) (*mappedStorage, error) {
	if len(extents) == 0 {
		return nil, errors.New("no extents")
	}
	d, err := os.OpenFile(device, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		return nil, err
	}
	last := extents[len(extents)-1]
	return &mappedStorage{dev: d, extents: extents, size: last.Logical + last.Length}, nil
}

// pieces calls fn for each device range [phys, phys+n) backing the file
// range [off, off+len); it fails past the mapped size.
func (m *mappedStorage) pieces(off int64, n int, fn func(phys int64, lo, hi int) error) error {
	if off < 0 || off+int64(n) > m.size {
		return fmt.Errorf("byte range %d+%d is outside the file's %d mapped bytes", off, n, m.size)
	}
	i := sort.Search(len(m.extents), func(i int) bool { return m.extents[i].Logical+m.extents[i].Length > off })
	done := 0
	for done < n {
		x := m.extents[i]
		at := off + int64(done)
		k := int(min(int64(n-done), x.Logical+x.Length-at))
		if err := fn(x.Physical+(at-x.Logical), done, done+k); err != nil {
			return err
		}
		done += k
		i++
	}
	return nil
}

func aligned(p []byte, phys int64) bool {
	return phys%BlockSize == 0 && len(p)%BlockSize == 0 && uintptr(unsafe.Pointer(unsafe.SliceData(p)))%BlockSize == 0
}

func (m *mappedStorage) ReadAt(p []byte, off int64) (int, error) {
	err := m.pieces(off, len(p), func(phys int64, lo, hi int) error {
		q := p[lo:hi]
		if aligned(q, phys) {
			return preadAll(m.dev, q, phys)
		}
		start := phys / BlockSize * BlockSize
		end := (phys + int64(len(q)) + BlockSize - 1) / BlockSize * BlockSize
		b := dio.AlignedBuf(int(end - start))
		if err := preadAll(m.dev, b, start); err != nil {
			return err
		}
		copy(q, b[phys-start:])
		return nil
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

func (m *mappedStorage) WriteAt(p []byte, off int64) (int, error) {
	err := m.pieces(off, len(p), func(phys int64, lo, hi int) error {
		q := p[lo:hi]
		if aligned(q, phys) {
			_, err := m.dev.WriteAt(q, phys)
			return err
		}
		m.mu.Lock()
		defer m.mu.Unlock()
		start := phys / BlockSize * BlockSize
		end := (phys + int64(len(q)) + BlockSize - 1) / BlockSize * BlockSize
		b := dio.AlignedBuf(int(end - start))
		if phys != start || int64(len(q)) != end-start {
			if err := preadAll(m.dev, b, start); err != nil {
				return err
			}
		}
		copy(b[phys-start:], q)
		_, err := m.dev.WriteAt(b, start)
		return err
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

func (m *mappedStorage) Sync() error { return unix.Fdatasync(int(m.dev.Fd())) }

// Truncate only shrinks the mapped range: the file itself is truncated
// through its filesystem by whoever owns it, once the snapshot is over.
func (m *mappedStorage) Truncate(size int64) error {
	if size < m.size {
		m.size = size
	}
	return nil
}

func (m *mappedStorage) Close() error { return m.dev.Close() }

func preadAll(f *os.File, p []byte, off int64) error {
	n, err := f.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil {
		err = errors.New("short read")
	}
	return err
}

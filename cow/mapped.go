package cow

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/internal/dio"
	"github.com/dbdublk/dbdublk/internal/linux"
)

// A COW file on the snapshotted volume itself (dattobd's default layout)
// must not be written through the filesystem: those writes would come back
// through the very device being tracked, to be copied and tracked again,
// and could deadlock on it. Its blocks are preallocated through the
// filesystem before the snapshot, their places on the device are read
// with FIEMAP, and from then on the file's bytes are read and written at
// those places on the real device (DeviceStorage).

// Extent maps Length bytes of a file at Logical to the device at Physical.
type Extent = linux.Extent

// badExtentFlags are FIEMAP extent flags a raw write would corrupt or could
// not reach: unknown or delayed location, encoded, encrypted, not aligned,
// inline, tail-packed, shared with another file.
const badExtentFlags = linux.FiemapExtentUnknown | linux.FiemapExtentDelalloc | linux.FiemapExtentEncoded |
	linux.FiemapExtentDataEncrypted | linux.FiemapExtentNotAligned | linux.FiemapExtentDataInline |
	linux.FiemapExtentDataTail | linux.FiemapExtentShared

// FileExtents returns where the first size bytes of the file at path lie
// on its device, after syncing it (for a file written at its extents from
// then on: a COW file, a root volume's boot record). It refuses a file with a hole in that
// range, or with extents a raw write would corrupt or could not reach, or
// that are not aligned to BlockSize.
func FileExtents(f *os.File, path string, size int64) ([]Extent, error) {
	mapped, err := linux.Fiemap(int(f.Fd()), 0, uint64(size), linux.FiemapFlagSync)
	if err != nil {
		return nil, fmt.Errorf("FIEMAP %s: %w", path, err)
	}
	out := make([]Extent, 0, len(mapped))
	for _, x := range mapped {
		if x.Flags&badExtentFlags != 0 {
			return nil, fmt.Errorf("%s has an extent (flags %#x) that cannot be written on the device directly", path, x.Flags)
		}
		if x.Logical%BlockSize != 0 || x.Physical%BlockSize != 0 || x.Length%BlockSize != 0 {
			return nil, fmt.Errorf("%s has an extent not aligned to %d bytes (filesystem block size below 4 KiB?)", path, BlockSize)
		}
		out = append(out, x.Extent)
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

// deviceStorage is a COW file's bytes at its extents on the device, with
// O_DIRECT: what the device holds is what the file holds. Unaligned
// requests go through an aligned bounce buffer (read, modify, write).
type deviceStorage struct {
	dev     *os.File
	fd      int
	extents []Extent
	size    int64
	mu      sync.Mutex // serializes read-modify-write of partial blocks
}

// DeviceStorage is a COW file's bytes at its extents on device (sorted and
// without holes, as FileExtents returns them), read and written with
// O_DIRECT, never through the file's filesystem (which may not even be
// mounted). Its size is the end of the last extent; Truncate only lowers
// it: the file itself is truncated through its filesystem by whoever owns
// it, once the snapshot is over.
func DeviceStorage(device string, extents []Extent) (Storage, error) {
	d, err := os.OpenFile(device, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		return nil, err
	}
	size, err := d.Seek(0, io.SeekEnd) // a block device's size, or a stand-in file's
	if err != nil {
		d.Close()
		return nil, err
	}
	if err := checkMapping(extents, size); err != nil {
		d.Close()
		return nil, err
	}
	last := extents[len(extents)-1]
	return &deviceStorage{dev: d, fd: int(d.Fd()), extents: extents, size: last.Logical + last.Length}, nil
}

// checkMapping refuses extents (read back from a state file, so not to be
// trusted blindly) that do not map a file from byte 0 without holes, in
// order, each BlockSize-aligned, none overlapping another on the device,
// all inside a device of devSize bytes, and long enough for a header.
func checkMapping(extents []Extent, devSize int64) error {
	if len(extents) == 0 {
		return errors.New("no extents")
	}
	pos := int64(0)
	for _, x := range extents {
		switch {
		case x.Logical != pos || x.Length <= 0:
			return fmt.Errorf("extents do not map the file from byte 0 without holes or overlaps (at byte %d)", pos)
		case x.Physical%BlockSize != 0 || x.Length%BlockSize != 0:
			return fmt.Errorf("extent %+v is not aligned to %d bytes", x, BlockSize)
		case x.Physical < 0 || x.Physical > devSize-x.Length:
			return fmt.Errorf("extent %+v lies outside the %d-byte device", x, devSize)
		}
		pos += x.Length
	}
	if pos < HeaderSize {
		return fmt.Errorf("extents map %d bytes, less than a header", pos)
	}
	byPhys := slices.Clone(extents)
	slices.SortFunc(byPhys, func(a, b Extent) int { return cmp.Compare(a.Physical, b.Physical) })
	for i := 1; i < len(byPhys); i++ {
		if byPhys[i].Physical < byPhys[i-1].Physical+byPhys[i-1].Length {
			return fmt.Errorf("extents %+v and %+v overlap on the device", byPhys[i-1], byPhys[i])
		}
	}
	return nil
}

// pieces calls fn for each device range [phys, phys+n) backing the file
// range [off, off+len); it fails past the mapped size.
func (m *deviceStorage) pieces(off int64, n int, fn func(phys int64, lo, hi int) error) error {
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

// locate finds the block at off on the device (extents are BlockSize
// aligned, so a block is never split).
func (m *deviceStorage) locate(off int64) (int, int64, error) {
	var at int64
	err := m.pieces(off, BlockSize, func(phys int64, _, _ int) error { at = phys; return nil })
	return m.fd, at, err
}

func aligned(p []byte, phys int64) bool {
	return phys%BlockSize == 0 && dio.IsAligned(p)
}

func (m *deviceStorage) ReadAt(p []byte, off int64) (int, error) {
	err := m.pieces(off, len(p), func(phys int64, lo, hi int) error {
		q := p[lo:hi]
		if aligned(q, phys) {
			return dio.ReadFull(m.fd, q, phys)
		}
		start := phys / BlockSize * BlockSize
		end := (phys + int64(len(q)) + BlockSize - 1) / BlockSize * BlockSize
		b := dio.AlignedBuf(int(end - start))
		if err := dio.ReadFull(m.fd, b, start); err != nil {
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

func (m *deviceStorage) WriteAt(p []byte, off int64) (int, error) {
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
			if err := dio.ReadFull(m.fd, b, start); err != nil {
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

func (m *deviceStorage) Sync() error { return unix.Fdatasync(m.fd) }

// Truncate only shrinks the mapped range: the file itself is truncated
// through its filesystem by whoever owns it, once the snapshot is over.
func (m *deviceStorage) Truncate(size int64) error {
	if size < m.size {
		m.size = size
	}
	return nil
}

func (m *deviceStorage) Size() (int64, error) { return m.size, nil }

func (m *deviceStorage) Close() error { return m.dev.Close() }

package cow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// useSparse makes preallocation a plain ftruncate for the rest of the test,
// so that tests can use huge devices without filling the disk. Tests that
// use it must not run in parallel (it swaps a package variable).
func useSparse(t *testing.T) {
	t.Helper()
	old := preallocate
	preallocate = func(f *os.File, off, n int64) error {
		st, err := f.Stat()
		if err != nil {
			return err
		}
		if st.Size() < off+n {
			return f.Truncate(off + n)
		}
		return nil
	}
	t.Cleanup(func() { preallocate = old })
}

func tempPath(t testing.TB) string {
	return filepath.Join(t.TempDir(), "cow")
}

func mustCreate(t testing.TB, path string, opt Options) *File {
	t.Helper()
	f, err := Create(path, opt)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// openPath opens the COW file at path through its filesystem, in mode.
func openPath(path string, mode Mode, deviceSize, cacheBytes int64) (*File, Recovered, error) {
	s, err := FileStorage(path, mode == ReadOnly)
	if err != nil {
		return nil, Recovered{}, err
	}
	return Open(path, s, mode, deviceSize, cacheBytes)
}

func mustOpen(t *testing.T, path string, mode Mode, deviceSize, cacheBytes int64) *File {
	t.Helper()
	f, _, err := openPath(path, mode, deviceSize, cacheBytes)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// hookStorage is a file's storage that calls onWrite before every write
// (WriteAt and the bulk data path); a non-nil error fails the write
// unperformed. onWrite may block, to hold a copy in flight. Set it before
// the File is shared, or only between operations.
type hookStorage struct {
	*fileStorage
	onWrite func(p []byte, off int64) error
}

func (s *hookStorage) WriteAt(p []byte, off int64) (int, error) {
	if s.onWrite != nil {
		if err := s.onWrite(p, off); err != nil {
			return 0, err
		}
	}
	return s.fileStorage.WriteAt(p, off)
}

func (s *hookStorage) writeData(p []byte, off int64) (int, error) {
	if s.onWrite != nil {
		if err := s.onWrite(p, off); err != nil {
			return 0, err
		}
	}
	return s.fileStorage.writeData(p, off)
}

// openHooked opens the file at path for writing, in mode, through a
// hookStorage (returned, to set its hook).
func openHooked(t *testing.T, path string, mode Mode, deviceSize, cacheBytes int64) (*File, *hookStorage) {
	t.Helper()
	s, err := FileStorage(path, false)
	if err != nil {
		t.Fatal(err)
	}
	h := &hookStorage{fileStorage: s.(*fileStorage)}
	f, _, err := Open(path, h, mode, deviceSize, cacheBytes)
	if err != nil {
		t.Fatal(err)
	}
	return f, h
}

// errInjected is what a hookStorage fails a write with.
var errInjected = errors.New("injected write error")

// rawFile decodes a COW file the way dattobd and its update-img do,
// without this package's code: the header fields at their offsets, entry b
// at 4096+8*b, the data of slot s at s*4096.
type rawFile struct {
	t *testing.T
	b []byte
}

func readRaw(t *testing.T, path string) rawFile {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return rawFile{t, b}
}

func (r rawFile) u32(off int) uint32 { return binary.LittleEndian.Uint32(r.b[off:]) }
func (r rawFile) u64(off int) uint64 { return binary.LittleEndian.Uint64(r.b[off:]) }

func (r rawFile) magic() uint32   { return r.u32(0) }
func (r rawFile) flags() uint32   { return r.u32(4) }
func (r rawFile) fpos() uint64    { return r.u64(8) }
func (r rawFile) fsize() uint64   { return r.u64(16) }
func (r rawFile) seqid() uint64   { return r.u64(24) }
func (r rawFile) version() uint64 { return r.u64(48) }
func (r rawFile) nr() uint64      { return r.u64(56) }
func (r rawFile) uuid() (u [16]byte) {
	copy(u[:], r.b[32:48])
	return u
}
func (r rawFile) entry(b uint64) uint64 { return r.u64(4096 + 8*int(b)) }
func (r rawFile) slot(s uint64) []byte  { return r.b[s*4096 : s*4096+4096] }

func (r rawFile) reservedZero() bool {
	return bytes.Count(r.b[0x40:4096], []byte{0}) == 4096-0x40
}

// isZero reports whether the file holds only zeros in [off, off+n), reading
// it in chunks (the file may be a large sparse one).
func isZeroRange(t *testing.T, path string, off, n int64) bool {
	t.Helper()
	fh, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	buf := make([]byte, 1<<20)
	for n > 0 {
		c := min(n, int64(len(buf)))
		if _, err := fh.ReadAt(buf[:c], off); err != nil && !errors.Is(err, io.EOF) {
			t.Fatal(err)
		}
		for _, x := range buf[:c] {
			if x != 0 {
				return false
			}
		}
		off += c
		n -= c
	}
	return true
}

func fileLen(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// pattern is a deterministic 4 KiB block for (a, b).
func pattern(a, b uint64) []byte {
	p := make([]byte, BlockSize)
	for i := 0; i < BlockSize; i += 16 {
		binary.LittleEndian.PutUint64(p[i:], a)
		binary.LittleEndian.PutUint64(p[i+8:], b^uint64(i))
	}
	return p
}

// who is the first argument of the pattern that fills p (see pattern).
func who(p []byte) uint64 { return binary.LittleEndian.Uint64(p) }

package cow

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/internal/dio"
)

// TestMappedStorage: a file scattered over a device in shuffled extents
// reads and writes like a plain file, aligned or not, across extents.
func TestMappedStorage(t *testing.T) {
	dev := filepath.Join(t.TempDir(), "dev")
	const blocks = 64
	if err := os.WriteFile(dev, make([]byte, blocks*BlockSize), 0o600); err != nil {
		t.Fatal(err)
	}
	if f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0); err != nil {
		t.Skipf("O_DIRECT unsupported here: %v", err)
	} else {
		f.Close()
	}
	// 48 file blocks, each its own extent at a shuffled device place
	// (listed in reverse, as checkExtents must sort them).
	rng := rand.New(rand.NewPCG(1, 2))
	perm := rng.Perm(blocks)
	var xs []Extent
	for i := 47; i >= 0; i-- {
		xs = append(xs, Extent{Logical: int64(i) * BlockSize, Physical: int64(perm[i]) * BlockSize, Length: BlockSize})
	}
	xs, err := checkExtents("f", xs, 48*BlockSize)
	if err != nil {
		t.Fatal(err)
	}
	m, err := DeviceStorage(dev, xs)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if size, err := m.Size(); size != 48*BlockSize || err != nil {
		t.Fatalf("Size() = %d, %v", size, err)
	}
	model := make([]byte, 48*BlockSize)
	for range 300 {
		off := rng.Int64N(int64(len(model)) - 1)
		n := 1 + rng.IntN(min(3*BlockSize, len(model)-int(off)))
		if rng.IntN(3) == 0 { // aligned whole blocks
			off = off / BlockSize * BlockSize
			n = (1 + rng.IntN(3)) * BlockSize
			n = min(n, len(model)-int(off))
		}
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		if _, err := m.WriteAt(p, off); err != nil {
			t.Fatalf("write %d+%d: %v", off, n, err)
		}
		copy(model[off:], p)
		q := make([]byte, n)
		roff := rng.Int64N(int64(len(model) - n + 1))
		if _, err := m.ReadAt(q, roff); err != nil {
			t.Fatalf("read %d+%d: %v", roff, n, err)
		}
		if !bytes.Equal(q, model[roff:roff+int64(n)]) {
			t.Fatalf("read %d+%d differs from the model", roff, n)
		}
	}
	// What is on the device is the file, block by block, at the extents.
	raw, _ := os.ReadFile(dev)
	for _, x := range xs {
		if !bytes.Equal(raw[x.Physical:x.Physical+x.Length], model[x.Logical:x.Logical+x.Length]) {
			t.Fatalf("extent %+v does not hold the file's bytes", x)
		}
	}
	if _, err := m.WriteAt([]byte{1}, 48*BlockSize); err == nil {
		t.Fatal("a write past the mapped size was accepted")
	}
	// locate names the device place of every file block.
	for _, x := range xs {
		fd, at, err := m.(locator).locate(x.Logical)
		if err != nil || at != x.Physical {
			t.Fatalf("locate(%d) = %d, %v; want %d", x.Logical, at, err, x.Physical)
		}
		q := dio.AlignedBuf(BlockSize) // fd is the device's O_DIRECT descriptor
		if _, err := unix.Pread(fd, q, at); err != nil || !bytes.Equal(q, model[x.Logical:x.Logical+BlockSize]) {
			t.Fatalf("the block located for %d is not the file's (%v)", x.Logical, err)
		}
	}
	if _, _, err := m.(locator).locate(48 * BlockSize); err == nil {
		t.Fatal("locate past the mapped size succeeded")
	}
}

func TestCheckExtents(t *testing.T) {
	ok := []Extent{{Logical: 4096, Physical: 0, Length: 4096}, {Logical: 0, Physical: 8192, Length: 4096}}
	if got, err := checkExtents("f", ok, 8192); err != nil || got[0].Logical != 0 {
		t.Fatalf("%v %v", got, err)
	}
	if _, err := checkExtents("f", []Extent{{Logical: 0, Physical: 0, Length: 4096}, {Logical: 8192, Physical: 4096, Length: 4096}}, 12288); err == nil {
		t.Fatal("a hole was accepted")
	}
	if _, err := checkExtents("f", []Extent{{Logical: 0, Physical: 0, Length: 4096}}, 8192); err == nil {
		t.Fatal("a short map was accepted")
	}
	if got, _ := checkExtents("f", []Extent{{Logical: 0, Physical: 0, Length: 16384}}, 8192); got[0].Length != 8192 {
		t.Fatalf("not clipped: %v", got)
	}
}

func TestDeviceStorageRefusesBadExtents(t *testing.T) {
	dev := filepath.Join(t.TempDir(), "dev")
	if err := os.WriteFile(dev, make([]byte, 4*BlockSize), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, xs := range [][]Extent{
		nil,
		{{Logical: BlockSize, Physical: 0, Length: BlockSize}},                                              // not from byte 0
		{{Logical: 0, Physical: 0, Length: BlockSize}, {Logical: 2 * BlockSize, Physical: 0, Length: 4096}}, // a hole
		{{Logical: 0, Physical: 0, Length: 0}},
	} {
		if s, err := DeviceStorage(dev, xs); err == nil {
			s.Close()
			t.Errorf("DeviceStorage(%v) accepted", xs)
		}
	}
}

// fakeVolume creates a COW file on the temp filesystem and a sparse file
// standing in for the device under it, big enough for the file's extents:
// MoveToDevice then writes the stand-in at the file's real physical
// offsets, never the real device.
func fakeVolume(t *testing.T, opt Options) (path, dev string, f *File) {
	t.Helper()
	dir := t.TempDir()
	path, dev = filepath.Join(dir, "cow"), filepath.Join(dir, "dev")
	f = mustCreate(t, path, opt)
	t.Cleanup(func() { clearImmutable(path) })
	probe, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	xs, err := FileExtents(probe, path, int64(f.Header().FSize))
	probe.Close()
	if err != nil {
		f.Close(false)
		t.Skipf("FIEMAP unusable here: %v", err)
	}
	fh, err := os.OpenFile(dev, os.O_RDWR|os.O_CREATE|syscall.O_DIRECT, 0o600)
	if err != nil {
		f.Close(false)
		t.Skipf("O_DIRECT unsupported here: %v", err)
	}
	defer fh.Close()
	var end int64
	for _, x := range xs {
		end = max(end, x.Physical+x.Length)
	}
	if err := fh.Truncate(end); err != nil {
		f.Close(false)
		t.Fatal(err)
	}
	return path, dev, f
}

// TestMoveToDevice: a new file moved to its (stand-in) device reads and
// writes only there, at its extents; closed and reopened from the extents
// (ReloadSnapshot, then ReloadIncremental) it holds what was written.
func TestMoveToDevice(t *testing.T) {
	const devSize = 64 << 20
	path, dev, f := fakeVolume(t, Options{DeviceSize: devSize, FileSize: 2 << 20})
	defer func() {
		if f != nil {
			f.Close(false)
		}
	}()
	before := readRaw(t, path)
	if f.Mapped() {
		t.Fatal("a new file is mapped")
	}
	extents, err := f.MoveToDevice(dev)
	if err != nil {
		t.Fatal(err)
	}
	if !f.Mapped() || len(extents) == 0 {
		t.Fatalf("after MoveToDevice: mapped %v, %d extents", f.Mapped(), len(extents))
	}
	if _, err := f.MoveToDevice(dev); !errors.Is(err, ErrMode) {
		t.Fatalf("second MoveToDevice: %v", err)
	}
	if err := f.Expand(BlockSize); !errors.Is(err, ErrMode) || !strings.Contains(err.Error(), "snapshotted volume") {
		t.Fatalf("Expand on the device: %v", err)
	}
	if n, err := f.CopyOnWriteRange(10, blocksOf(3, 10, 20)); n != 20 || err != nil {
		t.Fatalf("CopyOnWriteRange: %d %v", n, err)
	}
	if _, err := f.MarkRange(100, 110); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(true); err != nil {
		t.Fatal(err)
	}
	f = nil
	// Nothing went through the filesystem after the move: the file still
	// holds the header Create wrote.
	if after := readRaw(t, path); !bytes.Equal(after.b[:HeaderSize], before.b[:HeaderSize]) {
		t.Fatal("the header was written through the filesystem")
	}
	// The device holds the file at its extents.
	fh, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	var img []byte
	for _, x := range extents {
		b := make([]byte, x.Length)
		if _, err := fh.ReadAt(b, x.Physical); err != nil {
			t.Fatal(err)
		}
		img = append(img, b...)
	}
	fh.Close()
	r := rawFile{t, img}
	if r.flags() != FlagClean || r.nr() != 30 || r.entry(100) != 1 {
		t.Fatalf("on the device: flags %#x, nr %d", r.flags(), r.nr())
	}
	for b := uint64(10); b < 30; b++ {
		if !bytes.Equal(r.slot(r.entry(b)), pattern(3, b)) {
			t.Fatalf("block %d: its slot on the device holds other data", b)
		}
	}
	// Reopened from its extents, without its filesystem.
	s, err := DeviceStorage(dev, extents)
	if err != nil {
		t.Fatal(err)
	}
	g, _, err := Open(path, s, ReloadSnapshot, devSize, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !g.Mapped() {
		t.Fatal("a file opened on its device is not mapped")
	}
	mustData(t, g, 15, pattern(3, 15))
	if err := g.TruncateToIndex(); err != nil {
		t.Fatal(err)
	}
	if err := g.Close(true); err != nil {
		t.Fatal(err)
	}
	s, err = DeviceStorage(dev, extents)
	if err != nil {
		t.Fatal(err)
	}
	g, rec, err := Open(path, s, ReloadIncremental, devSize, 0)
	if err != nil || rec.Crashed {
		t.Fatal(rec, err)
	}
	defer g.Close(false)
	var runs [][2]uint64
	g.ChangedRuns(func(a, n uint64) error { runs = append(runs, [2]uint64{a, n}); return nil })
	if !slices.Equal(runs, [][2]uint64{{10, 20}, {100, 10}}) {
		t.Fatalf("runs %v", runs)
	}
}

// TestMoveToDeviceRefuses: only a new file moves, and a failed move leaves
// the File on its filesystem, usable.
func TestMoveToDeviceRefuses(t *testing.T) {
	path, _, f := fakeVolume(t, Options{DeviceSize: 64 << 20, FileSize: 2 << 20})
	defer f.Close(false)
	if _, err := f.MoveToDevice(filepath.Join(filepath.Dir(path), "nodev")); err == nil || !strings.Contains(err.Error(), "nodev") {
		t.Fatalf("missing device: %v", err)
	}
	if f.Mapped() {
		t.Fatal("a failed move left the file mapped")
	}
	if n, err := f.CopyOnWriteRange(0, pattern(1, 0)); n != 1 || err != nil {
		t.Fatalf("copy after a failed move: %d %v", n, err)
	}
	if _, err := f.MoveToDevice(filepath.Join(filepath.Dir(path), "dev")); !errors.Is(err, ErrMode) {
		t.Fatalf("move of a used file: %v", err)
	}
}

// clearImmutable lets the test's directory be removed after MoveToDevice.
func clearImmutable(path string) {
	if fh, err := os.Open(path); err == nil {
		SetImmutable(fh, false)
		fh.Close()
	}
}

// A file moved to its device is immutable (rm and mv refuse it) and is
// found again only if its name still leads to that very inode.
func TestMovedFileIsPinned(t *testing.T) {
	const devSize = 16 << 20
	path, dev, f := fakeVolume(t, Options{DeviceSize: devSize, FileSize: 1 << 20})
	defer f.Close(false)
	if _, err := f.MoveToDevice(dev); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err == nil {
		t.Fatal("removed a COW file the server writes raw")
	}
	if err := os.Rename(path, path+".moved"); err == nil {
		t.Fatal("renamed a COW file the server writes raw")
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if f.Inode() != st.Ino {
		t.Fatalf("Inode() = %d, the file's is %d", f.Inode(), st.Ino)
	}
	fh, err := OpenVerified(path, uint64(st.Dev), f.Inode())
	if err != nil {
		t.Fatalf("OpenVerified of the file itself: %v", err)
	}
	if err := SetImmutable(fh, false); err != nil {
		t.Fatal(err)
	}
	fh.Close()
	// The name now leads elsewhere: a swapped file, a symbolic link.
	other := path + ".other"
	if err := os.WriteFile(other, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(other, path); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenVerified(path, uint64(st.Dev), f.Inode()); err == nil || !strings.Contains(err.Error(), "is not the file the server wrote") {
		t.Errorf("OpenVerified of a swapped file = %v", err)
	}
	os.Remove(path)
	if err := os.Symlink(other, path); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenVerified(path, uint64(st.Dev), f.Inode()); err == nil {
		t.Error("OpenVerified followed a symbolic link")
	}
}

// Names are never followed: Create refuses a planted symbolic link (even a
// dangling one) and FileStorage refuses to open through one.
func TestSymlinksRefused(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	link := filepath.Join(dir, "cow")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if _, err := Create(link, Options{DeviceSize: 1 << 20}); err == nil {
		t.Fatal("Create followed a dangling symbolic link")
	}
	if _, err := os.Lstat(target); err == nil {
		t.Fatal("Create made the link's target")
	}
	real := filepath.Join(dir, "real")
	mustCreate(t, real, Options{DeviceSize: 1 << 20, IndexOnly: true}).Close(true)
	os.Remove(link)
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	for _, ro := range []bool{true, false} {
		if _, err := FileStorage(link, ro); err == nil || !strings.Contains(err.Error(), "symbolic link") {
			t.Errorf("FileStorage(readOnly=%v) through a symbolic link: %v", ro, err)
		}
	}
}

func TestTruncatePinned(t *testing.T) {
	path, dev, f := fakeVolume(t, Options{DeviceSize: 16 << 20, FileSize: 1 << 20})
	defer f.Close(false)
	if _, err := f.MoveToDevice(dev); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	syscall.Stat(path, &st)
	fh, err := OpenVerified(path, uint64(st.Dev), f.Inode())
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	if err := TruncatePinned(fh, 8192); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Size() != 8192 {
		t.Errorf("size after TruncatePinned = %d", fi.Size())
	}
	if err := os.Remove(path); err == nil {
		t.Error("the file is no longer immutable after TruncatePinned")
	}
}

// Extents read back from a state file are checked before any byte is
// read or written through them.
func TestCheckMapping(t *testing.T) {
	const dev = 1 << 20
	x := func(l, p, n int64) Extent { return Extent{Logical: l, Physical: p, Length: n} }
	ok := []Extent{x(0, 8192, 4096), x(4096, 0, 8192)}
	if err := checkMapping(ok, dev); err != nil {
		t.Fatalf("valid mapping refused: %v", err)
	}
	for name, xs := range map[string][]Extent{
		"none":             nil,
		"hole":             {x(0, 0, 4096), x(8192, 8192, 4096)},
		"not from zero":    {x(4096, 0, 4096)},
		"unsorted":         {x(4096, 0, 4096), x(0, 4096, 4096)},
		"unaligned phys":   {x(0, 512, 4096)},
		"unaligned length": {x(0, 0, 4097)},
		"past the device":  {x(0, dev-4096, 8192)},
		"negative":         {x(0, -4096, 4096)},
		"overlap":          {x(0, 0, 8192), x(8192, 4096, 4096)},
		"empty length":     {x(0, 0, 0)},
		"too short":        {x(0, 0, 0)},
	} {
		if err := checkMapping(xs, dev); err == nil {
			t.Errorf("%s: mapping %v accepted", name, xs)
		}
	}
}

// TestMappedIndexWriteReadsNothing: on the device, an entry is written
// through as the whole index block from memory, with no read of the block
// first (a read-modify-write would double the I/O of every first write),
// and the block written holds the entries set before it too.
func TestMappedIndexWriteReadsNothing(t *testing.T) {
	path, dev, f := fakeVolume(t, Options{DeviceSize: 64 << 20, FileSize: 2 << 20})
	defer f.Close(false)
	if _, err := f.MoveToDevice(dev); err != nil {
		t.Fatal(err)
	}
	if n, err := f.CopyOnWriteRange(0, pattern(1, 0)); n != 1 || err != nil { // loads the index section
		t.Fatal(n, err)
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	idle := readSyscalls(t)
	idle = readSyscalls(t) - idle // what reading the counter itself costs
	before := readSyscalls(t)
	if n, err := f.CopyOnWriteRange(1, pattern(1, 1)); n != 1 || err != nil {
		t.Fatal(n, err)
	}
	if extra := readSyscalls(t) - before - idle; extra != 0 {
		t.Fatalf("a first write read %d times: the index block was read back to be modified", extra)
	}
	if err := f.Close(true); err != nil {
		t.Fatal(err)
	}
	s, err := DeviceStorage(dev, f.s.(*deviceStorage).extents)
	if err != nil {
		t.Fatal(err)
	}
	g, _, err := Open(path, s, ReloadSnapshot, 64<<20, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close(false)
	mustData(t, g, 0, pattern(1, 0))
	mustData(t, g, 1, pattern(1, 1))
}

// readSyscalls is the calling thread's count of read system calls: the
// process's would count other goroutines' reads too. The caller holds its
// OS thread (runtime.LockOSThread), and the copy it measures runs on it.
func readSyscalls(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/thread-self/io")
	if err != nil {
		t.Skipf("no /proc/thread-self/io: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "syscr: "); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	t.Skip("no syscr in /proc/thread-self/io")
	return 0
}

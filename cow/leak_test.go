package cow

import (
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// openFds returns the process's open descriptors and what they name.
func openFds(t *testing.T) map[int]string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	fds := map[int]string{}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil {
			fds[fd] = target // the directory listing's own descriptor is gone by now
		}
	}
	return fds
}

// TestFailuresLeakNoDescriptors runs Create, FileStorage, DeviceStorage,
// Open and MoveToDevice into every error path they have after opening
// something (the file, its O_DIRECT twin, the device), and checks that
// the process holds no more descriptors afterwards than before.
func TestFailuresLeakNoDescriptors(t *testing.T) {
	// No collection while it runs: the finalizer of a leaked *os.File
	// would close its descriptor and hide the leak.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	dir := t.TempDir()
	const dev = 64 << 20
	n := 0
	next := func() string { n++; return filepath.Join(dir, "cow"+strconv.Itoa(n)) }
	mustFail := func(what string, err error) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s succeeded", what)
		}
	}
	withPreallocate := func(fn func(f *os.File, off, n int64) error, body func()) {
		old := preallocate
		preallocate = fn
		defer func() { preallocate = old }()
		body()
	}
	devNull, err := unix.Open(os.DevNull, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(devNull)

	// Files to open: clean and dirty snapshots, a clean incremental, a
	// snapshot with a corrupt entry, an incremental with a torn record.
	clean := next()
	f := mustCreate(t, clean, Options{DeviceSize: dev, FileSize: 2 << 20})
	f.CopyOnWriteRange(0, blocksOf(1, 0, 4))
	f.Close(true)
	dirty := next()
	mustCreate(t, dirty, Options{DeviceSize: dev, FileSize: 2 << 20}).Close(false)
	inc := next()
	mustCreate(t, inc, Options{DeviceSize: dev, IndexOnly: true}).Close(true)
	badEntry := next()
	f = mustCreate(t, badEntry, Options{DeviceSize: dev, FileSize: 2 << 20})
	f.CopyOnWriteRange(0, pattern(1, 0))
	f.Close(false)
	writeAt(t, badEntry, []byte{3}, HeaderSize+8*1) // below the data store
	torn := next()
	f = mustCreate(t, torn, Options{DeviceSize: dev, IndexOnly: true})
	f.EnableIntent()
	if must, _ := f.MarkRange(1, 2); must {
		f.CommitIntent()
	}
	f.Close(false)
	raw, _ := os.ReadFile(torn)
	raw[intentOff+intentBitsOff] ^= 0x40
	os.WriteFile(torn, raw, 0o600)
	short := next()
	os.WriteFile(short, make([]byte, 100), 0o600)

	before := openFds(t)
	for range 5 {
		// Create: an existing path; preallocation fails; the header write
		// fails (its descriptor is swapped for a read-only one).
		_, err := Create(clean, Options{DeviceSize: dev})
		mustFail("Create over a file", err)
		withPreallocate(func(*os.File, int64, int64) error { return syscall.ENOSPC }, func() {
			_, err := Create(next(), Options{DeviceSize: dev})
			mustFail("Create without space", err)
		})
		withPreallocate(func(f *os.File, _, _ int64) error { return unix.Dup2(devNull, int(f.Fd())) }, func() {
			_, err := Create(next(), Options{DeviceSize: dev})
			mustFail("Create with a failing header write", err)
		})

		// FileStorage and DeviceStorage.
		_, err = FileStorage(filepath.Join(dir, "none"), false)
		mustFail("FileStorage of a missing file", err)
		_, err = FileStorage(dir, true)
		mustFail("FileStorage of a directory", err)
		_, err = DeviceStorage(filepath.Join(dir, "nodev"), []Extent{{Length: BlockSize}})
		mustFail("DeviceStorage of a missing device", err)

		// Open, into each refusal, read-only and for writing.
		for _, c := range []struct {
			path string
			mode Mode
			size int64
		}{
			{dirty, ReloadSnapshot, dev},
			{inc, ReloadSnapshot, dev},
			{clean, ReloadIncremental, dev},
			{clean, ReloadSnapshot, 0},
			{clean, ReloadSnapshot, 1 << 40},
			{clean, Mode(99), dev},
			{short, ReadOnly, 0},
			{short, ReloadSnapshot, dev},
			{badEntry, ResumeSnapshot, dev},
			{torn, ReloadIncremental, dev},
			{dirty, ReloadIncremental, dev},
		} {
			_, _, err := openPath(c.path, c.mode, c.size, 0)
			mustFail("Open of "+filepath.Base(c.path), err)
		}
		// A header write that fails once the File exists.
		s, err := FileStorage(clean, false)
		if err != nil {
			t.Fatal(err)
		}
		h := &hookStorage{fileStorage: s.(*fileStorage), onWrite: func([]byte, int64) error { return errInjected }}
		_, _, err = Open(clean, h, ReloadSnapshot, dev, 0)
		mustFail("Open with a failing header write", err)

		// A failed move, then a close; opens and closes that succeed.
		p := next()
		f := mustCreate(t, p, Options{DeviceSize: dev, FileSize: 2 << 20})
		_, err = f.MoveToDevice(filepath.Join(dir, "nodev"))
		mustFail("MoveToDevice to a missing device", err)
		if err := f.Close(true); err != nil {
			t.Fatal(err)
		}
		mustOpen(t, p, ReloadSnapshot, dev, 0).Close(true)
		mustOpen(t, p, ReadOnly, 0, 0).Close(false)
	}
	after := openFds(t)
	var leaked []string
	for fd, target := range after {
		if before[fd] != target {
			leaked = append(leaked, strconv.Itoa(fd)+" -> "+target)
		}
	}
	slices.Sort(leaked)
	if len(after) > len(before) || len(leaked) > 0 {
		t.Fatalf("%d descriptors open before, %d after; new: %v", len(before), len(after), leaked)
	}
}

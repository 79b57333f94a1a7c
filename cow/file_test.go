package cow

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func TestCreateLayout(t *testing.T) {
	path := tempPath(t)
	const dev = 100<<20 + 1 // a partial last block: rounded up
	f := mustCreate(t, path, Options{DeviceSize: dev, CacheBytes: 1 << 20})
	blocks := Blocks(dev)
	if blocks != 25601 || f.Blocks() != blocks {
		t.Fatalf("blocks %d / %d, want 25601", blocks, f.Blocks())
	}
	dataOff := DataOffset(blocks)
	if dataOff != HeaderSize+7*SectionBytes {
		t.Fatalf("data offset %d", dataOff)
	}
	wantSize := int64(10 << 20) // 10% of the device (rounded down, then up to 4 KiB)
	h := f.Header()
	if h.Flags != 0 || h.FPos != uint64(dataOff)/BlockSize || h.FSize != uint64(wantSize) ||
		h.SeqID != 1 || h.Version != Version || h.NrChangedBlocks != 0 {
		t.Fatalf("header %+v", h)
	}
	if h.UUID == ([16]byte{}) || h.UUID[6]>>4 != 4 || h.UUID[8]&0xC0 != 0x80 {
		t.Fatalf("uuid %x is not a random version 4 uuid", h.UUID)
	}
	// The file on disk: the whole size preallocated, a dirty header, zeros.
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != wantSize {
		t.Fatalf("file is %d bytes, want %d", st.Size(), wantSize)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Blocks*512 < wantSize {
		t.Fatalf("only %d bytes allocated of %d: not preallocated", sys.Blocks*512, wantSize)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", st.Mode())
	}
	r := readRaw(t, path)
	if r.magic() != Magic || r.flags() != 0 || r.fpos() != h.FPos || r.fsize() != h.FSize ||
		r.seqid() != 1 || r.uuid() != h.UUID || r.version() != 1 || r.nr() != 0 || !r.reservedZero() {
		t.Fatalf("raw header %x", r.b[:64])
	}
	if !isZeroRange(t, path, HeaderSize, wantSize-HeaderSize) {
		t.Fatal("index or data store of a new file is not zero")
	}
	for _, b := range []uint64{0, 1, 4095, 4096, blocks - 1} {
		if e, err := f.Lookup(b); e != 0 || err != nil {
			t.Fatalf("Lookup(%d) = %d, %v", b, e, err)
		}
	}
	if _, err := f.Lookup(blocks); err == nil {
		t.Fatal("Lookup past the last block succeeded")
	}
	if err := f.Close(true); err != nil {
		t.Fatal(err)
	}
	if r := readRaw(t, path); r.flags() != FlagClean {
		t.Fatalf("clean close left flags %#x", r.flags())
	}
	if _, err := f.Lookup(0); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("Lookup after Close: %v", err)
	}
	if err := f.Close(true); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("second Close: %v", err)
	}
}

func TestCreateSizes(t *testing.T) {
	useSparse(t)
	dir := t.TempDir()
	n := 0
	create := func(opt Options) (*File, error) {
		n++
		return Create(filepath.Join(dir, fmt.Sprint(n)), opt)
	}
	// Tiny device: 10% is less than the minimum data store.
	f, err := create(Options{DeviceSize: 8192})
	if err != nil {
		t.Fatal(err)
	}
	if h := f.Header(); h.FSize != HeaderSize+SectionBytes+MinDataBytes {
		t.Fatalf("tiny device: fsize %d", h.FSize)
	}
	f.Close(false)
	// Explicit size, rounded up to a block.
	f, err = create(Options{DeviceSize: 1 << 30, FileSize: 5<<20 + 1, SeqID: 9, UUID: [16]byte{7}})
	if err != nil {
		t.Fatal(err)
	}
	if h := f.Header(); h.FSize != 5<<20+4096 || h.SeqID != 9 || h.UUID != [16]byte{7} {
		t.Fatalf("explicit: %+v", h)
	}
	f.Close(false)
	// Exactly the index: a store with no slot (legal; full at once).
	dataOff := DataOffset(Blocks(1 << 30))
	f, err = create(Options{DeviceSize: 1 << 30, FileSize: dataOff})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.CopyOnWriteRange(0, pattern(0, 0)); !errors.Is(err, ErrFull) {
		t.Fatalf("copy into a store of 0 slots: %v", err)
	}
	f.Close(false)
	// Index only.
	f, err = create(Options{DeviceSize: 1 << 30, FileSize: 1 << 40, IndexOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if h := f.Header(); h.Flags != FlagIndexOnly || h.FSize != uint64(dataOff) || h.FPos != uint64(dataOff)/BlockSize {
		t.Fatalf("index only: %+v", h)
	}
	if l := fileLen(t, f.Path()); l != dataOff {
		t.Fatalf("index-only file is %d bytes, want %d", l, dataOff)
	}
	f.Close(false)
	for _, bad := range []Options{
		{DeviceSize: 0},
		{DeviceSize: -5},
		{DeviceSize: 1 << 30, FileSize: dataOff - BlockSize},
		{DeviceSize: 1 << 30, FileSize: -1},
		{DeviceSize: 1 << 30, FileSize: 1<<63 - 1},
	} {
		if f, err := create(bad); err == nil {
			f.Close(false)
			t.Errorf("Create(%+v) succeeded", bad)
		} else if !strings.Contains(err.Error(), "cow file ") {
			t.Errorf("Create(%+v): message %q does not name the file", bad, err)
		}
	}
}

func TestCreateErrors(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "cow")
	f := mustCreate(t, path, Options{DeviceSize: 1 << 20})
	f.Close(true)
	before := readRaw(t, path)

	_, err := Create(path, Options{DeviceSize: 1 << 20})
	if err == nil || err.Error() != "cow file "+path+" already exists" || !errors.Is(err, os.ErrExist) {
		t.Fatalf("existing path: %v", err)
	}
	if after := readRaw(t, path); !bytes.Equal(before.b, after.b) {
		t.Fatal("Create on an existing path changed it")
	}

	missing := filepath.Join(dir, "nodir", "cow")
	_, err = Create(missing, Options{DeviceSize: 1 << 20})
	if err == nil || !strings.Contains(err.Error(), "directory "+filepath.Join(dir, "nodir")+" does not exist") || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing directory: %v", err)
	}

	_, err = Create(filepath.Join(path, "cow"), Options{DeviceSize: 1 << 20})
	if err == nil || !strings.Contains(err.Error(), "is not a directory") {
		t.Fatalf("file as directory: %v", err)
	}
}

func TestCreateNoSpace(t *testing.T) {
	old := preallocate
	defer func() { preallocate = old }()
	preallocate = func(f *os.File, off, n int64) error {
		return &os.PathError{Op: "fallocate", Path: f.Name(), Err: syscall.ENOSPC}
	}
	path := tempPath(t)
	_, err := Create(path, Options{DeviceSize: 1 << 30})
	if err == nil || !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "not enough space to preallocate") {
		t.Fatalf("ENOSPC: %v", err)
	}
	if _, serr := os.Stat(path); !errors.Is(serr, os.ErrNotExist) {
		t.Fatalf("file left behind after a failed preallocation: %v", serr)
	}
	// Expand reports ENOSPC too and leaves fsize alone.
	preallocate = old
	f := mustCreate(t, path, Options{DeviceSize: 1 << 20})
	defer f.Close(false)
	h := f.Header()
	preallocate = func(f *os.File, off, n int64) error { return syscall.ENOSPC }
	if err := f.Expand(1 << 20); !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "not enough space") {
		t.Fatalf("Expand ENOSPC: %v", err)
	}
	if f.Header() != h {
		t.Fatalf("failed Expand changed the header: %+v", f.Header())
	}
}

func TestZeroFill(t *testing.T) {
	// Where fallocate is unsupported, allocation writes zeros after the
	// existing data and leaves that data alone.
	path := tempPath(t)
	if err := os.WriteFile(path, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	fh, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	if err := zeroFill(fh, 4, 3<<20+5); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	if len(b) != 3<<20+9 || string(b[:4]) != "keep" || !bytes.Equal(b[4:], make([]byte, len(b)-4)) {
		t.Fatalf("zero fill: %d bytes", len(b))
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := openPath(filepath.Join(dir, "none"), ReloadSnapshot, 1<<20, 0); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("missing: %v", err)
	}
	path := filepath.Join(dir, "cow")
	const dev = 64 << 20
	f := mustCreate(t, path, Options{DeviceSize: dev, FileSize: 8 << 20})
	if _, err := f.CopyOnWriteRange(3, pattern(1, 3)); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(false); err != nil {
		t.Fatal(err)
	}
	before := readRaw(t, path)
	if _, _, err := openPath(path, ReloadSnapshot, dev, 0); !errors.Is(err, ErrNotClean) || err.Error() != "cow file "+path+" not left in clean state (a snapshot cannot be trusted after a crash); a full backup is required" {
		t.Fatalf("dirty: %v", err)
	}
	if !bytes.Equal(before.b, readRaw(t, path).b) {
		t.Fatal("a refused Open changed the file")
	}
	// Make it clean by hand, then open it for the wrong device: a device so
	// large that its index would overlap the data slots.
	hb, _ := parseHeader(before.b[:HeaderSize])
	hb.Flags |= FlagClean
	raw, _ := hb.MarshalBinary()
	writeAt(t, path, raw, 0)
	if _, _, err := openPath(path, ReloadSnapshot, 1<<40, 0); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "another device") {
		t.Fatalf("wrong device: %v", err)
	}
	if _, _, err := openPath(path, ReloadSnapshot, 0, 0); err == nil {
		t.Fatal("device size 0 accepted")
	}
	// Truncated below its allocated size.
	if err := os.Truncate(path, 4<<20); err != nil {
		t.Fatal(err)
	}
	if _, _, err := openPath(path, ReloadSnapshot, dev, 0); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "truncated") {
		t.Fatalf("truncated: %v", err)
	}
	if err := os.Truncate(path, 8<<20); err != nil {
		t.Fatal(err)
	}
	g := mustOpen(t, path, ReloadSnapshot, dev, 0)
	// Open rewrote the header dirty, on disk, at once.
	if r := readRaw(t, path); r.flags()&FlagClean != 0 {
		t.Fatalf("open left the header clean on disk: %#x", r.flags())
	}
	if e, err := g.Lookup(3); err != nil || e != uint64(DataOffset(Blocks(dev)))/BlockSize {
		t.Fatalf("Lookup after reopen: %d, %v", e, err)
	}
	g.Close(true)
	// A directory and garbage.
	if _, _, err := openPath(dir, ReloadSnapshot, dev, 0); err == nil {
		t.Fatal("directory accepted")
	}
	junk := filepath.Join(dir, "junk")
	os.WriteFile(junk, bytes.Repeat([]byte{0x5A}, 10000), 0o600)
	if _, _, err := openPath(junk, ReloadSnapshot, dev, 0); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "bad magic") {
		t.Fatalf("junk: %v", err)
	}
}

func writeAt(t *testing.T, path string, b []byte, off int64) {
	t.Helper()
	fh, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	if _, err := fh.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func TestOpenReadOnlyBadFiles(t *testing.T) {
	dir := t.TempDir()
	// A valid index-only file and a valid snapshot file to cut down.
	inc := filepath.Join(dir, "inc")
	f := mustCreate(t, inc, Options{DeviceSize: 3 * 16 << 20, IndexOnly: true})
	f.MarkRange(5, 6)
	f.Close(true)
	snap := filepath.Join(dir, "snap")
	f = mustCreate(t, snap, Options{DeviceSize: 16 << 20, FileSize: 1 << 20})
	f.CopyOnWriteRange(0, blocksOf(0, 0, 10))
	f.Close(true)
	incB, _ := os.ReadFile(inc)
	snapB, _ := os.ReadFile(snap)
	rnd := make([]byte, 50000)
	rand.NewChaCha8([32]byte{1, 2}).Read(rnd)

	cases := []struct {
		name, msg string
		data      []byte
	}{
		{"empty", "is empty", nil},
		{"one byte", "truncated: 1 bytes", []byte{0xA8}},
		{"short header", "shorter than the 4096-byte header", incB[:2000]},
		{"garbage", "bad magic", rnd},
		{"zeros", "bad magic", make([]byte, 8192)},
		{"header only", "not a header plus whole", incB[:HeaderSize]},
		{"index cut", "not a header plus whole", incB[:HeaderSize+SectionBytes+100]},
		{"index cut at section", "not a header plus whole", incB[:HeaderSize+2*SectionBytes-8]},
		{"data cut", "data runs to byte", snapB[:HeaderSize+SectionBytes+5*BlockSize]},
		{"snapshot header only", "data runs to byte", snapB[:HeaderSize]},
	}
	for _, c := range cases {
		p := filepath.Join(dir, strings.ReplaceAll(c.name, " ", "_"))
		if err := os.WriteFile(p, c.data, 0o600); err != nil {
			t.Fatal(err)
		}
		g, _, err := openPath(p, ReadOnly, 0, 0)
		if err == nil {
			g.Close(false)
			t.Errorf("%s: accepted", c.name)
			continue
		}
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), c.msg) || !strings.HasPrefix(err.Error(), "cow file "+p) {
			t.Errorf("%s: %v (want ErrCorrupt mentioning %q)", c.name, err, c.msg)
		}
		if strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: message spans lines: %q", c.name, err)
		}
	}
	if _, _, err := openPath(dir, ReadOnly, 0, 0); err == nil || err.Error() != "cow file "+dir+" is not a regular file" {
		t.Errorf("directory: %v", err)
	}
	if _, _, err := openPath(filepath.Join(dir, "none"), ReadOnly, 0, 0); err == nil || err.Error() != "cow file "+filepath.Join(dir, "none")+" does not exist" {
		t.Errorf("missing: %v", err)
	}
}

func TestOpenReadOnly(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "cow")
	const dev = 3*16<<20 + 5 // 3 sections + 1 partial block: 4 sections
	f := mustCreate(t, path, Options{DeviceSize: dev, FileSize: 4 << 20})
	for _, b := range []uint64{0, 1, 2, 100} {
		if _, err := f.CopyOnWriteRange(b, pattern(9, b)); err != nil {
			t.Fatal(err)
		}
	}
	f.Close(true)

	// Snapshot mode: the index extent is not known without the device size.
	g := mustOpen(t, path, ReadOnly, 0, 0)
	if err := g.ChangedRuns(func(a, n uint64) error { return nil }); err == nil || !strings.Contains(err.Error(), "SetDeviceSize") {
		t.Fatalf("ChangedRuns without the device size: %v", err)
	}
	if _, err := g.CopyOnWriteRange(5, pattern(0, 0)); !errors.Is(err, ErrMode) {
		t.Fatalf("CopyOnWriteRange on a read-only file: %v", err)
	}
	if _, err := g.MarkRange(5, 6); !errors.Is(err, ErrMode) {
		t.Fatalf("MarkRange on a read-only file: %v", err)
	}
	if err := g.Expand(4096); !errors.Is(err, ErrMode) {
		t.Fatalf("Expand on a read-only file: %v", err)
	}
	if err := g.TruncateToIndex(); !errors.Is(err, ErrMode) {
		t.Fatalf("TruncateToIndex on a read-only file: %v", err)
	}
	if err := g.SetDeviceSize(1 << 40); err == nil {
		t.Fatal("SetDeviceSize accepted a device whose index would overlap the data")
	}
	if err := g.SetDeviceSize(dev); err != nil {
		t.Fatal(err)
	}
	if g.Blocks() != Blocks(dev) {
		t.Fatalf("blocks %d", g.Blocks())
	}
	var runs [][2]uint64
	if err := g.ChangedRuns(func(a, n uint64) error { runs = append(runs, [2]uint64{a, n}); return nil }); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(runs, [][2]uint64{{0, 3}, {100, 1}}) {
		t.Fatalf("runs %v", runs)
	}
	e, err := g.Lookup(100)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, BlockSize)
	if err := g.ReadBlock(e, p); err != nil || !bytes.Equal(p, pattern(9, 100)) {
		t.Fatalf("ReadBlock: %v", err)
	}
	if err := g.Sync(); err != nil {
		t.Fatal(err)
	}
	g.Close(true)
	if r := readRaw(t, path); r.flags() != FlagClean {
		t.Fatalf("flags %#x", r.flags())
	}

	// Index-only: the extent is exact.
	f = mustOpen(t, path, ReloadSnapshot, dev, 0)
	if err := f.TruncateToIndex(); err != nil {
		t.Fatal(err)
	}
	if err := f.SetDeviceSize(dev); !errors.Is(err, ErrMode) {
		t.Fatalf("SetDeviceSize on a read-write file: %v", err)
	}
	f.Close(true)
	// Read-only use never writes, not even on a clean close.
	r := readRaw(t, path)
	st0, _ := os.Stat(path)
	g = mustOpen(t, path, ReadOnly, 0, 0)
	if g.Blocks() != 4*SectionEntries {
		t.Fatalf("index-only blocks %d, want the capacity %d", g.Blocks(), 4*SectionEntries)
	}
	runs = nil
	if err := g.ChangedRuns(func(a, n uint64) error { runs = append(runs, [2]uint64{a, n}); return nil }); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(runs, [][2]uint64{{0, 3}, {100, 1}}) {
		t.Fatalf("index-only runs %v", runs)
	}
	for _, bad := range []int64{3 * 16 << 20, 4*16<<20 + 1, 1 << 30} {
		if err := g.SetDeviceSize(bad); err == nil || !strings.Contains(err.Error(), "index covers 4 sections") {
			t.Errorf("SetDeviceSize(%d): %v", bad, err)
		}
	}
	if err := g.SetDeviceSize(dev); err != nil || g.Blocks() != Blocks(dev) {
		t.Fatalf("SetDeviceSize(dev): %v, blocks %d", err, g.Blocks())
	}
	if err := g.ReadBlock(uint64(DataOffset(Blocks(dev)))/BlockSize, p); !errors.Is(err, ErrMode) {
		t.Fatalf("ReadBlock of an index-only file: %v", err)
	}
	g.Close(true)
	st1, _ := os.Stat(path)
	if !bytes.Equal(r.b, readRaw(t, path).b) || !st1.ModTime().Equal(st0.ModTime()) {
		t.Fatal("read-only use changed the file")
	}
}

// TestDattobdIndexOnlyFile opens an index-only file as dattobd leaves it:
// truncated to its index but with fpos and fsize of the old data store.
func TestDattobdIndexOnlyFile(t *testing.T) {
	path := tempPath(t)
	const dev = 2 * 16 << 20
	dataOff := DataOffset(Blocks(dev))
	h := Header{Flags: FlagClean | FlagIndexOnly | FlagVmallocUpper, FPos: uint64(dataOff)/BlockSize + 77,
		FSize: 10 << 20, SeqID: 4, Version: 1, NrChangedBlocks: 2, UUID: [16]byte{1}}
	b := make([]byte, dataOff)
	hb, _ := h.MarshalBinary()
	copy(b, hb)
	copy(b[HeaderSize+8*7:], []byte{1})                              // block 7 changed in incremental mode
	copy(b[HeaderSize+8*5000:], []byte{byte(dataOff/BlockSize + 3)}) // block 5000: a slot of the old store
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	g := mustOpen(t, path, ReadOnly, 0, 0)
	if g.Header().Flags != FlagClean|FlagIndexOnly {
		t.Fatalf("flags %#x", g.Header().Flags)
	}
	var runs [][2]uint64
	g.ChangedRuns(func(a, n uint64) error { runs = append(runs, [2]uint64{a, n}); return nil })
	if !slices.Equal(runs, [][2]uint64{{7, 1}, {5000, 1}}) {
		t.Fatalf("runs %v", runs)
	}
	g.Close(false)
	f := mustOpen(t, path, ReloadIncremental, dev, 0)
	if must, err := f.MarkRange(7, 9); must || err != nil || f.NrChangedBlocks() != 3 {
		t.Fatalf("MarkRange: %v %v %d", must, err, f.NrChangedBlocks())
	}
	f.Close(true)
	if r := readRaw(t, path); r.flags() != FlagClean|FlagIndexOnly || r.entry(8) != 1 || r.nr() != 3 || r.seqid() != 4 {
		t.Fatalf("after reload: flags %#x entry %d nr %d", r.flags(), r.entry(8), r.nr())
	}
}

func TestErrFullAndExpand(t *testing.T) {
	path := tempPath(t)
	const dev = 64 << 20
	dataOff := DataOffset(Blocks(dev))
	f := mustCreate(t, path, Options{DeviceSize: dev, FileSize: dataOff + 4*BlockSize})
	defer f.Close(false)
	first := uint64(dataOff) / BlockSize
	for b := range uint64(4) {
		if n, err := f.CopyOnWriteRange(b*1000, pattern(1, b)); n != 1 || err != nil {
			t.Fatalf("copy %d: %v %v", b, n, err)
		}
	}
	h := f.Header()
	length := fileLen(t, path)
	n, err := f.CopyOnWriteRange(4000, pattern(1, 4))
	if n != 0 || !errors.Is(err, ErrFull) || !errors.Is(err, syscall.EFBIG) {
		t.Fatalf("full store: %v %v", n, err)
	}
	if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "max size exceeded") {
		t.Fatalf("message %q", err)
	}
	if f.Header() != h || fileLen(t, path) != length {
		t.Fatalf("ErrFull changed something: %+v", f.Header())
	}
	if e, _ := f.Lookup(4000); e != 0 {
		t.Fatalf("entry %d after ErrFull", e)
	}
	// A block already copied still answers 0, nil.
	if n, err := f.CopyOnWriteRange(0, pattern(2, 0)); n != 0 || err != nil {
		t.Fatalf("copied block on a full store: %v %v", n, err)
	}
	// MarkRange needs no slot.
	if _, err := f.MarkRange(4001, 4002); err != nil {
		t.Fatalf("MarkRange on a full store: %v", err)
	}
	if e, _ := f.Lookup(4001); e != 1 {
		t.Fatalf("entry %d after MarkRange on a full store", e)
	}
	if err := f.Expand(1); err != nil { // rounded up to one block
		t.Fatal(err)
	}
	if g := f.Header(); g.FSize != h.FSize+BlockSize || g.FPos != h.FPos {
		t.Fatalf("after Expand: %+v", g)
	}
	if fileLen(t, path) != int64(h.FSize)+BlockSize {
		t.Fatalf("file is %d bytes after Expand", fileLen(t, path))
	}
	if n, err := f.CopyOnWriteRange(4000, pattern(1, 4)); n != 1 || err != nil {
		t.Fatalf("copy after Expand: %v %v", n, err)
	}
	if _, err := f.CopyOnWriteRange(5000, pattern(1, 5)); !errors.Is(err, ErrFull) {
		t.Fatalf("second full: %v", err)
	}
	if err := f.Expand(0); err == nil {
		t.Fatal("Expand(0) accepted")
	}
	p := make([]byte, BlockSize)
	for b := range uint64(5) {
		e, err := f.Lookup(b * 1000)
		if err != nil || e != first+b {
			t.Fatalf("block %d: slot %d, %v", b*1000, e, err)
		}
		if err := f.ReadBlock(e, p); err != nil || !bytes.Equal(p, pattern(1, b)) {
			t.Fatalf("slot of block %d changed: %v", b*1000, err)
		}
	}
	if n := f.NrChangedBlocks(); n != 6 {
		t.Fatalf("nr_changed %d, want 6", n)
	}
}

func TestCopyOnWriteErrors(t *testing.T) {
	path := tempPath(t)
	const dev = 1 << 20
	g := mustCreate(t, path, Options{DeviceSize: dev, FileSize: 1 << 20})
	g.Close(true)
	f, hs := openHooked(t, path, ReloadSnapshot, dev, 0)
	defer f.Close(false)
	h := f.Header()
	hs.onWrite = func(p []byte, off int64) error {
		if off >= HeaderSize+SectionBytes {
			return errInjected
		}
		return nil
	}
	if n, err := f.CopyOnWriteRange(1, pattern(1, 1)); n != 0 || !errors.Is(err, errInjected) || !strings.Contains(err.Error(), "write data slots") {
		t.Fatalf("failing data write: %v %v", n, err)
	}
	if f.Header() != h {
		t.Fatalf("failed copy changed the header: %+v", f.Header())
	}
	if e, _ := f.Lookup(1); e != 0 {
		t.Fatalf("entry %d after a failed copy", e)
	}
	// The block is free again after the failure, and gets the slot back.
	hs.onWrite = nil
	if n, err := f.CopyOnWriteRange(1, pattern(2, 1)); n != 1 || err != nil {
		t.Fatalf("copy after a failure: %v %v", n, err)
	}
	if g := f.Header(); g.FPos != h.FPos+1 || g.NrChangedBlocks != 1 {
		t.Fatalf("header %+v", g)
	}
	if e, _ := f.Lookup(1); e != h.FPos {
		t.Fatalf("block 1 in slot %d, want %d", e, h.FPos)
	}
	if _, err := f.CopyOnWriteRange(f.Blocks(), pattern(0, 0)); err == nil {
		t.Fatal("copy past the device accepted")
	}
	if _, err := f.MarkRange(f.Blocks(), f.Blocks()+1); err == nil {
		t.Fatal("MarkRange past the device accepted")
	}
	p := make([]byte, BlockSize)
	if err := f.ReadBlock(h.FPos, p[:100]); err == nil {
		t.Fatal("short buffer accepted")
	}
	if err := f.ReadBlock(1, p); err == nil {
		t.Fatal("slot 1 accepted")
	}
	if err := f.ReadBlock(h.FPos+1, p); err == nil {
		t.Fatal("unallocated slot accepted")
	}
	if err := f.ReadBlock(h.FPos, p); err != nil || !bytes.Equal(p, pattern(2, 1)) {
		t.Fatalf("ReadBlock: %v", err)
	}
}

func TestLookupRejectsCorruptEntry(t *testing.T) {
	path := tempPath(t)
	const dev = 1 << 20
	f := mustCreate(t, path, Options{DeviceSize: dev, FileSize: 1 << 20})
	f.CopyOnWriteRange(0, pattern(0, 0))
	f.Close(true)
	writeAt(t, path, []byte{5}, HeaderSize+8*1)   // below the data store
	writeAt(t, path, []byte{200}, HeaderSize+8*2) // beyond fpos
	g := mustOpen(t, path, ReloadSnapshot, dev, 0)
	defer g.Close(false)
	for _, b := range []uint64{1, 2} {
		if _, err := g.Lookup(b); !errors.Is(err, ErrCorrupt) {
			t.Errorf("Lookup(%d): %v", b, err)
		}
	}
	if e, err := g.Lookup(0); err != nil || e != uint64(DataOffset(Blocks(dev)))/BlockSize {
		t.Fatalf("Lookup(0): %d %v", e, err)
	}
}

func TestTruncateToIndex(t *testing.T) {
	path := tempPath(t)
	const dev = 5 * 16 << 20
	dataOff := DataOffset(Blocks(dev))
	f := mustCreate(t, path, Options{DeviceSize: dev, FileSize: 8 << 20, CacheBytes: SectionBytes})
	slots := map[uint64]uint64{}
	for _, b := range []uint64{3, 4097, 3 * 4096, 5*4096 - 1} {
		f.CopyOnWriteRange(b, pattern(2, b))
		slots[b], _ = f.Lookup(b)
	}
	f.MarkRange(70, 71)
	if err := f.TruncateToIndex(); err != nil {
		t.Fatal(err)
	}
	if l := fileLen(t, path); l != dataOff {
		t.Fatalf("truncated to %d, want %d", l, dataOff)
	}
	h := f.Header()
	if h.Flags != FlagIndexOnly || h.FSize != uint64(dataOff) || h.FPos != uint64(dataOff)/BlockSize || h.NrChangedBlocks != 5 {
		t.Fatalf("header %+v", h)
	}
	r := readRaw(t, path)
	if r.flags() != FlagIndexOnly || r.fsize() != h.FSize || r.entry(4097) != slots[4097] || r.entry(70) != 1 {
		t.Fatal("index or header not written back before truncation")
	}
	for b, s := range slots {
		if e, err := f.Lookup(b); e != s || err != nil {
			t.Fatalf("Lookup(%d) = %d, %v; want %d", b, e, err, s)
		}
	}
	if _, err := f.CopyOnWriteRange(9, pattern(2, 9)); !errors.Is(err, ErrMode) {
		t.Fatalf("CopyOnWriteRange after truncation: %v", err)
	}
	if err := f.Expand(1 << 20); !errors.Is(err, ErrMode) {
		t.Fatalf("Expand after truncation: %v", err)
	}
	if err := f.ReadBlock(slots[3], make([]byte, BlockSize)); !errors.Is(err, ErrMode) {
		t.Fatalf("ReadBlock after truncation: %v", err)
	}
	if _, err := f.MarkRange(9, 10); err != nil {
		t.Fatal(err)
	}
	if err := f.TruncateToIndex(); err != nil { // a retry is harmless
		t.Fatal(err)
	}
	f.Close(true)
	for _, mode := range []Mode{ReloadSnapshot, ResumeSnapshot} {
		if _, _, err := openPath(path, mode, dev, 0); !errors.Is(err, ErrChangeList) || !errors.Is(err, ErrMode) {
			t.Fatalf("a change list opened as a snapshot (mode %v): %v, want ErrChangeList", mode, err)
		}
	}
	g := mustOpen(t, path, ReloadIncremental, dev, 0)
	if g.Header().Flags != FlagIndexOnly || g.NrChangedBlocks() != 6 {
		t.Fatalf("reopened: %+v", g.Header())
	}
	g.Close(true)
}

func TestChangedRuns(t *testing.T) {
	path := tempPath(t)
	const nsect = 19 // more than two 8-section read chunks
	dev := int64(nsect-1)*SectionEntries*BlockSize + 3*BlockSize
	blocks := Blocks(dev)
	want := [][2]uint64{
		{0, 1}, {5, 5}, {4095, 3}, // across a section boundary
		{8*4096 - 2, 4},   // across a read-chunk boundary
		{10 * 4096, 4096}, // one whole section
		{11*4096 + 1, 1}, {11*4096 + 3, 1},
		{16*4096 - 1, 4096*2 + 1}, // chunk boundary inside, to the next chunk
		{blocks - 2, 2},           // the partial last section, up to the last block
	}
	f := mustCreate(t, path, Options{DeviceSize: dev, IndexOnly: true, CacheBytes: 2 * SectionBytes})
	rng := rand.New(rand.NewPCG(3, 4))
	var all []uint64
	for _, r := range want {
		for b := r[0]; b < r[0]+r[1]; b++ {
			all = append(all, b)
		}
	}
	rng.Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
	for i, b := range all {
		if _, err := f.MarkRange(b, b+1); err != nil || f.NrChangedBlocks() != uint64(i+1) {
			t.Fatalf("MarkRange(%d): %v, %d changed after %d marks", b, err, f.NrChangedBlocks(), i+1)
		}
	}
	collect := func(f *File) [][2]uint64 {
		var got [][2]uint64
		if err := f.ChangedRuns(func(a, n uint64) error { got = append(got, [2]uint64{a, n}); return nil }); err != nil {
			t.Fatal(err)
		}
		return got
	}
	// With dirty sections only in the cache, and after they reach the disk.
	if got := collect(f); !slices.Equal(got, want) {
		t.Fatalf("runs from the live file:\n got %v\nwant %v", got, want)
	}
	if f.CacheBytes() > 2*SectionBytes {
		t.Fatalf("cache %d", f.CacheBytes())
	}
	stop := errors.New("stop")
	n := 0
	if err := f.ChangedRuns(func(a, c uint64) error { n++; return stop }); err != stop || n != 1 {
		t.Fatalf("fn error: %v after %d calls", err, n)
	}
	f.Close(true)
	g := mustOpen(t, path, ReadOnly, 0, 0)
	defer g.Close(false)
	if got := collect(g); !slices.Equal(got, want) {
		t.Fatalf("runs from the read-only file:\n got %v\nwant %v", got, want)
	}
	if err := g.SetDeviceSize(dev); err != nil {
		t.Fatal(err)
	}
	if got := collect(g); !slices.Equal(got, want) {
		t.Fatalf("runs after SetDeviceSize: %v", got)
	}
}

func TestBoundedMemory(t *testing.T) {
	useSparse(t)
	path := tempPath(t)
	const dev = 1 << 40 // 2^28 blocks, a 2 GiB index, 65536 sections
	const limit = 64 << 10
	runtime.GC()
	var m0 runtime.MemStats
	runtime.ReadMemStats(&m0)
	f := mustCreate(t, path, Options{DeviceSize: dev, FileSize: DataOffset(Blocks(dev)) + 8<<20, CacheBytes: limit})
	if f.Blocks() != 1<<28 {
		t.Fatalf("blocks %d", f.Blocks())
	}
	rng := rand.New(rand.NewPCG(5, 6))
	touched := map[uint64]bool{}
	for i := range 3000 {
		b := rng.Uint64N(1 << 28)
		var err error
		if i%2 == 0 {
			_, err = f.CopyOnWriteRange(b, pattern(7, b))
		} else {
			_, err = f.MarkRange(b, b+1)
		}
		if err != nil {
			t.Fatal(err)
		}
		touched[b] = true
		if c := f.CacheBytes(); c > limit {
			t.Fatalf("cache %d bytes > limit %d", c, limit)
		}
		if i%100 == 0 {
			if _, err := f.Lookup(rng.Uint64N(1 << 28)); err != nil {
				t.Fatal(err)
			}
		}
	}
	f.SetCacheLimit(1)
	if c := f.CacheBytes(); c != SectionBytes {
		t.Fatalf("cache %d after SetCacheLimit(1), want one section", c)
	}
	runtime.GC()
	var m1 runtime.MemStats
	runtime.ReadMemStats(&m1)
	if grow := int64(m1.HeapAlloc) - int64(m0.HeapAlloc); grow > 4<<20 {
		t.Fatalf("heap grew by %d bytes for a 1 TiB device with a 64 KiB cache", grow)
	}
	if f.NrChangedBlocks() != uint64(len(touched)) {
		t.Fatalf("nr_changed %d, want %d", f.NrChangedBlocks(), len(touched))
	}
	if err := f.Close(true); err != nil {
		t.Fatal(err)
	}
	if testing.Short() {
		return
	}
	g := mustOpen(t, path, ReadOnly, 0, 0)
	defer g.Close(false)
	if err := g.SetDeviceSize(dev); err != nil {
		t.Fatal(err)
	}
	var seen uint64
	if err := g.ChangedRuns(func(a, n uint64) error {
		for b := a; b < a+n; b++ {
			if !touched[b] {
				return fmt.Errorf("block %d reported but never touched", b)
			}
		}
		seen += n
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if seen != uint64(len(touched)) {
		t.Fatalf("ChangedRuns saw %d blocks, want %d", seen, len(touched))
	}
}

// SlotSource names where a preserved block's bytes are, for reads made
// without the File: reading there gives what ReadBlock gives. A slot
// outside the data store, an index-only file and a closed one are refused.
func TestSlotSource(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cow")
	f, err := Create(path, Options{DeviceSize: 64 * BlockSize})
	if err != nil {
		t.Fatal(err)
	}
	old := bytes.Repeat([]byte("slot"), 2*BlockSize/4)
	old[BlockSize] = 'X'
	if _, err := f.CopyOnWriteRange(10, old); err != nil {
		t.Fatal(err)
	}
	for b := uint64(10); b < 12; b++ {
		e, err := f.Lookup(b)
		if err != nil || e <= 1 {
			t.Fatalf("Lookup(%d) = %d, %v", b, e, err)
		}
		fd, at, err := f.SlotSource(e)
		if err != nil {
			t.Fatal(err)
		}
		p := make([]byte, BlockSize)
		if _, err := unix.Pread(fd, p, at); err != nil || !bytes.Equal(p, old[(b-10)*BlockSize:(b-9)*BlockSize]) {
			t.Fatalf("block %d read at its slot source differs (%v)", b, err)
		}
	}
	if _, _, err := f.SlotSource(1 << 40); err == nil {
		t.Error("a slot past the data store was located")
	}
	if err := f.TruncateToIndex(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.SlotSource(f.firstSlot()); err == nil {
		t.Error("an index-only file located a slot")
	}
	f.Close(false)
	if _, _, err := f.SlotSource(f.firstSlot()); err == nil {
		t.Error("a closed file located a slot")
	}
}

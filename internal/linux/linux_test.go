package linux

import (
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The request numbers are the kernel's (the values <linux/fs.h> and
// <linux/fiemap.h> expand to on x86-64), and where x/sys names one, its value.
func TestIoctlNumbers(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uint64
	}{
		{"FIFREEZE", ioctlFIFREEZE, 0xC0045877},
		{"FITHAW", ioctlFITHAW, 0xC0045878},
		{"BLKZEROOUT", ioctlBLKZEROOUT, unix.BLKZEROOUT},
		{"BLKGETSIZE64", ioctlBLKGETSIZE64, unix.BLKGETSIZE64},
		{"BLKSSZGET", ioctlBLKSSZGET, unix.BLKSSZGET},
		{"BLKPBSZGET", ioctlBLKPBSZGET, unix.BLKPBSZGET},
		{"FS_IOC_FIEMAP", ioctlFIEMAP, 0xC020660B},
		{"FS_IOC_GETFLAGS", ioctlGETFLAGS, unix.FS_IOC_GETFLAGS},
		{"FS_IOC_SETFLAGS", ioctlSETFLAGS, unix.FS_IOC_SETFLAGS},
		{"FS_IMMUTABLE_FL", FlagImmutable, 0x10},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
}

// Layouts of struct fiemap and struct fiemap_extent (linux/fiemap.h).
func TestFiemapLayout(t *testing.T) {
	check := func(name string, got, want uintptr) {
		t.Helper()
		if got != want {
			t.Errorf("%s = %d, want %d", name, got, want)
		}
	}
	var h fiemapHeader
	check("sizeof(struct fiemap)", unsafe.Sizeof(h), sizeofFiemapHeader)
	check("fm_length", unsafe.Offsetof(h.Length), 8)
	check("fm_flags", unsafe.Offsetof(h.Flags), 16)
	check("fm_mapped_extents", unsafe.Offsetof(h.MappedExtents), 20)
	check("fm_extent_count", unsafe.Offsetof(h.ExtentCount), 24)
	var e fiemapExtent
	check("sizeof(struct fiemap_extent)", unsafe.Sizeof(e), sizeofFiemapExtent)
	check("fe_physical", unsafe.Offsetof(e.Physical), 8)
	check("fe_length", unsafe.Offsetof(e.Length), 16)
	check("fe_flags", unsafe.Offsetof(e.Flags), 40)
	var r fiemapRequest
	check("fm_extents", unsafe.Offsetof(r.extents), sizeofFiemapHeader)
}

// Fiemap on a real file of the host's filesystem: a fully written file is
// mapped without holes, in order, ending with the LAST flag.
func TestFiemapRealFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	data := make([]byte, 3<<20)
	for i := range data {
		data[i] = byte(i)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	xs, err := Fiemap(int(f.Fd()), 0, uint64(len(data)), FiemapFlagSync)
	if err != nil {
		t.Skipf("FIEMAP unsupported on the test directory's filesystem: %v", err)
	}
	if len(xs) == 0 {
		t.Fatal("no extents for a written file")
	}
	pos := int64(0)
	for _, x := range xs {
		if x.Logical != pos || x.Length <= 0 {
			t.Fatalf("extent %+v does not continue at %d", x, pos)
		}
		pos += x.Length
	}
	if pos < int64(len(data)) {
		t.Errorf("extents cover %d of %d bytes", pos, len(data))
	}
	if xs[len(xs)-1].Flags&FiemapExtentLast == 0 {
		t.Errorf("last extent lacks FIEMAP_EXTENT_LAST: %#x", xs[len(xs)-1].Flags)
	}
}

// Inode flags round trip on a real file (immutable needs CAP_LINUX_IMMUTABLE
// and a filesystem that supports it).
func TestInodeFlagsRealFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	flags, err := InodeFlags(int(f.Fd()))
	if err != nil {
		t.Skipf("FS_IOC_GETFLAGS unsupported here: %v", err)
	}
	if err := SetInodeFlags(int(f.Fd()), flags|FlagImmutable); err != nil {
		t.Skipf("cannot set the immutable flag here: %v", err)
	}
	defer SetInodeFlags(int(f.Fd()), flags)
	if err := os.Remove(path); err == nil {
		t.Fatal("removed an immutable file")
	}
	got, err := InodeFlags(int(f.Fd()))
	if err != nil || got&FlagImmutable == 0 {
		t.Fatalf("flags after set = %#x, %v", got, err)
	}
	if err := SetInodeFlags(int(f.Fd()), flags); err != nil {
		t.Fatal(err)
	}
}

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
	check := layoutChecker(t)
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

// Layouts of struct dm_ioctl and struct dm_target_spec (linux/dm-ioctl.h),
// and the request numbers (DM_DEV_CREATE is 0xc138fd03 on x86-64).
func TestDMLayout(t *testing.T) {
	check := layoutChecker(t)
	var h dmIoctlHeader
	check("sizeof(struct dm_ioctl)", unsafe.Sizeof(h), sizeofDMIoctl)
	check("data_size", unsafe.Offsetof(h.DataSize), 12)
	check("data_start", unsafe.Offsetof(h.DataStart), 16)
	check("target_count", unsafe.Offsetof(h.TargetCount), 20)
	check("open_count", unsafe.Offsetof(h.OpenCount), 24)
	check("flags", unsafe.Offsetof(h.Flags), 28)
	check("event_nr", unsafe.Offsetof(h.EventNr), 32)
	check("dev", unsafe.Offsetof(h.Dev), 40)
	check("name", unsafe.Offsetof(h.Name), 48)
	check("uuid", unsafe.Offsetof(h.UUID), 176)
	check("data", unsafe.Offsetof(h.Data), 305)
	var s dmTargetSpec
	check("sizeof(struct dm_target_spec)", unsafe.Sizeof(s), sizeofDMTarget)
	check("length", unsafe.Offsetof(s.Length), 8)
	check("status", unsafe.Offsetof(s.Status), 16)
	check("next", unsafe.Offsetof(s.Next), 20)
	check("target_type", unsafe.Offsetof(s.TargetType), 24)
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"DM_DEV_CREATE", dmIoctlNumber(dmDevCreateCmd), 0xc138fd03},
		{"DM_DEV_REMOVE", dmIoctlNumber(dmDevRemoveCmd), 0xc138fd04},
		{"DM_DEV_SUSPEND", dmIoctlNumber(dmDevSuspendCmd), 0xc138fd06},
		{"DM_DEV_STATUS", dmIoctlNumber(dmDevStatusCmd), 0xc138fd07},
		{"DM_TABLE_LOAD", dmIoctlNumber(dmTableLoadCmd), 0xc138fd09},
		{"DM_TABLE_CLEAR", dmIoctlNumber(dmTableClearCmd), 0xc138fd0a},
		{"DM_TABLE_STATUS", dmIoctlNumber(dmTableStatusCmd), 0xc138fd0c},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
}

// A table status answer, laid out as the kernel lays it out (each spec's
// next counted from the data's start, parameters 8-byte aligned), decodes
// to its targets; a truncated or looping answer is refused.
func TestParseDMTable(t *testing.T) {
	want := []DMTarget{
		{Start: 0, Length: 2048, Type: "linear", Params: "8:16 2048"},
		{Start: 2048, Length: 4096, Type: "crypt", Params: "aes-xts-plain64 :64:logon:k 0 8:32 4096"},
	}
	buf := make([]byte, 1024)
	off := sizeofDMIoctl
	for _, x := range want {
		spec := (*dmTargetSpec)(unsafe.Pointer(&buf[off]))
		spec.SectorStart, spec.Length = x.Start, x.Length
		copy(spec.TargetType[:], x.Type)
		copy(buf[off+sizeofDMTarget:], x.Params)
		off = alignDM(off + sizeofDMTarget + len(x.Params) + 1)
		spec.Next = uint32(off - sizeofDMIoctl)
	}
	got, err := parseDMTable(buf, sizeofDMIoctl, off, len(want))
	if err != nil || len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("parseDMTable = %v, %v; want %v", got, err, want)
	}
	if _, err := parseDMTable(buf, sizeofDMIoctl, sizeofDMIoctl+sizeofDMTarget+4, 2); err == nil {
		t.Error("a truncated answer was decoded")
	}
	(*dmTargetSpec)(unsafe.Pointer(&buf[sizeofDMIoctl])).Next = 0
	if _, err := parseDMTable(buf, sizeofDMIoctl, off, 2); err == nil {
		t.Error("an answer whose first spec points at itself was decoded")
	}
}

// layoutChecker checks one size or offset of a kernel struct.
func layoutChecker(t *testing.T) func(name string, got, want uintptr) {
	return func(name string, got, want uintptr) {
		t.Helper()
		if got != want {
			t.Errorf("%s = %d, want %d", name, got, want)
		}
	}
}

package state

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/linux"
)

// standInDevice is a file standing in for a volume, with a boot record at
// two scattered extents (as a filesystem might place it).
func standInDevice(t *testing.T) (string, *Boot) {
	t.Helper()
	dev := filepath.Join(t.TempDir(), "dev")
	if err := os.WriteFile(dev, make([]byte, 4<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0); err != nil {
		t.Skipf("O_DIRECT unsupported here: %v", err)
	} else {
		f.Close()
	}
	return dev, &Boot{File: "/.dbdctl-boot0", Inode: 12, Extents: []linux.Extent{
		{Logical: 0, Physical: 3 << 20, Length: 128 << 10},
		{Logical: 128 << 10, Physical: 1 << 20, Length: BootFileSize - 128<<10},
	}}
}

// A boot record reads back the newest record written; a write cut short
// (a torn or lost slot) leaves the record before it, never garbage; no
// valid slot is an error, not an empty record. Write keeps the state file
// in step.
func TestBootRecord(t *testing.T) {
	useDir(t)
	dev, boot := standInDevice(t)
	if _, err := ReadBoot(dev, boot.Extents); !errors.Is(err, ErrNoBootRecord) {
		t.Fatalf("blank boot record: got %v, want ErrNoBootRecord", err)
	}
	rec := func(mode dattobd.Mode, cow string) Record {
		return Record{Minor: 0, BlockDevice: dev, Mode: mode, CowFile: cow, Boot: boot}
	}
	writes := []Record{rec(dattobd.Passthrough, ""), rec(dattobd.Snapshot, "/.datto"), rec(dattobd.Incremental, "/.datto")}
	for i, r := range writes {
		if err := Write(r); err != nil {
			t.Fatal(err)
		}
		got, err := ReadBoot(dev, boot.Extents)
		if err != nil || got.Mode != r.Mode || got.CowFile != r.CowFile || got.Boot == nil || got.Boot.Inode != 12 {
			t.Fatalf("after write %d: got %+v, %v; want %+v", i, got, err, r)
		}
		if f, ok := Find(0); !ok || f.Mode != r.Mode {
			t.Fatalf("after write %d: state file says %+v", i, f)
		}
	}
	// The third write went to slot 0 (sequence 3), the second is in slot 1.
	// Tear the newest: the one before it comes back.
	tear := func(slotOff int64) {
		f, err := os.OpenFile(dev, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		phys := physical(boot.Extents, slotOff+bootHeader+5)
		if _, err := f.WriteAt([]byte("XX"), phys); err != nil {
			t.Fatal(err)
		}
	}
	tear(0)
	got, err := ReadBoot(dev, boot.Extents)
	if err != nil || got.Mode != dattobd.Snapshot {
		t.Fatalf("newest slot torn: got %+v, %v; want the snapshot record before it", got, err)
	}
	// The next write replaces the torn slot, not the good one.
	if err := Write(rec(dattobd.Incremental, "/.datto1")); err != nil {
		t.Fatal(err)
	}
	if got, err := ReadBoot(dev, boot.Extents); err != nil || got.CowFile != "/.datto1" {
		t.Fatalf("after rewriting: got %+v, %v", got, err)
	}
	tear(0)
	tear(bootSlotSize)
	if _, err := ReadBoot(dev, boot.Extents); !errors.Is(err, ErrNoBootRecord) {
		t.Fatalf("both slots torn: got %v, want ErrNoBootRecord", err)
	}
}

// A record too large for a slot is refused before anything is written.
func TestBootRecordTooLarge(t *testing.T) {
	useDir(t)
	dev, boot := standInDevice(t)
	r := Record{Minor: 0, BlockDevice: dev, Mode: dattobd.Incremental, CowFile: "/.datto", Boot: boot}
	for i := range 10000 {
		r.CowExtents = append(r.CowExtents, linux.Extent{Logical: int64(i) << 12, Physical: int64(i) << 13, Length: 4096})
	}
	if err := Write(r); err == nil {
		t.Fatal("a record larger than its slot was written")
	}
	if _, err := ReadBoot(dev, boot.Extents); !errors.Is(err, ErrNoBootRecord) {
		t.Fatalf("refused write left something: %v", err)
	}
	if _, ok := Find(0); ok {
		t.Fatal("refused write left a state file")
	}
}

// physical maps a byte of the boot record to the device.
func physical(xs []linux.Extent, off int64) int64 {
	for _, x := range xs {
		if off >= x.Logical && off < x.Logical+x.Length {
			return x.Physical + off - x.Logical
		}
	}
	panic("offset outside the extents")
}

package state

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"syscall"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/linux"
)

// A volume attached at boot (the root volume, from the initramfs) needs its
// record before any filesystem is mounted, and the record's own file lives
// on that very volume. So its record is also kept in a boot record: a
// preallocated, immutable file on the volume whose extents never move and
// are known to the initramfs (the hook copies the JSON record, extents
// included). Writes go to the extents on the device directly, in one of two
// slots, each with a sequence number and a CRC: a write cut short by a
// power cut leaves the other slot, the record as it was before, exactly as
// the JSON file's rename does. The JSON file stays the record everyone
// else reads; the boot record is what a boot trusts.

// Boot says a minor is attached at boot, from the initramfs, and where its
// boot record lies.
type Boot struct {
	// File is the boot record's path on the running system, Inode its
	// inode number (removing it checks it is still that file).
	File  string `json:"file"`
	Inode uint64 `json:"inode"`
	// Extents locate the boot record on the volume's device.
	Extents []linux.Extent `json:"extents"`
}

const (
	// BootFileSize is the boot record file's size: two slots.
	BootFileSize = 2 * bootSlotSize
	bootSlotSize = 256 << 10
	bootHeader   = 32
	bootMagic    = "DBDBOOT1"
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// ErrNoBootRecord is ReadBoot's error when neither slot holds a record.
var ErrNoBootRecord = errors.New("no valid boot record")

// CreateBootFile creates the boot record file at path, filled and synced
// so that its extents are allocated and written, pinned immutable so that
// nothing frees or moves them, and returns its Boot. Nothing is left behind
// on error.
func CreateBootFile(path string) (b *Boot, err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create boot record %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			cow.SetImmutable(f, false)
			f.Close()
			os.Remove(path)
		}
	}()
	if _, err := f.WriteAt(make([]byte, BootFileSize), 0); err != nil {
		return nil, fmt.Errorf("write boot record %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("fsync boot record %s: %w", path, err)
	}
	extents, err := cow.FileExtents(f, path, BootFileSize)
	if err != nil {
		return nil, err
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return nil, err
	}
	if err := cow.SetImmutable(f, true); err != nil {
		return nil, fmt.Errorf("boot record %s: its filesystem cannot mark it immutable (%v), so its blocks could move", path, err)
	}
	cow.DropCache(f)
	if err := f.Close(); err != nil {
		return nil, err
	}
	return &Boot{File: path, Inode: st.Ino, Extents: extents}, nil
}

// RemoveBootFile unpins and removes the boot record file b names, if it is
// still that file.
func RemoveBootFile(b *Boot) error {
	f, err := os.OpenFile(b.File, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return err
	}
	if st.Ino != b.Inode {
		return fmt.Errorf("boot record %s is not the file dbdctl created (inode %d, expected %d): left alone", b.File, st.Ino, b.Inode)
	}
	if err := cow.SetImmutable(f, false); err != nil {
		return err
	}
	return os.Remove(b.File)
}

// writeBoot writes r into the slot of its boot record on device that does
// not hold the newest record, and syncs it.
func writeBoot(device string, r Record) error {
	payload, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if len(payload) > bootSlotSize-bootHeader {
		return fmt.Errorf("minor %d's record (%d bytes) does not fit its boot record's %d-byte slot (its COW file has too many extents)",
			r.Minor, len(payload), bootSlotSize-bootHeader)
	}
	st, err := cow.DeviceStorage(device, r.Boot.Extents)
	if err != nil {
		return fmt.Errorf("open boot record on %s: %w", device, err)
	}
	defer st.Close()
	slots := readSlots(st)
	seq, slot := uint64(1), 0
	if newest := newestSlot(slots); newest >= 0 {
		seq, slot = slots[newest].seq+1, 1-newest
	}
	buf := make([]byte, (bootHeader+len(payload)+4095)&^4095)
	copy(buf, bootMagic)
	binary.LittleEndian.PutUint64(buf[8:], seq)
	binary.LittleEndian.PutUint32(buf[16:], uint32(len(payload)))
	copy(buf[bootHeader:], payload)
	binary.LittleEndian.PutUint32(buf[20:], crc32.Checksum(buf[8:20], crcTable)^crc32.Checksum(payload, crcTable))
	if _, err := st.WriteAt(buf, int64(slot)*bootSlotSize); err != nil {
		return fmt.Errorf("write boot record on %s: %w", device, err)
	}
	if err := st.Sync(); err != nil {
		return fmt.Errorf("flush boot record on %s: %w", device, err)
	}
	return nil
}

// ReadBoot reads the newest record from the boot record at extents on
// device: what a boot attaches the volume with.
func ReadBoot(device string, extents []linux.Extent) (Record, error) {
	st, err := cow.DeviceStorage(device, extents)
	if err != nil {
		return Record{}, fmt.Errorf("open boot record on %s: %w", device, err)
	}
	defer st.Close()
	slots := readSlots(st)
	newest := newestSlot(slots)
	if newest < 0 {
		return Record{}, fmt.Errorf("%s: %w at the recorded extents", device, ErrNoBootRecord)
	}
	var r Record
	if err := json.Unmarshal(slots[newest].payload, &r); err != nil {
		return Record{}, fmt.Errorf("%s: boot record: %w", device, err)
	}
	return r, nil
}

// bootSlot is one slot as read back; valid only if its magic and CRC hold.
type bootSlot struct {
	valid   bool
	seq     uint64
	payload []byte
}

func readSlots(st cow.Storage) [2]bootSlot {
	var slots [2]bootSlot
	buf := make([]byte, bootSlotSize)
	for i := range slots {
		if _, err := st.ReadAt(buf, int64(i)*bootSlotSize); err != nil {
			continue
		}
		slots[i] = parseSlot(buf)
	}
	return slots
}

func parseSlot(buf []byte) bootSlot {
	if !bytes.Equal(buf[:8], []byte(bootMagic)) {
		return bootSlot{}
	}
	seq := binary.LittleEndian.Uint64(buf[8:])
	n := binary.LittleEndian.Uint32(buf[16:])
	if int(n) > len(buf)-bootHeader {
		return bootSlot{}
	}
	payload := buf[bootHeader : bootHeader+int(n)]
	if crc32.Checksum(buf[8:20], crcTable)^crc32.Checksum(payload, crcTable) != binary.LittleEndian.Uint32(buf[20:]) {
		return bootSlot{}
	}
	return bootSlot{valid: true, seq: seq, payload: append([]byte(nil), payload...)}
}

// newestSlot is the valid slot with the higher sequence number, or -1.
func newestSlot(slots [2]bootSlot) int {
	newest := -1
	for i, s := range slots {
		if s.valid && (newest < 0 || s.seq > slots[newest].seq) {
			newest = i
		}
	}
	return newest
}

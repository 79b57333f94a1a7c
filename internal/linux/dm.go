package linux

import (
	"bytes"
	"errors"
	"fmt"
	"structs"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Device-mapper's ioctl interface (include/uapi/linux/dm-ioctl.h), spoken
// directly on /dev/mapper/control rather than through dmsetup: the server
// runs where no dmsetup may be installed (an initramfs), needs to read a
// table back exactly, and must not wait on udev, which may not run.

// dmIoctlHeader is struct dm_ioctl. Every request is this header followed
// by its data (target specs and their parameters, or the kernel's answer).
type dmIoctlHeader struct {
	_           structs.HostLayout
	Version     [3]uint32
	DataSize    uint32 // the whole buffer, header included
	DataStart   uint32 // where the data starts, from the header's start
	TargetCount uint32
	OpenCount   int32
	Flags       uint32
	EventNr     uint32 // in: the udev cookie; out: the event counter
	_           uint32
	Dev         uint64 // huge_encode_dev, the same as unix.Mkdev for these sizes
	Name        [dmNameLen]byte
	UUID        [dmUUIDLen]byte
	Data        [7]byte
}

// dmTargetSpec is struct dm_target_spec; the target's parameters follow it
// as a NUL-terminated string.
type dmTargetSpec struct {
	_           structs.HostLayout
	SectorStart uint64
	Length      uint64
	Status      int32
	// Next: in a table load, the offset of the next spec from this one;
	// in the kernel's answer, from the start of the data.
	Next       uint32
	TargetType [dmMaxTypeName]byte
}

const (
	dmNameLen        = 128
	dmUUIDLen        = 129
	dmMaxTypeName    = 16
	sizeofDMIoctl    = 312
	sizeofDMTarget   = 40
	dmIoctlType      = 0xfd
	dmVersionMajor   = 4
	dmDataAlign      = 8
	dmInitialBufSize = 16 << 10
)

// Device-mapper commands: _IOWR(0xfd, nr, struct dm_ioctl).
const (
	dmDevCreateCmd    = 3
	dmDevRemoveCmd    = 4
	dmDevSuspendCmd   = 6
	dmDevStatusCmd    = 7
	dmTableLoadCmd    = 9
	dmTableClearCmd   = 10
	dmTableStatusCmd  = 12
	dmIoctlDirReadWrt = iocRead | iocWrite
)

func dmIoctlNumber(nr uintptr) uintptr {
	return dmIoctlDirReadWrt<<30 | sizeofDMIoctl<<16 | dmIoctlType<<8 | nr
}

// Flags of struct dm_ioctl.
const (
	DMReadOnlyFlag        = 1 << 0
	DMSuspendFlag         = 1 << 1
	dmStatusTableFlag     = 1 << 4
	DMActivePresentFlag   = 1 << 5
	DMInactivePresentFlag = 1 << 6
	dmBufferFullFlag      = 1 << 8
	DMSkipLockfsFlag      = 1 << 10
	DMNoflushFlag         = 1 << 11
	// dmSecureDataFlag has the kernel wipe its copies of the buffer: a
	// dm-crypt table carries its key.
	dmSecureDataFlag = 1 << 15
)

// Udev flags, passed to udev in the upper half of the cookie (the rules of
// 10-dm.rules decode them): a device the server keeps for itself gets no
// /dev/disk links and no filesystem probing, as LVM's -real devices.
const (
	dmUdevFlagsShift                   = 16
	DMUdevDisableSubsystemRules        = 0x0002
	DMUdevDisableDiskRules             = 0x0004
	DMUdevDisableOtherRules            = 0x0008
	DMUdevPrimarySource                = 0x0040
	DMUdevHidden                       = DMUdevDisableSubsystemRules | DMUdevDisableDiskRules | DMUdevDisableOtherRules | DMUdevPrimarySource
	DMUdevVisible               uint16 = DMUdevPrimarySource
)

// DMTarget is one line of a device-mapper table: Length sectors from
// Start served by a target of Type with its Params ("252:0 2048").
type DMTarget struct {
	Start  uint64 `json:"start"`
	Length uint64 `json:"length"`
	Type   string `json:"type"`
	Params string `json:"params"`
}

// String is the line as dmsetup table prints it.
func (t DMTarget) String() string {
	return fmt.Sprintf("%d %d %s %s", t.Start, t.Length, t.Type, t.Params)
}

// DMID names a device-mapper device: by name, or (Name empty) by number.
type DMID struct {
	Name string
	Dev  uint64
}

func (id DMID) String() string {
	if id.Name != "" {
		return id.Name
	}
	return fmt.Sprintf("%d:%d", unix.Major(id.Dev), unix.Minor(id.Dev))
}

// DMInfo is what the kernel says of a device.
type DMInfo struct {
	Name        string
	UUID        string
	Dev         uint64
	OpenCount   int32
	Flags       uint32
	EventNr     uint32
	TargetCount uint32
}

// Suspended reports whether the device is suspended.
func (i DMInfo) Suspended() bool { return i.Flags&DMSuspendFlag != 0 }

// DMControl is an open /dev/mapper/control.
type DMControl struct{ fd int }

// OpenDMControl opens device-mapper's control device (dm-mod loaded).
func OpenDMControl() (*DMControl, error) {
	fd, err := unix.Open("/dev/mapper/control", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		// No node without udev or devtmpfs' help: make it (misc 10:236).
		if mkErr := makeControlNode(); mkErr == nil {
			fd, err = unix.Open("/dev/mapper/control", unix.O_RDWR|unix.O_CLOEXEC, 0)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("open /dev/mapper/control (is dm-mod loaded?): %w", err)
	}
	return &DMControl{fd: fd}, nil
}

func makeControlNode() error {
	if err := unix.Mkdir("/dev/mapper", 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
		return err
	}
	return unix.Mknod("/dev/mapper/control", unix.S_IFCHR|0o600, int(unix.Mkdev(10, 236)))
}

// Close closes the control device.
func (c *DMControl) Close() error { return unix.Close(c.fd) }

// Create makes an empty device (no table; suspended).
func (c *DMControl) Create(name, uuid string, udev uint16) (DMInfo, error) {
	req, err := newDMRequest(DMID{Name: name}, 0)
	if err != nil {
		return DMInfo{}, err
	}
	if len(uuid) >= dmUUIDLen {
		return DMInfo{}, fmt.Errorf("device-mapper uuid %q is too long", uuid)
	}
	copy(req.header().UUID[:], uuid)
	req.header().EventNr = uint32(udev) << dmUdevFlagsShift
	if err := c.do(dmDevCreateCmd, req); err != nil {
		return DMInfo{}, fmt.Errorf("create device-mapper device %s: %w", name, err)
	}
	return req.info(), nil
}

// Load puts table in the device's inactive slot; Resume makes it live.
func (c *DMControl) Load(id DMID, table []DMTarget, readOnly bool) error {
	size := sizeofDMIoctl
	for _, t := range table {
		if len(t.Type) >= dmMaxTypeName {
			return fmt.Errorf("target type %q is too long", t.Type)
		}
		size += alignDM(sizeofDMTarget + len(t.Params) + 1)
	}
	req, err := newDMRequest(id, size)
	if err != nil {
		return err
	}
	defer req.wipe()
	h := req.header()
	h.TargetCount = uint32(len(table))
	h.Flags |= dmSecureDataFlag
	if readOnly {
		h.Flags |= DMReadOnlyFlag
	}
	off := sizeofDMIoctl
	for _, t := range table {
		spec := (*dmTargetSpec)(unsafe.Pointer(&req.buf[off]))
		spec.SectorStart, spec.Length = t.Start, t.Length
		copy(spec.TargetType[:], t.Type)
		n := alignDM(sizeofDMTarget + len(t.Params) + 1)
		spec.Next = uint32(n)
		copy(req.buf[off+sizeofDMTarget:], t.Params)
		off += n
	}
	if err := c.do(dmTableLoadCmd, req); err != nil {
		return fmt.Errorf("load a table into %s: %w", id, err)
	}
	return nil
}

// ClearInactive drops a table loaded but not resumed.
func (c *DMControl) ClearInactive(id DMID) error {
	req, err := newDMRequest(id, 0)
	if err != nil {
		return err
	}
	if err := c.do(dmTableClearCmd, req); err != nil {
		return fmt.Errorf("clear the inactive table of %s: %w", id, err)
	}
	return nil
}

// Suspend waits for the device's I/O in flight and holds new I/O; with
// lockfs (DMSkipLockfsFlag not set) the filesystem on it is frozen first.
func (c *DMControl) Suspend(id DMID, flags uint32) error {
	req, err := newDMRequest(id, 0)
	if err != nil {
		return err
	}
	req.header().Flags = DMSuspendFlag | flags
	if err := c.do(dmDevSuspendCmd, req); err != nil {
		return fmt.Errorf("suspend %s: %w", id, err)
	}
	return nil
}

// Resume makes a loaded table live (if any) and lets I/O flow again.
func (c *DMControl) Resume(id DMID, udev uint16) (DMInfo, error) {
	req, err := newDMRequest(id, 0)
	if err != nil {
		return DMInfo{}, err
	}
	req.header().EventNr = uint32(udev) << dmUdevFlagsShift
	if err := c.do(dmDevSuspendCmd, req); err != nil {
		return DMInfo{}, fmt.Errorf("resume %s: %w", id, err)
	}
	return req.info(), nil
}

// Remove deletes a device that nobody holds open.
func (c *DMControl) Remove(id DMID, udev uint16) error {
	req, err := newDMRequest(id, 0)
	if err != nil {
		return err
	}
	req.header().EventNr = uint32(udev) << dmUdevFlagsShift
	if err := c.do(dmDevRemoveCmd, req); err != nil {
		return fmt.Errorf("remove device-mapper device %s: %w", id, err)
	}
	return nil
}

// Info says whether and how a device exists.
func (c *DMControl) Info(id DMID) (DMInfo, error) {
	req, err := newDMRequest(id, 0)
	if err != nil {
		return DMInfo{}, err
	}
	if err := c.do(dmDevStatusCmd, req); err != nil {
		return DMInfo{}, fmt.Errorf("device-mapper device %s: %w", id, err)
	}
	return req.info(), nil
}

// Table reads the device's live table back, as dmsetup table prints it.
func (c *DMControl) Table(id DMID) ([]DMTarget, DMInfo, error) {
	for size := dmInitialBufSize; ; size *= 2 {
		req, err := newDMRequest(id, size)
		if err != nil {
			return nil, DMInfo{}, err
		}
		defer req.wipe()
		req.header().Flags = dmStatusTableFlag | dmSecureDataFlag
		if err := c.do(dmTableStatusCmd, req); err != nil {
			return nil, DMInfo{}, fmt.Errorf("read the table of %s: %w", id, err)
		}
		h := req.header()
		if h.Flags&dmBufferFullFlag != 0 {
			if size >= 64<<20 {
				return nil, DMInfo{}, fmt.Errorf("the table of %s does not fit in %d bytes", id, size)
			}
			continue
		}
		table, err := parseDMTable(req.buf, int(h.DataStart), int(h.DataSize), int(h.TargetCount))
		if err != nil {
			return nil, DMInfo{}, fmt.Errorf("the table of %s: %w", id, err)
		}
		return table, req.info(), nil
	}
}

// parseDMTable decodes the kernel's answer to a table status: count specs,
// each followed by its parameters, each spec's Next counted from start.
func parseDMTable(buf []byte, start, end, count int) ([]DMTarget, error) {
	if start < sizeofDMIoctl || end > len(buf) || start > end {
		return nil, fmt.Errorf("data %d..%d outside the %d-byte answer", start, end, len(buf))
	}
	table := make([]DMTarget, 0, count)
	off := start
	for i := 0; i < count; i++ {
		if off+sizeofDMTarget > end {
			return nil, fmt.Errorf("target %d lies past the answer's end", i)
		}
		spec := (*dmTargetSpec)(unsafe.Pointer(&buf[off]))
		params := buf[off+sizeofDMTarget : end]
		n := bytes.IndexByte(params, 0)
		if n < 0 {
			return nil, fmt.Errorf("target %d's parameters are not terminated", i)
		}
		table = append(table, DMTarget{
			Start:  spec.SectorStart,
			Length: spec.Length,
			Type:   cString(spec.TargetType[:]),
			Params: string(params[:n]),
		})
		next := start + int(spec.Next)
		if i < count-1 && next <= off {
			return nil, fmt.Errorf("target %d's next offset %d goes backwards", i, spec.Next)
		}
		off = next
	}
	return table, nil
}

// dmRequest is one ioctl buffer: the header, then room for data.
type dmRequest struct{ buf []byte }

func newDMRequest(id DMID, size int) (*dmRequest, error) {
	size = max(size, sizeofDMIoctl)
	// 8-byte aligned backing, as the kernel's structs need.
	words := make([]uint64, (size+7)/8)
	r := &dmRequest{buf: unsafe.Slice((*byte)(unsafe.Pointer(&words[0])), len(words)*8)}
	h := r.header()
	h.Version = [3]uint32{dmVersionMajor, 0, 0}
	h.DataSize = uint32(len(r.buf))
	h.DataStart = sizeofDMIoctl
	if len(id.Name) >= dmNameLen {
		return nil, fmt.Errorf("device-mapper name %q is too long", id.Name)
	}
	copy(h.Name[:], id.Name)
	if id.Name == "" {
		h.Dev = id.Dev
	}
	return r, nil
}

// wipe zeroes the buffer, which may have held a dm-crypt key.
func (r *dmRequest) wipe() { clear(r.buf) }

func (r *dmRequest) header() *dmIoctlHeader { return (*dmIoctlHeader)(unsafe.Pointer(&r.buf[0])) }

func (r *dmRequest) info() DMInfo {
	h := r.header()
	return DMInfo{
		Name: cString(h.Name[:]), UUID: cString(h.UUID[:]), Dev: h.Dev,
		OpenCount: h.OpenCount, Flags: h.Flags, EventNr: h.EventNr, TargetCount: h.TargetCount,
	}
}

func (c *DMControl) do(nr uintptr, r *dmRequest) error {
	return ioctl(c.fd, dmIoctlNumber(nr), unsafe.Pointer(&r.buf[0]))
}

func alignDM(n int) int { return (n + dmDataAlign - 1) &^ (dmDataAlign - 1) }

func cString(b []byte) string {
	if n := bytes.IndexByte(b, 0); n >= 0 {
		b = b[:n]
	}
	return string(b)
}

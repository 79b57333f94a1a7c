// Package blockdev is the host's block devices as the daemon sees them:
// the real device it serves (opened exclusively, with O_DIRECT), and what
// mountinfo and sysfs say about a device.
package blockdev

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/internal/linux"
)

// Device is the real device behind a front device, opened exclusively
// (O_EXCL) so nobody mounts or writes it behind the server's back, and with
// O_DIRECT so the server's I/O bypasses the page cache: what the server
// acknowledges is what the device received.
type Device struct {
	Path               string
	Rdev               uint64
	LogicalBlockSize   int
	PhysicalBlockSize  int
	DiscardGranularity int // 0 when the device cannot discard
	// DMAAlignment is the memory alignment its O_DIRECT I/O needs, a mask
	// (sysfs queue/dma_alignment, e.g. 511); 0 where sysfs does not say.
	DMAAlignment int
	size         int64
	fd           int
}

// ErrBusy is Open's error for a device held open exclusively elsewhere
// (mounted, attached, or held by a driver).
var ErrBusy = errors.New("device busy")

// busyError is a one-line message that matches ErrBusy.
type busyError string

func (e busyError) Error() string { return string(e) }
func (e busyError) Unwrap() error { return ErrBusy }

// Open checks path and opens it for serving.
func Open(path string) (*Device, error) {
	rdev, err := Rdev(path)
	if err != nil {
		return nil, err
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return nil, busyError(path + " is in use (mounted, attached, or held by another driver)")
		}
		if errors.Is(err, unix.EROFS) || errors.Is(err, unix.EACCES) {
			return nil, fmt.Errorf("%s cannot be opened for writing: %w", path, err)
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	d := &Device{Path: path, Rdev: rdev, fd: fd}
	if err := d.probe(); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return d, nil
}

// Rdev returns the device number of the block device at path, with a
// one-line error naming the problem when path is not one.
func Rdev(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return 0, fmt.Errorf("%s does not exist", path)
		}
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return 0, fmt.Errorf("%s is not a block device", path)
	}
	return uint64(st.Rdev), nil
}

// Same reports whether a and b are the same block device.
func Same(a, b string) bool {
	ra, err1 := Rdev(a)
	rb, err2 := Rdev(b)
	return err1 == nil && err2 == nil && ra == rb
}

func (d *Device) probe() error {
	size, err := linux.DeviceSize(d.fd)
	if err != nil {
		return fmt.Errorf("%s: read size: %w", d.Path, err)
	}
	if size == 0 {
		return fmt.Errorf("%s has size 0", d.Path)
	}
	lbs, err := linux.LogicalBlockSize(d.fd)
	if err != nil {
		return fmt.Errorf("%s: read logical block size: %w", d.Path, err)
	}
	pbs, err := linux.PhysicalBlockSize(d.fd)
	if err != nil || pbs < lbs {
		pbs = lbs
	}
	d.size, d.LogicalBlockSize, d.PhysicalBlockSize = int64(size), lbs, pbs
	q := sysfsDir(d.Rdev)
	// Partitions have no queue directory of their own; it is the parent's.
	if _, err := os.Stat(q + "queue"); err != nil {
		q += "../"
	}
	d.DMAAlignment = int(readSysInt(q + "queue/dma_alignment"))
	if readSysInt(q+"queue/discard_max_bytes") > 0 {
		d.DiscardGranularity = int(max(readSysInt(q+"queue/discard_granularity"), int64(lbs)))
	}
	return nil
}

// sysfsDir is the device's directory under /sys/dev/block, with a slash.
func sysfsDir(rdev uint64) string {
	return fmt.Sprintf("/sys/dev/block/%d:%d/", unix.Major(rdev), unix.Minor(rdev))
}

func readSysInt(path string) int64 {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
	return n
}

// FD is the O_DIRECT descriptor the queues use.
func (d *Device) FD() int { return d.fd }

// Size is the device's size in bytes.
func (d *Device) Size() int64 { return d.size }

// CanDiscard reports whether the device deallocates blocks.
func (d *Device) CanDiscard() bool { return d.DiscardGranularity > 0 }

// ZeroOut makes length bytes at off read as zeros.
func (d *Device) ZeroOut(off, length int64) error {
	return linux.ZeroOut(d.fd, uint64(off), uint64(length))
}

// Close flushes and releases the device.
func (d *Device) Close() error {
	if d.fd < 0 {
		return nil
	}
	ferr := unix.Fsync(d.fd)
	cerr := unix.Close(d.fd)
	d.fd = -1
	return errors.Join(ferr, cerr)
}

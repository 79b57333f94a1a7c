package server

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/ublk"
)

// BlockDevice is the real device behind a front device, opened exclusively
// (O_EXCL) so nobody mounts or writes it behind the server's back, and with
// O_DIRECT so the server's I/O bypasses the page cache: what the server
// acknowledges is what the device received.
type BlockDevice struct {
	Path               string
	Rdev               uint64
	Size               int64
	LogicalBlockSize   int
	PhysicalBlockSize  int
	DiscardGranularity int // 0 when the device cannot discard
	fd                 int
}

var _ ublk.FileBackend = (*BlockDevice)(nil)

// OpenBlockDevice checks path and opens it for serving.
func OpenBlockDevice(path string) (*BlockDevice, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("%s does not exist", path)
		}
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return nil, fmt.Errorf("%s is not a block device", path)
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("%s is in use (mounted, attached, or held by another driver)", path)
		}
		if errors.Is(err, unix.EROFS) || errors.Is(err, unix.EACCES) {
			return nil, fmt.Errorf("%s cannot be opened for writing: %w", path, err)
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	b := &BlockDevice{Path: path, Rdev: uint64(st.Rdev), fd: fd}
	if err := b.probe(); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return b, nil
}

func (b *BlockDevice) probe() error {
	var size uint64
	if err := ioctlPtr(b.fd, unix.BLKGETSIZE64, unsafe.Pointer(&size)); err != nil {
		return fmt.Errorf("%s: read size: %w", b.Path, err)
	}
	if size == 0 {
		return fmt.Errorf("%s has size 0", b.Path)
	}
	lbs, err := unix.IoctlGetInt(b.fd, unix.BLKSSZGET)
	if err != nil {
		return fmt.Errorf("%s: read logical block size: %w", b.Path, err)
	}
	pbs, err := unix.IoctlGetInt(b.fd, unix.BLKPBSZGET)
	if err != nil || pbs < lbs {
		pbs = lbs
	}
	b.Size, b.LogicalBlockSize, b.PhysicalBlockSize = int64(size), lbs, pbs
	major, minor := unix.Major(b.Rdev), unix.Minor(b.Rdev)
	q := fmt.Sprintf("/sys/dev/block/%d:%d/", major, minor)
	// Partitions have no queue directory of their own; it is the parent's.
	if _, err := os.Stat(q + "queue"); err != nil {
		q += "../"
	}
	if readSysInt(q+"queue/discard_max_bytes") > 0 {
		g := readSysInt(q + "queue/discard_granularity")
		if g < int64(lbs) {
			g = int64(lbs)
		}
		b.DiscardGranularity = int(g)
	}
	return nil
}

func readSysInt(path string) int64 {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
	return n
}

func ioctlPtr(fd int, req uint, p unsafe.Pointer) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(p))
	if e != 0 {
		return e
	}
	return nil
}

// FD is the O_DIRECT descriptor the queues use.
func (b *BlockDevice) FD() int { return b.fd }

// CanDiscard reports whether the device deallocates blocks.
func (b *BlockDevice) CanDiscard() bool { return b.DiscardGranularity > 0 }

// ReadAt reads with pread; p must be aligned for O_DIRECT.
func (b *BlockDevice) ReadAt(p []byte, off int64) (int, error) { return unix.Pread(b.fd, p, off) }

// WriteAt writes with pwrite; p must be aligned for O_DIRECT.
func (b *BlockDevice) WriteAt(p []byte, off int64) (int, error) { return unix.Pwrite(b.fd, p, off) }

// Flush flushes the device's write cache.
func (b *BlockDevice) Flush() error { return unix.Fdatasync(b.fd) }

// Close flushes and releases the device.
func (b *BlockDevice) Close() error {
	if b.fd < 0 {
		return nil
	}
	ferr := unix.Fsync(b.fd)
	cerr := unix.Close(b.fd)
	b.fd = -1
	return errors.Join(ferr, cerr)
}

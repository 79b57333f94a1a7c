package linux

import (
	"runtime"
	"unsafe"
)

// DeviceSize returns the size in bytes of the block device open as fd
// (BLKGETSIZE64).
func DeviceSize(fd int) (uint64, error) {
	var size uint64
	err := ioctl(fd, ioctlBLKGETSIZE64, unsafe.Pointer(&size))
	return size, err
}

// LogicalBlockSize returns the device's logical sector size (BLKSSZGET).
func LogicalBlockSize(fd int) (int, error) { return intIoctl(fd, ioctlBLKSSZGET) }

// PhysicalBlockSize returns the device's physical sector size (BLKPBSZGET).
func PhysicalBlockSize(fd int) (int, error) { return intIoctl(fd, ioctlBLKPBSZGET) }

func intIoctl(fd int, request uintptr) (int, error) {
	var v int32
	err := ioctl(fd, request, unsafe.Pointer(&v))
	return int(v), err
}

// ZeroOut makes length bytes at off of the block device open as fd read as
// zeros (BLKZEROOUT): the device's write-zeroes, or explicit zero writes.
// It also drops the device's page cache of that range.
func ZeroOut(fd int, off, length uint64) error {
	r := [2]uint64{off, length}
	err := ioctl(fd, ioctlBLKZEROOUT, unsafe.Pointer(&r))
	runtime.KeepAlive(&r)
	return err
}

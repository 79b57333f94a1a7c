package linux

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctl numbers are the kernel's _IOC encoding: dir<<30 | size<<16 |
// type<<8 | nr (include/uapi/asm-generic/ioctl.h).
const (
	iocNone  = 0
	iocWrite = 1
	iocRead  = 2
)

// Requests, from include/uapi/linux/fs.h and include/uapi/linux/fiemap.h.
const (
	// FIFREEZE and FITHAW: _IOWR('X', 119 / 120, int).
	ioctlFIFREEZE = (iocRead|iocWrite)<<30 | 4<<16 | 'X'<<8 | 119
	ioctlFITHAW   = (iocRead|iocWrite)<<30 | 4<<16 | 'X'<<8 | 120
	// BLKZEROOUT: _IO(0x12, 127), argument a uint64[2] {start, length}.
	ioctlBLKZEROOUT = iocNone<<30 | 0x12<<8 | 127
	// BLKGETSIZE64: _IOR(0x12, 114, size_t).
	ioctlBLKGETSIZE64 = iocRead<<30 | 8<<16 | 0x12<<8 | 114
	// BLKSSZGET and BLKPBSZGET: _IO(0x12, 104 / 123), argument an int.
	ioctlBLKSSZGET  = iocNone<<30 | 0x12<<8 | 104
	ioctlBLKPBSZGET = iocNone<<30 | 0x12<<8 | 123
	// FS_IOC_FIEMAP: _IOWR('f', 11, struct fiemap).
	ioctlFIEMAP = (iocRead|iocWrite)<<30 | sizeofFiemapHeader<<16 | 'f'<<8 | 11
	// FS_IOC_GETFLAGS and FS_IOC_SETFLAGS: _IOR / _IOW('f', 1 / 2, long);
	// the kernel reads and writes an int despite the declared long.
	ioctlGETFLAGS = iocRead<<30 | 8<<16 | 'f'<<8 | 1
	ioctlSETFLAGS = iocWrite<<30 | 8<<16 | 'f'<<8 | 2
)

// ioctl calls request on fd with a pointer argument.
func ioctl(fd int, request uintptr, arg unsafe.Pointer) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), request, uintptr(arg))
	if errno != 0 {
		return errno
	}
	return nil
}

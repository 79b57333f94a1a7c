package linux

import "unsafe"

// Inode flags (FS_*_FL, include/uapi/linux/fs.h).
const (
	// FlagImmutable: the file cannot be modified, renamed, unlinked or
	// linked to, and its blocks are not moved.
	FlagImmutable = 0x00000010
)

// InodeFlags returns the FS_*_FL flags of the file open as fd
// (FS_IOC_GETFLAGS).
func InodeFlags(fd int) (uint32, error) {
	var v uint32
	err := ioctl(fd, ioctlGETFLAGS, unsafe.Pointer(&v))
	return v, err
}

// SetInodeFlags replaces the FS_*_FL flags of the file open as fd
// (FS_IOC_SETFLAGS).
func SetInodeFlags(fd int, flags uint32) error {
	return ioctl(fd, ioctlSETFLAGS, unsafe.Pointer(&flags))
}

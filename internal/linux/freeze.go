package linux

import "golang.org/x/sys/unix"

// Freeze suspends writes to the filesystem whose mount point (or any file
// on it) is open as fd and makes it consistent on its device (FIFREEZE).
// The filesystem stays frozen until Thaw, even if the caller dies.
func Freeze(fd int) error { return unix.IoctlSetInt(fd, ioctlFIFREEZE, 0) }

// Thaw resumes a filesystem frozen by Freeze (FITHAW).
func Thaw(fd int) error { return unix.IoctlSetInt(fd, ioctlFITHAW, 0) }

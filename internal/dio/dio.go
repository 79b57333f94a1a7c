// Package dio holds what O_DIRECT I/O needs: buffers aligned to the 4 KiB
// every block device's logical block size divides, and whole reads.
package dio

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Align is the alignment of AlignedBuf's buffers.
const Align = 4096

// AlignedBuf returns an n-byte buffer aligned for O_DIRECT. It is ordinary
// heap memory, fine for I/O done synchronously while the caller holds it.
func AlignedBuf(n int) []byte {
	raw := make([]byte, n+Align)
	skip := (Align - int(uintptr(unsafe.Pointer(&raw[0]))%Align)) % Align
	return raw[skip : skip+n]
}

// ReadFull fills p from fd at off with as many preads as it takes; running
// out of file (a read of zero bytes) is EIO, since callers read ranges they
// know exist.
func ReadFull(fd int, p []byte, off int64) error {
	for done := 0; done < len(p); {
		n, err := unix.Pread(fd, p[done:], off+int64(done))
		if err != nil {
			return err
		}
		if n == 0 {
			return syscall.EIO
		}
		done += n
	}
	return nil
}

// IsAligned reports whether p starts on an Align boundary and is a whole
// number of Align-sized blocks, as O_DIRECT I/O needs.
func IsAligned(p []byte) bool {
	return len(p)%Align == 0 && uintptr(unsafe.Pointer(unsafe.SliceData(p)))%Align == 0
}

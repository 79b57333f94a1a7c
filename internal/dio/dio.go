// Package dio holds what O_DIRECT I/O needs from memory: buffers aligned
// to the 4 KiB every block device's logical block size divides.
package dio

import "unsafe"

// Align is the alignment of AlignedBuf's buffers.
const Align = 4096

// AlignedBuf returns an n-byte buffer aligned for O_DIRECT. It is ordinary
// heap memory, fine for I/O done synchronously while the caller holds it.
func AlignedBuf(n int) []byte {
	raw := make([]byte, n+Align)
	skip := (Align - int(uintptr(unsafe.Pointer(&raw[0]))%Align)) % Align
	return raw[skip : skip+n]
}

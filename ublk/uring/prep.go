package uring

import (
	"unsafe"

	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// SQE builders. Each expects a slot fresh from Ring.NextSQE (already zeroed)
// and sets only the fields its opcode uses; set sqe.UserData, and sqe.Flags
// (e.g. uapi.SQEFixedFile, in which case fd is a registered-file index)
// yourself.
//
// Unsafe rule for every buffer or struct address passed here: the memory
// must be off-heap (unix.Mmap) or pinned (runtime.Pinner), never on a
// goroutine stack, and must stay valid until the operation's CQE has been
// reaped. The address is stored in ring memory as an integer, so nothing in
// Go keeps the object alive or in place for you.

func prepRW(sqe *uapi.SQE, op uint8, fd int32, buf unsafe.Pointer, n uint32, off uint64) {
	sqe.Opcode = op
	sqe.Fd = fd
	sqe.Addr = uint64(uintptr(buf))
	sqe.Len = n
	sqe.Off = off
}

// PrepRead prepares a read of n bytes at file offset off into buf. Set
// sqe.OpFlags to uapi.RWF* flags if needed.
func PrepRead(sqe *uapi.SQE, fd int32, buf unsafe.Pointer, n uint32, off uint64) {
	prepRW(sqe, uapi.OpRead, fd, buf, n, off)
}

// PrepWrite prepares a write of n bytes from buf at file offset off;
// rwFlags are uapi.RWF* flags (uapi.RWFDsync for a FUA write).
func PrepWrite(sqe *uapi.SQE, fd int32, buf unsafe.Pointer, n uint32, off uint64, rwFlags uint32) {
	prepRW(sqe, uapi.OpWrite, fd, buf, n, off)
	sqe.OpFlags = rwFlags
}

// PrepWritev prepares a vectored write of the nr iovecs at iov (which
// must stay in place until the CQE, like any buffer) at file offset off.
func PrepWritev(sqe *uapi.SQE, fd int32, iov unsafe.Pointer, nr uint32, off uint64) {
	prepRW(sqe, uapi.OpWritev, fd, iov, nr, off)
}

// PrepReadFixed prepares a read of n bytes at file offset off into the
// ring's registered buffer bufIndex, at byte at of that buffer. For a
// buffer ublk registered (AUTO_BUF_REG) at is the offset into the request's
// data, since such buffers start at address 0.
func PrepReadFixed(sqe *uapi.SQE, fd int32, bufIndex uint16, at uint64, n uint32, off uint64) {
	sqe.Opcode = uapi.OpReadFixed
	sqe.Fd, sqe.Addr, sqe.Len, sqe.Off, sqe.BufIndex = fd, at, n, off, bufIndex
}

// PrepWriteFixed is PrepReadFixed's write; rwFlags as for PrepWrite.
func PrepWriteFixed(sqe *uapi.SQE, fd int32, bufIndex uint16, at uint64, n uint32, off uint64, rwFlags uint32) {
	sqe.Opcode = uapi.OpWriteFixed
	sqe.Fd, sqe.Addr, sqe.Len, sqe.Off, sqe.BufIndex = fd, at, n, off, bufIndex
	sqe.OpFlags = rwFlags
}

// PrepFsync prepares an fsync of the whole file; flags is 0 or
// uapi.FsyncDatasync (fdatasync).
func PrepFsync(sqe *uapi.SQE, fd int32, flags uint32) {
	sqe.Opcode = uapi.OpFsync
	sqe.Fd = fd
	sqe.OpFlags = flags
}

// PrepFallocate prepares fallocate(fd, mode, off, length). The kernel takes
// the offset from off, the LENGTH from addr and the MODE from len; this
// builder does that mapping.
func PrepFallocate(sqe *uapi.SQE, fd int32, mode uint32, off, length uint64) {
	sqe.Opcode = uapi.OpFallocate
	sqe.Fd = fd
	sqe.Off = off
	sqe.Addr = length
	sqe.Len = mode
}

// PrepURingCmd prepares an IORING_OP_URING_CMD for fd with command cmdOp.
// cmd_op is the u32 at SQE byte 8 and __pad1, the u32 at byte 12, must be
// zero; a single 64-bit store of cmdOp writes both (little-endian). Write
// the payload into CmdArea(sqe, ...).
func PrepURingCmd(sqe *uapi.SQE, fd int32, cmdOp uint32) {
	sqe.Opcode = uapi.OpURingCmd
	sqe.Fd = fd
	sqe.Off = uint64(cmdOp)
}

// CmdArea returns the uring_cmd payload area of sqe: bytes 48..63 (16 bytes)
// of a 64-byte SQE, or 48..127 (80 bytes) of a 128-byte one, as a slice over
// the ring memory. sqe must come from Ring.NextSQE, and sqe128 must say
// whether that ring was set up with uapi.SetupSQE128: with true the slice
// runs past the end of the uapi.SQE struct into the second half of the
// 128-byte slot, which only exists in an SQE128 ring. The area is part of
// the zeroed slot.
func CmdArea(sqe *uapi.SQE, sqe128 bool) []byte {
	n := uapi.SQECmdSize
	if sqe128 {
		n = uapi.SQECmdSize128
	}
	return unsafe.Slice((*byte)(unsafe.Add(unsafe.Pointer(sqe), uapi.SQECmdOffset)), n)
}

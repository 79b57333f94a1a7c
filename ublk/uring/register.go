package uring

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// register is io_uring_register, retrying EINTR (file registration waits
// for the ring to quiesce, and that wait is interruptible). arg must stay
// valid for the duration of the call; the kernel copies what it needs
// before returning.
func (r *Ring) register(op uapi.RegisterOp, arg unsafe.Pointer, nr uint32) error {
	if r.fd < 0 {
		return ErrClosed
	}
	for {
		_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), uintptr(op),
			uintptr(arg), uintptr(nr), 0, 0)
		switch errno {
		case 0:
			return nil
		case unix.EINTR:
			continue
		default:
			return errno
		}
	}
}

// RegisterFiles registers fds as the ring's fixed files: index i in an SQE
// with uapi.SQEFixedFile names fds[i]. An entry of -1 leaves a slot empty.
// The kernel takes its own references, so the fds may be closed afterwards.
// Errors wrap the kernel's errno.
func (r *Ring) RegisterFiles(fds []int32) error {
	if len(fds) == 0 {
		return fmt.Errorf("uring: register files: empty set: %w", unix.EINVAL)
	}
	err := r.register(uapi.RegisterFiles, unsafe.Pointer(&fds[0]), uint32(len(fds)))
	runtime.KeepAlive(fds)
	if err != nil {
		return fmt.Errorf("uring: register %d files: %w", len(fds), err)
	}
	return nil
}

// RegisterSparseBuffers gives the ring a fixed-buffer table of n empty
// slots (IORING_REGISTER_BUFFERS2, sparse). ublk's AUTO_BUF_REG fills a
// slot with a request's pages while the server handles it, and READ_FIXED
// and WRITE_FIXED with that slot's index then move the data without a copy.
func (r *Ring) RegisterSparseBuffers(n uint32) error {
	arg := &uapi.RsrcRegister{Nr: n, Flags: uapi.RsrcRegisterSparse}
	err := r.register(uapi.RegisterBuffers2, unsafe.Pointer(arg), uint32(unsafe.Sizeof(*arg)))
	runtime.KeepAlive(arg)
	if err != nil {
		return fmt.Errorf("uring: register a sparse table of %d buffers: %w", n, err)
	}
	return nil
}

package uring

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// register is io_uring_register, retrying EINTR (file and buffer
// (un)registration wait for the ring to quiesce, and that wait is
// interruptible). arg must stay valid for the duration of the call; the
// kernel copies what it needs before returning.
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

// UnregisterFiles drops the fixed-file table.
func (r *Ring) UnregisterFiles() error {
	if err := r.register(uapi.UnregisterFiles, nil, 0); err != nil {
		return fmt.Errorf("uring: unregister files: %w", err)
	}
	return nil
}

// RegisterBuffers registers bufs as fixed buffers: buf_index i in
// READ_FIXED/WRITE_FIXED (or a URING_CMD with uapi.URingCmdFixed) names
// bufs[i], and the addresses used must lie inside it.
//
// The buffers must be off-heap memory, normally from unix.Mmap, that stays
// mapped until UnregisterBuffers or Close: the kernel pins the pages and
// keeps using them long after this call returns, which Go heap memory
// (movable, collectable) cannot promise. Registration may be charged to
// RLIMIT_MEMLOCK. Errors wrap the kernel's errno.
func (r *Ring) RegisterBuffers(bufs [][]byte) error {
	if len(bufs) == 0 {
		return fmt.Errorf("uring: register buffers: empty set: %w", unix.EINVAL)
	}
	iov := make([]unix.Iovec, len(bufs))
	for i, b := range bufs {
		if len(b) == 0 {
			return fmt.Errorf("uring: register buffers: buffer %d is empty: %w", i, unix.EINVAL)
		}
		iov[i].Base = &b[0]
		iov[i].SetLen(len(b))
	}
	// The iovec array itself is only read during the call.
	err := r.register(uapi.RegisterBuffers, unsafe.Pointer(&iov[0]), uint32(len(iov)))
	runtime.KeepAlive(iov)
	runtime.KeepAlive(bufs)
	if err != nil {
		return fmt.Errorf("uring: register %d buffers: %w", len(bufs), err)
	}
	return nil
}

// UnregisterBuffers drops the fixed-buffer table.
func (r *Ring) UnregisterBuffers() error {
	if err := r.register(uapi.UnregisterBuffers, nil, 0); err != nil {
		return fmt.Errorf("uring: unregister buffers: %w", err)
	}
	return nil
}

// RegisterEventFd makes the kernel signal eventfd fd whenever it posts a
// CQE. Under DEFER_TASKRUN CQEs are posted only inside the owner's enter, so
// the eventfd cannot wake that owner; it suits the other direction (a ring
// owner telling others it has completions).
func (r *Ring) RegisterEventFd(fd int) error {
	v := int32(fd)
	err := r.register(uapi.RegisterEventFd, unsafe.Pointer(&v), 1)
	runtime.KeepAlive(&v)
	if err != nil {
		return fmt.Errorf("uring: register eventfd: %w", err)
	}
	return nil
}

// UnregisterEventFd removes the eventfd set by RegisterEventFd.
func (r *Ring) UnregisterEventFd() error {
	if err := r.register(uapi.UnregisterEventFd, nil, 0); err != nil {
		return fmt.Errorf("uring: unregister eventfd: %w", err)
	}
	return nil
}

// Probe is the kernel's opcode support table (IORING_REGISTER_PROBE).
type Probe struct {
	lastOp    uint8
	supported [256]bool
}

// Supported reports whether the kernel implements opcode op (uapi.Op*).
func (p *Probe) Supported(op uint8) bool { return p.supported[op] }

// LastOp returns the highest opcode the kernel knows.
func (p *Probe) LastOp() uint8 { return p.lastOp }

// Probe asks the kernel which opcodes it supports.
func (r *Ring) Probe() (*Probe, error) {
	const nops = 256
	const size = int(unsafe.Sizeof(uapi.ProbeHeader{})) + nops*int(unsafe.Sizeof(uapi.ProbeOp{}))
	// The kernel requires the buffer to be zeroed; []uint64 keeps it
	// 8-byte aligned for the struct views below.
	buf := make([]uint64, size/8)
	if err := r.register(uapi.RegisterProbe, unsafe.Pointer(&buf[0]), nops); err != nil {
		return nil, fmt.Errorf("uring: probe: %w", err)
	}
	raw := unsafe.Slice((*byte)(unsafe.Pointer(&buf[0])), size)
	hdr := (*uapi.ProbeHeader)(unsafe.Pointer(&raw[0]))
	ops := unsafe.Slice((*uapi.ProbeOp)(unsafe.Pointer(&raw[unsafe.Sizeof(*hdr)])), nops)
	p := &Probe{lastOp: hdr.LastOp}
	for _, o := range ops[:min(int(hdr.OpsLen), nops)] {
		if o.Flags&uapi.ProbeOpSupported != 0 {
			p.supported[o.Op] = true
		}
	}
	return p, nil
}

package uring

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// Options configures [New].
type Options struct {
	// Entries is the number of SQ entries; the kernel rounds it up to a power
	// of two (at most uapi.MaxSQEntries).
	Entries uint32
	// CQEntries is the number of CQ entries. 0 means the kernel default
	// (2×Entries); otherwise uapi.SetupCQSize is set for you. It must be at
	// least Entries.
	CQEntries uint32
	// Flags are extra uapi.Setup* flags. Supported: SQE128, CQSIZE, CLAMP,
	// IOPOLL, NO_SQARRAY, and the optional SUBMIT_ALL, COOP_TASKRUN,
	// TASKRUN_FLAG, SINGLE_ISSUER, DEFER_TASKRUN, which New drops (newest
	// first) when the kernel rejects them with EINVAL. SQPOLL, CQE32,
	// NO_MMAP, R_DISABLED, ATTACH_WQ and REGISTERED_FD_ONLY are refused.
	Flags uint32
}

const (
	// optionalFlags may be dropped by New on an older kernel.
	optionalFlags = uapi.SetupSubmitAll | uapi.SetupCoopTaskrun | uapi.SetupTaskrunFlag |
		uapi.SetupSingleIssuer | uapi.SetupDeferTaskrun
	// supportedFlags is every flag this package knows how to drive.
	supportedFlags = optionalFlags | uapi.SetupIOPoll | uapi.SetupCQSize | uapi.SetupClamp |
		uapi.SetupSQE128 | uapi.SetupNoSQArray
)

// dropOrder lists the optional flags New gives up, cumulatively and newest
// kernel feature first, when io_uring_setup returns EINVAL.
var dropOrder = [...]uint32{
	uapi.SetupDeferTaskrun,                        // 6.1
	uapi.SetupSingleIssuer,                        // 6.0
	uapi.SetupCoopTaskrun | uapi.SetupTaskrunFlag, // 5.19
	uapi.SetupSubmitAll,                           // 5.18
}

// ErrClosed is returned by calls on a closed Ring.
var ErrClosed = errors.New("uring: ring is closed")

// Ring is one io_uring instance: its fd, the mapped SQ and CQ rings and the
// SQE array. It is not safe for concurrent use; see the package doc for the
// thread rules.
type Ring struct {
	// Hot fields first. The *atomic.Uint32 fields point into the shared ring
	// mapping; see the package doc for the ordering each one carries.
	sqHead  *atomic.Uint32 // sq.head: written by the kernel as it consumes SQEs
	sqTail  *atomic.Uint32 // sq.tail: written by us to publish SQEs
	sqFlags *atomic.Uint32 // sq.flags: uapi.SQ* bits, written by the kernel
	cqHead  *atomic.Uint32 // cq.head: written by us after copying CQEs out
	cqTail  *atomic.Uint32 // cq.tail: written by the kernel after posting CQEs
	sqes    unsafe.Pointer // SQE array (stride 64 or 128)
	cqes    unsafe.Pointer // CQE array (stride 16)

	sqeTail  uint32 // next slot NextSQE hands out; published to sq.tail by Submit
	cqeHead  uint32 // our copy of cq.head (we are its only writer)
	sqMask   uint32
	sqCount  uint32
	cqMask   uint32
	cqCount  uint32
	sqeShift uint8  // log2 of the SQE stride
	eintr    uint32 // EINTR retries of enter (diagnostics and tests)

	fd    int
	flags uint32 // the uapi.Setup* flags in force, after New dropped what the kernel refused

	sqMem  []byte // SQ ring mapping (also the CQ ring with FEAT_SINGLE_MMAP)
	cqMem  []byte // CQ ring mapping; aliases sqMem with FEAT_SINGLE_MMAP
	sqeMem []byte // SQE array mapping
}

// New sets up a ring, maps it (once with FEAT_SINGLE_MMAP) and fills the SQ
// index array with the identity mapping. If the kernel rejects an optional
// flag (see [Options]) with EINVAL, New retries without it. With
// uapi.SetupSingleIssuer the calling OS thread becomes the ring's owner: lock
// it first (runtime.LockOSThread).
func New(opt Options) (*Ring, error) {
	if opt.Entries == 0 {
		return nil, fmt.Errorf("uring: setup: Entries is 0: %w", unix.EINVAL)
	}
	if bad := opt.Flags &^ supportedFlags; bad != 0 {
		return nil, fmt.Errorf("uring: setup: unsupported setup flags %#x: %w", bad, unix.EINVAL)
	}
	flags := opt.Flags
	if opt.CQEntries != 0 {
		flags |= uapi.SetupCQSize
	} else if flags&uapi.SetupCQSize != 0 {
		return nil, fmt.Errorf("uring: setup: SetupCQSize without CQEntries: %w", unix.EINVAL)
	}

	var p uapi.IoUringParams
	fd, err := setup(opt.Entries, opt.CQEntries, flags, &p)
	for i := 0; err == unix.EINVAL && i < len(dropOrder); i++ {
		if flags&dropOrder[i] == 0 {
			continue
		}
		flags &^= dropOrder[i]
		fd, err = setup(opt.Entries, opt.CQEntries, flags, &p)
	}
	if err != nil {
		return nil, fmt.Errorf("uring: io_uring_setup(%d, flags %#x): %w", opt.Entries, flags, err)
	}

	r := &Ring{fd: fd, flags: p.Flags}
	if err := r.mapRings(&p); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

// setup calls io_uring_setup with a fresh params struct.
func setup(entries, cqEntries, flags uint32, p *uapi.IoUringParams) (int, error) {
	*p = uapi.IoUringParams{Flags: flags}
	if flags&uapi.SetupCQSize != 0 {
		p.CQEntries = cqEntries
	}
	// p is only read and written during the syscall.
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(p)), 0)
	if errno != 0 {
		return -1, errno
	}
	return int(fd), nil
}

// mapRings maps the rings described by p and resolves the field pointers.
func (r *Ring) mapRings(p *uapi.IoUringParams) error {
	if p.Flags&uapi.SetupCQE32 != 0 {
		return fmt.Errorf("uring: CQE32 rings are not supported: %w", unix.EINVAL)
	}
	r.sqeShift = 6
	if p.Flags&uapi.SetupSQE128 != 0 {
		r.sqeShift = 7
	}
	noArray := p.Flags&uapi.SetupNoSQArray != 0
	sqSize := int(p.SQOff.Array) + int(p.SQEntries)*4
	if noArray {
		sqSize = int(p.SQOff.Dropped) + 4
	}
	cqSize := int(p.CQOff.CQEs) + int(p.CQEntries)*uapi.SizeofCQE

	const prot = unix.PROT_READ | unix.PROT_WRITE
	const mflags = unix.MAP_SHARED | unix.MAP_POPULATE
	var err error
	if p.Features&uapi.RingFeatSingleMmap != 0 {
		r.sqMem, err = unix.Mmap(r.fd, uapi.OffSQRing, max(sqSize, cqSize), prot, mflags)
		if err != nil {
			return fmt.Errorf("uring: mmap rings: %w", err)
		}
		r.cqMem = r.sqMem
	} else {
		if noArray {
			return fmt.Errorf("uring: NO_SQARRAY without FEAT_SINGLE_MMAP: %w", unix.EINVAL)
		}
		if r.sqMem, err = unix.Mmap(r.fd, uapi.OffSQRing, sqSize, prot, mflags); err != nil {
			return fmt.Errorf("uring: mmap SQ ring: %w", err)
		}
		if r.cqMem, err = unix.Mmap(r.fd, uapi.OffCQRing, cqSize, prot, mflags); err != nil {
			return fmt.Errorf("uring: mmap CQ ring: %w", err)
		}
	}
	if r.sqeMem, err = unix.Mmap(r.fd, uapi.OffSQEs, int(p.SQEntries)<<r.sqeShift, prot, mflags); err != nil {
		return fmt.Errorf("uring: mmap SQEs: %w", err)
	}

	// Every offset comes from the kernel; indexing the mapping slices
	// bounds-checks each one before the pointer conversions below.
	word := func(mem []byte, off uint32) *atomic.Uint32 {
		return (*atomic.Uint32)(unsafe.Pointer(&mem[off : off+4][0]))
	}
	r.sqHead = word(r.sqMem, p.SQOff.Head)
	r.sqTail = word(r.sqMem, p.SQOff.Tail)
	r.sqFlags = word(r.sqMem, p.SQOff.Flags)
	r.sqMask = word(r.sqMem, p.SQOff.RingMask).Load()
	r.sqCount = word(r.sqMem, p.SQOff.RingEntries).Load()
	r.cqHead = word(r.cqMem, p.CQOff.Head)
	r.cqTail = word(r.cqMem, p.CQOff.Tail)
	r.cqMask = word(r.cqMem, p.CQOff.RingMask).Load()
	r.cqCount = word(r.cqMem, p.CQOff.RingEntries).Load()
	if r.sqCount != p.SQEntries || r.cqCount != p.CQEntries ||
		r.sqMask != r.sqCount-1 || r.cqMask != r.cqCount-1 {
		return fmt.Errorf("uring: inconsistent ring geometry (sq %d/%#x, cq %d/%#x)", r.sqCount, r.sqMask, r.cqCount, r.cqMask)
	}
	cqeEnd := int(p.CQOff.CQEs) + int(r.cqCount)*uapi.SizeofCQE
	r.cqes = unsafe.Pointer(&r.cqMem[p.CQOff.CQEs:cqeEnd][0])
	r.sqes = unsafe.Pointer(&r.sqeMem[0])

	if !noArray {
		// Identity SQ index array, written once: slot i of the ring always
		// names SQE i, so Submit only has to move the tail. These plain
		// stores happen before the first atomic tail store publishes them.
		arrEnd := int(p.SQOff.Array) + int(r.sqCount)*4
		arr := unsafe.Slice((*uint32)(unsafe.Pointer(&r.sqMem[p.SQOff.Array:arrEnd][0])), r.sqCount)
		for i := range arr {
			arr[i] = uint32(i)
		}
	}
	r.sqeTail = r.sqTail.Load()
	r.cqeHead = r.cqHead.Load()
	return nil
}

// Close unmaps the rings and closes the ring fd. It is idempotent. The
// kernel cancels what is still in flight asynchronously, so reap every CQE
// first if buffers are to be reused or unmapped right after Close.
func (r *Ring) Close() error {
	if r.fd < 0 {
		return nil
	}
	var errs []error
	if r.sqeMem != nil {
		errs = append(errs, unix.Munmap(r.sqeMem))
	}
	if r.cqMem != nil && unsafe.SliceData(r.cqMem) != unsafe.SliceData(r.sqMem) {
		errs = append(errs, unix.Munmap(r.cqMem))
	}
	if r.sqMem != nil {
		errs = append(errs, unix.Munmap(r.sqMem))
	}
	errs = append(errs, unix.Close(r.fd))
	*r = Ring{fd: -1, flags: r.flags, sqeShift: r.sqeShift}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("uring: close: %w", err)
	}
	return nil
}

// NextSQE returns the next free SQE slot, zeroed over its whole 64 or 128
// bytes, or nil if the SQ is full (or the ring closed). The slot becomes
// visible to the kernel at the next Submit. It points into ring memory: do
// not keep it after that Submit.
func (r *Ring) NextSQE() *uapi.SQE {
	if r.sqes == nil {
		return nil
	}
	tail := r.sqeTail
	// Acquire-load sq.head: a slot the kernel has moved past is no longer
	// read by it (the kernel consumes SQEs synchronously inside enter).
	if tail-r.sqHead.Load() >= r.sqCount {
		return nil
	}
	p := unsafe.Add(r.sqes, uintptr(tail&r.sqMask)<<r.sqeShift)
	// Stale flags, buf_index or uring_cmd_flags from an earlier use of the
	// slot would corrupt the next command, so clear all of it.
	if r.sqeShift == 7 {
		*(*[uapi.SizeofSQE128]byte)(p) = [uapi.SizeofSQE128]byte{}
	} else {
		*(*[uapi.SizeofSQE]byte)(p) = [uapi.SizeofSQE]byte{}
	}
	r.sqeTail = tail + 1
	return (*uapi.SQE)(p)
}

// SQSpace returns how many SQEs NextSQE can hand out before the next
// Submit: a chain of linked SQEs must fit whole, since a Submit in its
// middle would end the chain there.
func (r *Ring) SQSpace() uint32 {
	if r.sqes == nil {
		return 0
	}
	return r.sqCount - (r.sqeTail - r.sqHead.Load())
}

// Submit publishes the prepared SQEs and submits them with io_uring_enter.
// It returns how many SQEs the kernel consumed during the call. It also
// flushes parked CQEs when the kernel reports CQ overflow (or pending task
// work with SetupTaskrunFlag). EINTR is retried. Any other errno is returned
// bare (a unix.Errno, e.g. EBUSY, EAGAIN); the SQEs it left unconsumed stay
// pending and go out with the next Submit.
func (r *Ring) Submit() (int, error) { return r.submit(0) }

// SubmitAndWait is Submit plus a wait until at least n CQEs are in the CQ
// (n is capped at the CQ size). EINTR — routine under Go's SIGURG
// preemption — is retried, so it returns only once n CQEs are ready or on a
// real error (returned bare, as a unix.Errno). It does not enter the kernel
// to wait when n CQEs are already there.
func (r *Ring) SubmitAndWait(n uint32) (int, error) { return r.submit(n) }

// submit publishes sq.tail and loops on io_uring_enter until every pending
// SQE is consumed and waitNr CQEs are ready.
func (r *Ring) submit(waitNr uint32) (int, error) {
	if r.sqTail == nil {
		return 0, ErrClosed
	}
	waitNr = min(waitNr, r.cqCount) // the kernel caps min_complete the same way
	// Release-store the tail: every SQE byte written since the last Submit
	// happens before the kernel can observe the slots as submitted.
	r.sqTail.Store(r.sqeTail)
	start := r.sqHead.Load()
	flushed := false // one GETEVENTS pass done in this call
	for {
		// Recompute from the kernel's head on every pass: after EINTR or a
		// short submission the return value of enter is not the truth.
		head := r.sqHead.Load()
		toSubmit := r.sqeTail - head
		var flags, minComplete uint32
		if r.cqReady() < waitNr {
			flags, minComplete = uapi.EnterGetEvents, waitNr
		} else if !flushed && r.sqFlags.Load()&(uapi.SQCQOverflow|uapi.SQTaskrun) != 0 {
			// CQEs are parked in the kernel's overflow list (or task work is
			// pending): a GETEVENTS enter moves them into the CQ.
			flags = uapi.EnterGetEvents
		}
		if toSubmit == 0 && flags == 0 {
			return int(head - start), nil
		}
		ret, errno := r.enter(toSubmit, minComplete, flags)
		switch errno {
		case 0:
			if flags&uapi.EnterGetEvents != 0 {
				flushed = true
			} else if ret == 0 && r.sqHead.Load() == head {
				// The kernel took nothing and reported no error: do not spin.
				return int(head - start), nil
			}
		case unix.EINTR:
			// A signal (SIGURG preemption, usually) interrupted the call; loop.
			r.eintr++
		default:
			return int(r.sqHead.Load() - start), errno
		}
	}
}

// enter is io_uring_enter. It uses Syscall6, not RawSyscall6, so that a
// blocking wait releases the P to the scheduler.
func (r *Ring) enter(toSubmit, minComplete, flags uint32) (int, unix.Errno) {
	n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit),
		uintptr(minComplete), uintptr(flags), 0, 0)
	return int(n), errno
}

// cqReady returns the number of CQEs waiting in the CQ.
func (r *Ring) cqReady() uint32 {
	if r.cqTail == nil {
		return 0
	}
	// Acquire-load cq.tail: CQEs below it are fully written.
	return r.cqTail.Load() - r.cqeHead
}

// ReapCQEs copies up to len(dst) ready CQEs into dst, oldest first, then
// advances cq.head once, and returns how many it copied. When it drains the
// CQ while the kernel reports CQ overflow it flushes the overflow list (one
// io_uring_enter) and copies on. It never waits and, under DEFER_TASKRUN,
// never runs task work: use SubmitAndWait for that.
func (r *Ring) ReapCQEs(dst []uapi.CQE) int {
	n := r.reap(dst)
	if n < len(dst) && r.overflowed() {
		r.flushOverflow()
		n += r.reap(dst[n:])
	}
	return n
}

func (r *Ring) reap(dst []uapi.CQE) int {
	if r.cqTail == nil {
		return 0
	}
	head := r.cqeHead
	n := r.cqTail.Load() - head // acquire: CQEs below the tail are complete
	if uint64(len(dst)) < uint64(n) {
		n = uint32(len(dst))
	}
	for i := uint32(0); i < n; i++ {
		dst[i] = *r.cqeAt(head + i)
	}
	r.cqeHead = head + n
	// Release-store the head only after the copies: from here on the kernel
	// may overwrite those slots.
	r.cqHead.Store(head + n)
	return int(n)
}

// cqeAt returns the CQE for ring position i (masked into the array).
func (r *Ring) cqeAt(i uint32) *uapi.CQE {
	return (*uapi.CQE)(unsafe.Add(r.cqes, uintptr(i&r.cqMask)*uapi.SizeofCQE))
}

func (r *Ring) overflowed() bool {
	return r.sqFlags != nil && r.sqFlags.Load()&uapi.SQCQOverflow != 0
}

// flushOverflow asks the kernel to move overflowed CQEs into the CQ.
// Errors are ignored: the caller just sees no new CQEs.
func (r *Ring) flushOverflow() {
	for {
		if _, errno := r.enter(0, 0, uapi.EnterGetEvents); errno != unix.EINTR {
			return
		}
	}
}

package ublk

import (
	"errors"
	"syscall"

	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// Backend is the file a device's requests are served from: one file or
// block device, opened for O_DIRECT I/O and mapped 1:1 onto the device.
// Each queue issues every request as one io_uring operation on that file,
// on its own ring, so a request costs no thread hop and no extra copy.
// Optional capabilities (WriteInterceptor, ReadFinisher) are found by type
// assertion.
type Backend interface {
	// FD returns the descriptor; it must stay open while the device serves.
	FD() int
	// CanDiscard reports whether DISCARD should be forwarded as a hole
	// punch; otherwise a discard completes without touching the file.
	CanDiscard() bool
}

// WriteAction is a WriteInterceptor's verdict on one modifying request.
type WriteAction int

const (
	// WriteProceed issues the request to the file.
	WriteProceed WriteAction = iota
	// WriteSkip completes the request successfully without touching the
	// file (a discard that would destroy data a snapshot still needs).
	WriteSkip
	// WritePending defers the request: the interceptor calls resume (from
	// any goroutine, exactly once) when it may proceed (nil), must be
	// completed without touching the file (ErrSkipWrite) or must fail (any
	// other error), so slow preparation such as copy-on-write never blocks
	// the queue thread.
	WritePending
)

// ErrSkipWrite, passed to a pending write's resume, completes the request
// successfully without issuing it, as WriteSkip does.
var ErrSkipWrite = errors.New("write completed without file I/O")

// WriteInterceptor is a Backend that must see every modifying request
// (write, discard, write-zeroes) before it reaches the file, as snapshot and
// change tracking need. The queue calls BeforeWrite on its own thread and
// issues the request only after it returns; an error fails the request with
// that errno and nothing is written. AfterWrite is called with BeforeWrite's
// token once the request has completed (issued or not), so the interceptor
// can tell when every write admitted under an old state has drained.
// BeforeWrite must never wait for other requests to complete: the queue
// thread that would complete them is the one waiting.
type WriteInterceptor interface {
	Backend
	BeforeWrite(op uapi.IOOp, off, n int64, resume func(error)) (token uint64, action WriteAction, err error)
	AfterWrite(token uint64)
}

// ReadFinisher is a Backend whose reads need a last step on the data
// before it goes to the kernel (a snapshot overlays preserved blocks and
// refuses reads once it has failed). The queue reads the file through its
// ring as usual, then calls FinishRead on its own thread with the bytes
// read; an error fails the request with that errno.
type ReadFinisher interface {
	Backend
	FinishRead(p []byte, off int64) error
}

// ReadPatch replaces Len bytes at byte At of a read request's data: with
// the bytes of descriptor FD at Off, or with zeros where FD is PatchZeros.
type ReadPatch struct {
	At, Len int
	FD      int
	Off     int64
}

// PatchZeros, as a ReadPatch's FD, fills the range with zeros.
const PatchZeros = -1

// ReadPatcher is a ReadFinisher that can be served zero copy, where the
// server never sees a request's data. After the file read into the
// request's own pages, the queue asks PatchRead which ranges to replace
// (they must not overlap), reads those into the same pages through its
// ring, then asks FinishPatchedRead whether the result stands; an error
// fails the request with its errno. Both run on the queue thread.
type ReadPatcher interface {
	ReadFinisher
	PatchRead(off int64, n int, patches []ReadPatch) ([]ReadPatch, error)
	FinishPatchedRead(off int64, n int) error
}

// errnoResult turns a backend outcome into the value committed to the
// kernel: a byte count, or a negative errno. It is the one place where Go
// errors meet the kernel's error space.
func errnoResult(n int, err error) int32 {
	if err == nil {
		return int32(n)
	}
	var errno syscall.Errno
	if errors.As(err, &errno) && errno != 0 {
		return -int32(errno)
	}
	return -int32(syscall.EIO)
}

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
	// WriteStaged defers the request until the I/O of a Stage has run on
	// the queue's ring (a Stager's answer only).
	WriteStaged
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

// StageIO is one file operation of a Stage: a read into Buf, or a write of
// Buf, at byte Off of descriptor FD. Buf must stay valid and untouched
// until the stage's Done is called.
//
// Gather marks a write that is its round's only operation as one the queue
// may merge with other tags' gathered writes that are ready in the same
// pass and adjacent in the same file, into one vectored write: fewer
// writes where each write, not each byte, is what costs (a COW store's
// fresh slots). Each write's outcome is still its own: a short merged
// write fails only the writes whose bytes it did not cover.
type StageIO struct {
	Write  bool
	Gather bool
	FD     int
	Off    int64
	Buf    []byte
}

// Stage is I/O a write waits for, run on the queue's own ring: no thread
// hop and no blocking call, as the copy-on-write of a first write needs
// (read the old blocks, store them, record where). The queue issues IO in
// order, each operation linked to the one before it (it starts only once
// the previous one has transferred all its bytes). Then it calls Done on
// its thread with nil, or with the first failure (a short transfer is
// EIO, an operation cancelled by an earlier failure is not reported).
// Done either sets IO again for another round (more) or gives the write's
// verdict as a WritePending resume would: nil issues it, ErrSkipWrite
// completes it untouched, ErrResumeLater means the interceptor calls the
// write's resume itself later, any other error fails it.
type Stage struct {
	IO   []StageIO
	Done func(err error) (more bool, verdict error)
}

// ErrResumeLater, as a Stage's verdict, leaves the write pending until the
// interceptor calls its resume (work that must not run on the queue
// thread, such as making a failure durable).
var ErrResumeLater = errors.New("write resumed later")

// Stager is a WriteInterceptor whose preparation of a write can run as a
// Stage on the queue's ring. The queue calls BeforeWriteStaged instead of
// BeforeWrite; besides BeforeWrite's answers it may answer WriteStaged
// after setting s (the tag's own Stage, reused from one request to the
// next; at most MaxStageIO operations a round).
type Stager interface {
	WriteInterceptor
	BeforeWriteStaged(op uapi.IOOp, off, n int64, resume func(error), s *Stage) (token uint64, action WriteAction, err error)
}

// MaxStageIO is the most operations a Stage may have in one round: the
// chain must fit the ring's submission queue whole.
const MaxStageIO = 8

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

package ublk

import (
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// The decisions of the request path, as pure functions of a request's
// descriptor: which file operation serves it (prepare), and what its
// completion means to the kernel (settle). The queue thread only carries
// them out, so these are what the host tests check rule by rule.

// fileOp is what serves one request: an io_uring operation on the backend
// file, or (opcode noFileOp) a result to commit at once.
type fileOp struct {
	opcode    uint8
	off, n    uint64
	rwFlags   uint32 // OpRead/OpWrite: RWF_DSYNC for a FUA write
	fsync     uint32 // OpFsync: IORING_FSYNC_DATASYNC
	falloc    uint32 // OpFallocate: the mode
	immediate int32  // noFileOp: the result
}

// noFileOp marks a request completed without file I/O (io_uring has no
// opcode 0xff).
const noFileOp = 0xff

func done(res int32) fileOp { return fileOp{opcode: noFileOp, immediate: res} }

// bytesOf is the request's length in bytes.
func bytesOf(d *uapi.IODesc) uint64 { return uint64(d.NrSectors) << 9 }

// modifies reports whether op changes the device's contents (what a
// WriteInterceptor must see first).
func modifies(op uapi.IOOp) bool {
	return op == uapi.IOOpWrite || op == uapi.IOOpDiscard || op == uapi.IOOpWriteZeroes
}

// prepare decides the file operation that serves request d, whose data
// buffer holds bufSize bytes. canDiscard is the backend's CanDiscard.
func prepare(d *uapi.IODesc, bufSize int, canDiscard bool) fileOp {
	off, n := d.StartSector<<9, bytesOf(d)
	switch d.Op() {
	case uapi.IOOpRead, uapi.IOOpWrite:
		if n > uint64(bufSize) {
			return done(-int32(unix.EINVAL))
		}
		op := fileOp{opcode: uapi.OpRead, off: off, n: n}
		if d.Op() == uapi.IOOpWrite {
			op.opcode = uapi.OpWrite
			if d.OpFlags&uapi.IOFlagFUA != 0 {
				op.rwFlags = uapi.RWFDsync // durable before it completes
			}
		}
		return op
	case uapi.IOOpFlush:
		return fileOp{opcode: uapi.OpFsync, fsync: uapi.FsyncDatasync}
	case uapi.IOOpDiscard:
		if !canDiscard {
			return done(0) // a hint the device cannot act on: the data stays
		}
		return fileOp{opcode: uapi.OpFallocate, off: off, n: n, falloc: uapi.FallocPunchHole | uapi.FallocKeepSize}
	case uapi.IOOpWriteZeroes:
		return fileOp{opcode: uapi.OpFallocate, off: off, n: n, falloc: uapi.FallocZeroRange | uapi.FallocKeepSize}
	}
	return done(-int32(unix.EOPNOTSUPP))
}

// settle turns the file operation's result res into the value committed
// for request d.
func settle(d *uapi.IODesc, res int32) int32 {
	switch d.Op() {
	case uapi.IOOpRead, uapi.IOOpWrite:
		if res == 0 && bytesOf(d) > 0 {
			// Zero bytes is the end of the file: committing 0 would make
			// the kernel requeue the request forever.
			return -int32(unix.EIO)
		}
		return res
	case uapi.IOOpDiscard:
		if res == -int32(unix.EOPNOTSUPP) {
			return 0 // discard is a hint: a file that cannot deallocate keeps the data
		}
	}
	return min(res, 0) // flush, discard, write-zeroes: 0 or an errno
}

// skipped is the result of a modifying request a WriteInterceptor completed
// without file I/O (WriteSkip): success, as if it had been issued.
func skipped(d *uapi.IODesc) int32 {
	if d.Op() == uapi.IOOpWrite {
		return int32(bytesOf(d))
	}
	return 0
}

// QueueStats counts what one queue served.
type QueueStats struct {
	Reads, Writes, Flushes, Discards, WriteZeroes, Errors uint64
	BytesRead, BytesWritten                               uint64
	// StageWritesMerged counts gathered Stage writes that went out inside
	// another's vectored write: each is a write the file did not see.
	StageWritesMerged uint64
}

type queueCounters struct {
	reads, writes, flushes, discards, writeZeroes, errors atomic.Uint64
	bytesRead, bytesWritten                               atomic.Uint64
	stageWritesMerged                                     atomic.Uint64
}

// count records one request that completed with res: every request counts
// once under its operation, with its bytes when it moved data, and once
// more as an error when res is negative.
func (c *queueCounters) count(op uapi.IOOp, res int32) {
	switch op {
	case uapi.IOOpRead:
		c.reads.Add(1)
		if res > 0 {
			c.bytesRead.Add(uint64(res))
		}
	case uapi.IOOpWrite:
		c.writes.Add(1)
		if res > 0 {
			c.bytesWritten.Add(uint64(res))
		}
	case uapi.IOOpFlush:
		c.flushes.Add(1)
	case uapi.IOOpDiscard:
		c.discards.Add(1)
	case uapi.IOOpWriteZeroes:
		c.writeZeroes.Add(1)
	}
	if res < 0 {
		c.errors.Add(1)
	}
}

func (c *queueCounters) snapshot() QueueStats {
	return QueueStats{
		Reads: c.reads.Load(), Writes: c.writes.Load(), Flushes: c.flushes.Load(),
		Discards: c.discards.Load(), WriteZeroes: c.writeZeroes.Load(), Errors: c.errors.Load(),
		BytesRead: c.bytesRead.Load(), BytesWritten: c.bytesWritten.Load(),
		StageWritesMerged: c.stageWritesMerged.Load(),
	}
}

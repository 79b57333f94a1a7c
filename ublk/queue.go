package ublk

import (
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/ublk/uapi"
	"github.com/dbdublk/dbdublk/ublk/uring"
)

// Registered-file slots on every queue ring.
const (
	fixedChar = 0 // /dev/ublkcN
	fixedFile = 1 // the FileBackend's descriptor
)

// user_data layout: bits 0-15 tag, bits 16-23 kind.
const (
	kindUblk   = 0 // FETCH / COMMIT_AND_FETCH on /dev/ublkcN
	kindTarget = 1 // backend I/O issued on behalf of a tag
	kindWake   = 2 // the wake eventfd became readable (tag field unused)
)

func userData(kind, tag int) uint64 { return uint64(kind)<<16 | uint64(tag) }

// QueueStats counts what one queue served.
type QueueStats struct {
	Reads, Writes, Flushes, Discards, WriteZeroes, Errors uint64
	BytesRead, BytesWritten                               uint64
}

type queueCounters struct {
	reads, writes, flushes, discards, writeZeroes, errors atomic.Uint64
	bytesRead, bytesWritten                               atomic.Uint64
}

// tagState is the queue thread's per-tag bookkeeping (touched only by that
// thread).
type tagState struct {
	desc    uapi.IODesc // copy taken when the request arrived
	aborted bool
	busy    bool   // a backend operation is in flight for this tag
	hooked  bool   // BeforeWrite admitted this request; AfterWrite is owed
	token   uint64 // BeforeWrite's token
}

// queue serves one hardware queue of a device on one locked OS thread with
// its own io_uring: ublk commands and the backend's file I/O share the ring,
// so a request is one ring round trip for the kernel and one for the disk.
type queue struct {
	id      int
	depth   int
	bufSize int
	charFd  int
	backend Backend
	file    FileBackend      // nil unless the fast path applies
	hook    WriteInterceptor // nil unless the file backend intercepts writes
	reader  ReadFinisher     // nil unless the file backend finishes reads
	logf    func(string, ...any)

	ring   *uring.Ring
	descs  []uapi.IODesc // read-only kernel mapping, indexed by tag
	descMM []byte
	bufs   []byte // depth × bufSize, off-heap and page aligned
	tags   []tagState
	cqes   [128]uapi.CQE

	aborted  int
	inflight int // backend operations (and interceptor waits) in flight
	stats    queueCounters

	// Deferred admissions: a WriteInterceptor that answered WritePending
	// calls resumers[tag] from any goroutine; the tag is queued here and the
	// queue thread is woken through wakeFd, which it keeps polled on its
	// ring.
	resumers []func(error)
	wakeFd   int
	wakeBuf  []byte // off-heap 8 bytes the eventfd read lands in
	resumeMu sync.Mutex
	resumed  []resumed
	spare    []resumed
}

type resumed struct {
	tag int
	err error
}

// resume is called by a WriteInterceptor when a pending write may proceed
// (err nil) or must fail.
func (q *queue) resume(tag int, err error) {
	q.resumeMu.Lock()
	q.resumed = append(q.resumed, resumed{tag, err})
	q.resumeMu.Unlock()
	var one = [8]byte{1}
	unix.Write(q.wakeFd, one[:])
}

func (q *queue) buf(tag int) []byte { return q.bufs[tag*q.bufSize : (tag+1)*q.bufSize] }

// run is the queue thread. It reports setup success or failure on ready, then
// serves until every tag has been aborted by the kernel (device stopped).
func (q *queue) run(ready chan<- error, done chan<- error) {
	// The kernel binds the queue to the thread that fetched its tags; the
	// goroutine never unlocks, so when it returns the thread exits with it.
	runtime.LockOSThread()
	// Reclaim on this thread must not start I/O that could need this queue.
	_ = unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0)

	if err := q.setup(); err != nil {
		q.teardown()
		ready <- err
		done <- err
		return
	}
	ready <- nil
	done <- q.serve()
	q.teardown()
}

func (q *queue) setup() error {
	var err error
	q.ring, err = uring.New(uring.Options{
		Entries:   uint32(2 * q.depth),
		CQEntries: uint32(4 * q.depth),
		Flags:     uapi.SetupCoopTaskrun | uapi.SetupSingleIssuer | uapi.SetupDeferTaskrun | uapi.SetupSubmitAll,
	})
	if err != nil {
		return fmt.Errorf("queue %d: ring: %w", q.id, err)
	}
	page := os.Getpagesize()
	descLen := (q.depth*uapi.SizeofIODesc + page - 1) / page * page
	q.descMM, err = unix.Mmap(q.charFd, uapi.CmdBufOffset+int64(q.id)*uapi.DescStride(page), descLen,
		unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("queue %d: map descriptors: %w", q.id, err)
	}
	q.descs = unsafe.Slice((*uapi.IODesc)(unsafe.Pointer(&q.descMM[0])), q.depth)
	q.bufs, err = unix.Mmap(-1, 0, q.depth*q.bufSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("queue %d: buffers: %w", q.id, err)
	}
	q.tags = make([]tagState, q.depth)
	fds := []int32{int32(q.charFd)}
	if q.file != nil {
		fds = append(fds, int32(q.file.FD()))
	}
	if err := q.ring.RegisterFiles(fds); err != nil {
		return fmt.Errorf("queue %d: register files: %w", q.id, err)
	}
	if q.hook != nil {
		q.wakeFd, err = unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
		if err != nil {
			return fmt.Errorf("queue %d: eventfd: %w", q.id, err)
		}
		q.wakeBuf, err = unix.Mmap(-1, 0, os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			return fmt.Errorf("queue %d: wake buffer: %w", q.id, err)
		}
		q.resumers = make([]func(error), q.depth)
		for tag := range q.resumers {
			q.resumers[tag] = func(err error) { q.resume(tag, err) }
		}
		q.armWake()
	}
	for tag := 0; tag < q.depth; tag++ {
		q.prepIOCmd(uapi.IOFetchReq, tag, 0)
	}
	if _, err := q.ring.Submit(); err != nil {
		return fmt.Errorf("queue %d: submit fetches: %w", q.id, err)
	}
	return nil
}

func (q *queue) teardown() {
	if q.ring != nil {
		q.ring.Close()
	}
	if q.wakeBuf != nil {
		unix.Close(q.wakeFd)
		unix.Munmap(q.wakeBuf)
		q.wakeBuf = nil
	}
	if q.descMM != nil {
		unix.Munmap(q.descMM)
		q.descMM, q.descs = nil, nil
	}
	if q.bufs != nil {
		unix.Munmap(q.bufs)
		q.bufs = nil
	}
}

// sqe returns a free submission slot, flushing the SQ to the kernel when it
// is full.
func (q *queue) sqe() *uapi.SQE {
	for {
		if s := q.ring.NextSQE(); s != nil {
			return s
		}
		if _, err := q.ring.Submit(); err != nil {
			q.logf("queue %d: submit: %v", q.id, err)
		}
	}
}

// prepIOCmd queues FETCH or COMMIT_AND_FETCH for tag.
func (q *queue) prepIOCmd(op uapi.IOCmdOp, tag int, result int32) {
	s := q.sqe()
	uring.PrepURingCmd(s, fixedChar, uint32(op))
	s.Flags |= uapi.SQEFixedFile
	s.UserData = userData(kindUblk, tag)
	cmd := (*uapi.IOCmd)(unsafe.Pointer(&uring.CmdArea(s, false)[0]))
	*cmd = uapi.IOCmd{
		QID:    uint16(q.id),
		Tag:    uint16(tag),
		Result: result,
		Addr:   uint64(uintptr(unsafe.Pointer(&q.bufs[tag*q.bufSize]))),
	}
}

func (q *queue) serve() error {
	for {
		if q.aborted == q.depth && q.inflight == 0 {
			return nil
		}
		if _, err := q.ring.SubmitAndWait(1); err != nil {
			return fmt.Errorf("queue %d: wait: %w", q.id, err)
		}
		n := q.ring.ReapCQEs(q.cqes[:])
		for i := 0; i < n; i++ {
			c := &q.cqes[i]
			if c.UserData>>16 == kindWake {
				q.onWake()
				continue
			}
			tag := int(c.UserData & 0xffff)
			if tag >= q.depth {
				q.logf("queue %d: completion for unknown tag %d", q.id, tag)
				continue
			}
			switch c.UserData >> 16 {
			case kindUblk:
				q.onRequest(tag, c.Res)
			case kindTarget:
				q.onBackendDone(tag, c.Res)
			}
		}
	}
}

// onRequest handles the completion of a FETCH or COMMIT_AND_FETCH: either a
// new request for tag, or the kernel's abort.
func (q *queue) onRequest(tag int, res int32) {
	st := &q.tags[tag]
	if res != uapi.IOResOK {
		if !st.aborted {
			st.aborted = true
			q.aborted++
		}
		if res != uapi.IOResAbort {
			q.logf("queue %d tag %d: io command failed: %v", q.id, tag, unix.Errno(-res))
		}
		return
	}
	// Copy the descriptor first: the kernel rewrites it for the next request
	// once we commit.
	st.desc = q.descs[tag]
	if q.file != nil {
		q.issueFile(tag, st)
		return
	}
	q.prepIOCmd(uapi.IOCommitAndFetchReq, tag, q.handleSync(tag, &st.desc))
}

// issueFile turns a request into one io_uring operation on the backend
// file, after a write interceptor has admitted it.
func (q *queue) issueFile(tag int, st *tagState) {
	d := &st.desc
	if q.hook != nil && (d.Op() == uapi.IOOpWrite || d.Op() == uapi.IOOpDiscard || d.Op() == uapi.IOOpWriteZeroes) {
		n := int64(d.NrSectors) << 9
		token, action, err := q.hook.BeforeWrite(d.Op(), int64(d.StartSector<<9), n, q.resumers[tag])
		if err != nil {
			q.stats.errors.Add(1)
			q.prepIOCmd(uapi.IOCommitAndFetchReq, tag, errnoResult(0, err))
			return
		}
		st.hooked, st.token = true, token
		switch action {
		case WriteSkip:
			q.countOp(d.Op(), int32(n))
			q.finishEarly(tag, 0)
			return
		case WritePending:
			// The interceptor calls resume from another goroutine when
			// the write may go ahead; until then the tag is busy.
			st.busy = true
			q.inflight++
			return
		}
	}
	q.issueFileOp(tag, st)
}

// issueFileOp queues the file operation of an admitted request.
func (q *queue) issueFileOp(tag int, st *tagState) {
	d := &st.desc
	off := d.StartSector << 9
	n := d.NrSectors << 9
	var s *uapi.SQE
	switch d.Op() {
	case uapi.IOOpRead, uapi.IOOpWrite:
		if int(n) > q.bufSize {
			q.finishEarly(tag, -int32(unix.EINVAL))
			return
		}
		s = q.sqe()
		buf := unsafe.Pointer(&q.bufs[tag*q.bufSize])
		if d.Op() == uapi.IOOpRead {
			uring.PrepRead(s, fixedFile, buf, n, off)
		} else {
			uring.PrepWrite(s, fixedFile, buf, n, off, 0)
			if d.OpFlags&uapi.IOFlagFUA != 0 {
				s.OpFlags = uapi.RWFDsync
			}
		}
	case uapi.IOOpFlush:
		s = q.sqe()
		uring.PrepFsync(s, fixedFile, uapi.FsyncDatasync)
	case uapi.IOOpDiscard:
		if !q.file.CanDiscard() {
			q.stats.discards.Add(1)
			q.finishEarly(tag, 0)
			return
		}
		s = q.sqe()
		uring.PrepFallocate(s, fixedFile, uapi.FallocPunchHole|uapi.FallocKeepSize, off, uint64(n))
	case uapi.IOOpWriteZeroes:
		s = q.sqe()
		uring.PrepFallocate(s, fixedFile, uapi.FallocZeroRange|uapi.FallocKeepSize, off, uint64(n))
	default:
		q.finishEarly(tag, -int32(unix.EOPNOTSUPP))
		return
	}
	s.Flags |= uapi.SQEFixedFile
	s.UserData = userData(kindTarget, tag)
	st.busy = true
	q.inflight++
}

// armWake keeps one read of the wake eventfd in flight on the ring; its
// completion means some pending writes were resumed.
func (q *queue) armWake() {
	s := q.sqe()
	uring.PrepRead(s, int32(q.wakeFd), unsafe.Pointer(&q.wakeBuf[0]), 8, 0)
	s.UserData = userData(kindWake, 0)
}

// onWake issues (or fails) every write whose admission completed.
func (q *queue) onWake() {
	q.resumeMu.Lock()
	batch := q.resumed
	q.resumed = q.spare[:0]
	q.resumeMu.Unlock()
	for _, r := range batch {
		st := &q.tags[r.tag]
		st.busy = false
		q.inflight--
		if r.err != nil {
			q.finishEarly(r.tag, errnoResult(0, r.err))
			continue
		}
		q.issueFileOp(r.tag, st)
	}
	q.spare = batch[:0]
	if q.aborted < q.depth || q.inflight > 0 {
		q.armWake()
	}
}

// finishEarly commits a request that never reached the file, settling a
// write interceptor's admission first.
func (q *queue) finishEarly(tag int, res int32) {
	st := &q.tags[tag]
	if st.hooked {
		st.hooked = false
		q.hook.AfterWrite(st.token)
	}
	if res < 0 {
		q.stats.errors.Add(1)
	}
	q.prepIOCmd(uapi.IOCommitAndFetchReq, tag, res)
}

// onBackendDone commits the result of a file operation to the kernel.
func (q *queue) onBackendDone(tag int, res int32) {
	st := &q.tags[tag]
	st.busy = false
	q.inflight--
	if st.hooked {
		st.hooked = false
		q.hook.AfterWrite(st.token)
	}
	d := &st.desc
	n := int32(d.NrSectors << 9)
	switch d.Op() {
	case uapi.IOOpRead:
		if res == 0 && n > 0 {
			res = -int32(unix.EIO) // a zero-byte read is end of device: never requeue
		}
		if res > 0 && q.reader != nil {
			if err := q.reader.FinishRead(q.buf(tag)[:res], int64(d.StartSector<<9)); err != nil {
				res = errnoResult(0, err)
			}
		}
		q.count(&q.stats.reads, &q.stats.bytesRead, res)
	case uapi.IOOpWrite:
		if res == 0 && n > 0 {
			res = -int32(unix.EIO) // zero would make the kernel requeue forever
		}
		q.count(&q.stats.writes, &q.stats.bytesWritten, res)
	case uapi.IOOpDiscard:
		// Discard is a hint: a device that cannot deallocate keeps the data.
		if res == -int32(unix.EOPNOTSUPP) {
			res = 0
		}
		q.stats.discards.Add(1)
	case uapi.IOOpFlush:
		q.stats.flushes.Add(1)
	case uapi.IOOpWriteZeroes:
		q.stats.writeZeroes.Add(1)
	}
	if res < 0 {
		q.stats.errors.Add(1)
	} else if d.Op() != uapi.IOOpRead && d.Op() != uapi.IOOpWrite {
		res = 0
	}
	q.prepIOCmd(uapi.IOCommitAndFetchReq, tag, res)
}

// countOp counts a request completed without backend I/O.
func (q *queue) countOp(op uapi.IOOp, n int32) {
	switch op {
	case uapi.IOOpWrite:
		q.count(&q.stats.writes, &q.stats.bytesWritten, n)
	case uapi.IOOpDiscard:
		q.stats.discards.Add(1)
	case uapi.IOOpWriteZeroes:
		q.stats.writeZeroes.Add(1)
	}
}

func (q *queue) count(ops, bytes *atomic.Uint64, res int32) {
	ops.Add(1)
	if res > 0 {
		bytes.Add(uint64(res))
	}
}

// handleSync serves a request through the generic Backend interface on the
// queue thread and returns the value to commit.
func (q *queue) handleSync(tag int, d *uapi.IODesc) int32 {
	off := int64(d.StartSector << 9)
	n := int(d.NrSectors << 9)
	var res int32
	switch d.Op() {
	case uapi.IOOpRead:
		if n > q.bufSize {
			q.stats.errors.Add(1)
			return -int32(unix.EINVAL)
		}
		res = errnoResult(q.backend.ReadAt(q.buf(tag)[:n], off))
		if res == 0 && n > 0 {
			res = -int32(unix.EIO)
		}
		q.count(&q.stats.reads, &q.stats.bytesRead, res)
	case uapi.IOOpWrite:
		if n > q.bufSize {
			q.stats.errors.Add(1)
			return -int32(unix.EINVAL)
		}
		p := q.buf(tag)[:n]
		if fw, ok := q.backend.(FUAWriter); ok && d.OpFlags&uapi.IOFlagFUA != 0 {
			res = errnoResult(fw.WriteAtFUA(p, off))
		} else {
			res = errnoResult(q.backend.WriteAt(p, off))
			if res > 0 && d.OpFlags&uapi.IOFlagFUA != 0 {
				if f, ok := q.backend.(Flusher); ok {
					if err := f.Flush(); err != nil {
						res = errnoResult(0, err)
					}
				}
			}
		}
		if res == 0 && n > 0 {
			res = -int32(unix.EIO)
		}
		q.count(&q.stats.writes, &q.stats.bytesWritten, res)
	case uapi.IOOpFlush:
		q.stats.flushes.Add(1)
		if f, ok := q.backend.(Flusher); ok {
			res = errnoResult(0, f.Flush())
		}
	case uapi.IOOpDiscard:
		q.stats.discards.Add(1)
		if dc, ok := q.backend.(Discarder); ok {
			res = errnoResult(0, dc.Discard(off, int64(n)))
			if res == -int32(unix.EOPNOTSUPP) {
				res = 0 // a hint the backend cannot act on, as on the file path
			}
		}
	case uapi.IOOpWriteZeroes:
		q.stats.writeZeroes.Add(1)
		if z, ok := q.backend.(ZeroWriter); ok {
			res = errnoResult(0, z.WriteZeroes(off, int64(n), d.OpFlags&uapi.IOFlagNoUnmap == 0))
		} else {
			res = -int32(unix.EOPNOTSUPP)
		}
	default:
		res = -int32(unix.EOPNOTSUPP)
	}
	if res < 0 {
		q.stats.errors.Add(1)
	}
	return res
}

func (q *queue) snapshotStats() QueueStats {
	s := &q.stats
	return QueueStats{
		Reads: s.reads.Load(), Writes: s.writes.Load(), Flushes: s.flushes.Load(),
		Discards: s.discards.Load(), WriteZeroes: s.writeZeroes.Load(), Errors: s.errors.Load(),
		BytesRead: s.bytesRead.Load(), BytesWritten: s.bytesWritten.Load(),
	}
}

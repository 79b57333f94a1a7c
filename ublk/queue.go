package ublk

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/ublk/uapi"
	"github.com/dbdublk/dbdublk/ublk/uring"
)

// Registered-file slots on every queue ring.
const (
	fixedChar = 0 // /dev/ublkcN
	fixedFile = 1 // the backend's descriptor
)

// user_data layout: bits 0-15 tag, bits 16-23 kind, and for a patch read
// bits 24-55 its length.
const (
	kindUblk   = 0 // FETCH / COMMIT_AND_FETCH on /dev/ublkcN
	kindTarget = 1 // backend I/O issued on behalf of a tag
	kindWake   = 2 // the wake eventfd became readable (tag field unused)
	kindPatch  = 3 // a ReadPatcher's patch read into a tag's pages
	kindStage  = 4 // an operation of a Stager's Stage (bits 24-55: its length)
	kindGather = 5 // a vectored write of gathered Stage writes (tag: the first one's)
)

func userData(kind, tag int) uint64 { return uint64(kind)<<16 | uint64(tag) }

func kindOf(userData uint64) int { return int(userData>>16) & 0xff }

// Ring sizes per tag: a tag has at most one ublk command and one file
// operation in flight, plus the wake read; completions get room to spare.
const (
	sqEntriesPerTag = 2
	cqEntriesPerTag = 4
	reapBatch       = 128 // completions taken from the ring per wakeup
)

// tagState is the queue thread's per-tag bookkeeping (touched only by that
// thread).
type tagState struct {
	desc    uapi.IODesc // copy taken when the request arrived
	aborted bool
	busy    bool   // a file operation or an interceptor's wait is in flight
	hooked  bool   // BeforeWrite admitted this request; AfterWrite is owed
	token   uint64 // BeforeWrite's token

	// A zero-copy read being patched: patch reads still in flight, the
	// file read's result, and the first patch failure (a negative errno).
	patches   []ReadPatch
	pending   int
	readRes   int32
	patchFail int32

	// A write's Stage: its operations still in flight and the first
	// failure (an errno; ECANCELED only until a real one arrives).
	stage        Stage
	stagePending int
	stageFail    unix.Errno

	// The tags whose gathered writes one vectored write carries, in file
	// order, while this tag's is the first of them.
	members []int
}

// queue serves one hardware queue of a device on one locked OS thread with
// its own io_uring: ublk commands and the backend's file I/O share the ring,
// so a request is one ring round trip for the kernel and one for the disk.
//
// A request's life: FETCH completes (onRequest) → a WriteInterceptor admits
// it (start), at once, after its resume (onWake) or after a Stager's stage
// has run on this ring (issueStage, onStageDone) → prepare picks its file
// operation (issue) → the operation
// completes (onFileDone) → settle and, for reads, a ReadFinisher give the
// result → complete counts it and commits it with COMMIT_AND_FETCH.
type queue struct {
	id      int
	depth   int
	bufSize int
	charFd  int
	// zeroCopy: the kernel registers each request's pages in the ring's
	// buffer table at the tag's index (AUTO_BUF_REG) and the file I/O uses
	// them in place; there are no per-tag buffers (bufs is nil).
	zeroCopy bool
	backend  Backend
	hook     WriteInterceptor // nil unless the backend intercepts writes
	stager   Stager           // nil unless the backend stages writes on the ring
	reader   ReadFinisher     // nil unless the backend finishes reads
	patcher  ReadPatcher      // nil unless the backend patches reads
	zeroFd   int              // /dev/zero, for PatchZeros (zero copy with a patcher)
	logf     func(string, ...any)

	// commit hands a tag's result to the kernel (COMMIT_AND_FETCH, which
	// also fetches the tag's next request). It is a field so that the
	// request path can be driven without a ublk device (export_test.go).
	commit func(tag int, res int32)

	ring   *uring.Ring
	descs  []uapi.IODesc // read-only kernel mapping, indexed by tag
	descMM []byte
	bufs   []byte // depth × bufSize, off-heap and page aligned
	tags   []tagState
	cqes   [reapBatch]uapi.CQE

	aborted  int
	inflight int // file operations (and interceptor waits) in flight
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

	// Gathered Stage writes wait in gathered until the ring is next
	// submitted (flushGathered); gatherIov is off-heap room for the iovecs
	// of every vectored write in flight, maxGather per tag that leads one.
	gathered  []int
	gatherIov []unix.Iovec
	gatherMM  []byte
}

// Limits of one vectored write of gathered Stage writes: the iovecs it
// takes, and its bytes (its result must fit a CQE's int32).
const (
	maxGather      = 64
	maxGatherBytes = 16 << 20
)

type resumed struct {
	tag int
	err error
}

func newQueue(id, depth, bufSize, charFd int, zeroCopy bool, b Backend, logf func(string, ...any)) *queue {
	q := &queue{id: id, depth: depth, bufSize: bufSize, charFd: charFd, zeroCopy: zeroCopy, backend: b, logf: logf}
	q.hook, _ = b.(WriteInterceptor)
	q.stager, _ = b.(Stager)
	q.reader, _ = b.(ReadFinisher)
	q.patcher, _ = b.(ReadPatcher)
	q.zeroFd = -1
	q.commit = q.commitAndFetch
	return q
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

// setup prepares the ring, buffers and descriptors, then fetches every tag.
func (q *queue) setup() error {
	if err := q.setupRing(); err != nil {
		return err
	}
	page := os.Getpagesize()
	descLen := (q.depth*uapi.SizeofIODesc + page - 1) / page * page
	var err error
	q.descMM, err = unix.Mmap(q.charFd, uapi.CmdBufOffset+int64(q.id)*uapi.DescStride(page), descLen,
		unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("queue %d: map descriptors: %w", q.id, err)
	}
	q.descs = unsafe.Slice((*uapi.IODesc)(unsafe.Pointer(&q.descMM[0])), q.depth)
	for tag := 0; tag < q.depth; tag++ {
		q.prepIOCmd(uapi.IOFetchReq, tag, 0)
	}
	if _, err := q.ring.Submit(); err != nil {
		return fmt.Errorf("queue %d: submit fetches: %w", q.id, err)
	}
	return nil
}

// setupRing creates the ring, the tags' data buffers, registers the char
// device and the backend file, and arms the wake eventfd of an interceptor.
// It is everything the request path needs besides the ublk device itself.
func (q *queue) setupRing() error {
	var err error
	q.ring, err = uring.New(uring.Options{
		Entries:   uint32(sqEntriesPerTag*q.depth + MaxStageIO),
		CQEntries: uint32(cqEntriesPerTag * q.depth),
		Flags:     uapi.SetupCoopTaskrun | uapi.SetupSingleIssuer | uapi.SetupDeferTaskrun | uapi.SetupSubmitAll,
	})
	if err != nil {
		return fmt.Errorf("queue %d: ring: %w", q.id, err)
	}
	if q.zeroCopy {
		if err := q.ring.RegisterSparseBuffers(uint32(q.depth)); err != nil {
			return fmt.Errorf("queue %d: %w", q.id, err)
		}
		if q.patcher != nil {
			if q.zeroFd, err = unix.Open("/dev/zero", unix.O_RDONLY|unix.O_CLOEXEC, 0); err != nil {
				return fmt.Errorf("queue %d: open /dev/zero: %w", q.id, err)
			}
		}
	} else if q.bufs, err = mapBuffers(q.depth * q.bufSize); err != nil {
		return fmt.Errorf("queue %d: buffers: %w", q.id, err)
	}
	q.tags = make([]tagState, q.depth)
	if err := q.ring.RegisterFiles([]int32{int32(q.charFd), int32(q.backend.FD())}); err != nil {
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
	if q.stager != nil {
		n := q.depth * maxGather * int(unsafe.Sizeof(unix.Iovec{}))
		if q.gatherMM, err = unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
			return fmt.Errorf("queue %d: gather vectors: %w", q.id, err)
		}
		q.gatherIov = unsafe.Slice((*unix.Iovec)(unsafe.Pointer(&q.gatherMM[0])), q.depth*maxGather)
		q.gathered = make([]int, 0, q.depth)
	}
	return nil
}

// mapBuffers maps n bytes for the per-tag buffers of copy mode, off the Go
// heap. Transparent huge pages are refused for them: with huge pages one
// 4 KiB request makes 2 MiB resident, and the server's RSS soon holds all
// of depth × max I/O size.
func mapBuffers(n int) ([]byte, error) {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, err
	}
	// EINVAL: a kernel without transparent huge pages, nothing to refuse.
	if err := unix.Madvise(b, unix.MADV_NOHUGEPAGE); err != nil && !errors.Is(err, unix.EINVAL) {
		unix.Munmap(b)
		return nil, fmt.Errorf("madvise no huge pages: %w", err)
	}
	return b, nil
}

func (q *queue) teardown() {
	if q.ring != nil {
		q.ring.Close()
	}
	if q.zeroFd >= 0 {
		unix.Close(q.zeroFd)
		q.zeroFd = -1
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
	if q.gatherMM != nil {
		unix.Munmap(q.gatherMM)
		q.gatherMM, q.gatherIov = nil, nil
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
	*cmd = uapi.IOCmd{QID: uint16(q.id), Tag: uint16(tag), Result: result}
	if q.zeroCopy {
		// The tag's next request is registered at the tag's own slot, so
		// no two requests ever want the same one.
		s.Addr = uapi.AutoBufReg{Index: uint16(tag)}.SQEAddr()
	} else {
		cmd.Addr = uint64(uintptr(unsafe.Pointer(&q.bufs[tag*q.bufSize])))
	}
}

func (q *queue) commitAndFetch(tag int, res int32) { q.prepIOCmd(uapi.IOCommitAndFetchReq, tag, res) }

func (q *queue) serve() error {
	for q.aborted < q.depth || q.inflight > 0 {
		if err := q.waitAndDispatch(); err != nil {
			return err
		}
	}
	return nil
}

// waitAndDispatch submits what is queued, waits for at least one
// completion and handles every completion there is.
func (q *queue) waitAndDispatch() error {
	q.flushGathered()
	if _, err := q.ring.SubmitAndWait(1); err != nil {
		return fmt.Errorf("queue %d: wait: %w", q.id, err)
	}
	n := q.ring.ReapCQEs(q.cqes[:])
	for i := 0; i < n; i++ {
		c := &q.cqes[i]
		kind := kindOf(c.UserData)
		if kind == kindWake {
			q.onWake()
			continue
		}
		tag := int(c.UserData & 0xffff)
		if tag >= q.depth {
			q.logf("queue %d: completion for unknown tag %d", q.id, tag)
			continue
		}
		switch kind {
		case kindUblk:
			q.onRequest(tag, c.Res)
		case kindTarget:
			q.onFileDone(tag, c.Res)
		case kindPatch:
			q.onPatchDone(tag, c.Res, int32(c.UserData>>24))
		case kindStage:
			q.onStageDone(tag, c.Res, int32(c.UserData>>24))
		case kindGather:
			q.onGatherDone(tag, c.Res)
		}
	}
	return nil
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
	q.start(tag)
}

// start lets a WriteInterceptor admit a modifying request, then issues it.
func (q *queue) start(tag int) {
	st := &q.tags[tag]
	d := &st.desc
	if q.hook != nil && modifies(d.Op()) {
		var token uint64
		var action WriteAction
		var err error
		if q.stager != nil {
			token, action, err = q.stager.BeforeWriteStaged(d.Op(), int64(d.StartSector<<9), int64(bytesOf(d)), q.resumers[tag], &st.stage)
		} else {
			token, action, err = q.hook.BeforeWrite(d.Op(), int64(d.StartSector<<9), int64(bytesOf(d)), q.resumers[tag])
		}
		if err != nil {
			q.complete(tag, errnoResult(0, err))
			return
		}
		st.hooked, st.token = true, token
		switch action {
		case WriteSkip:
			q.complete(tag, skipped(d))
			return
		case WritePending:
			// The interceptor calls resume from another goroutine when
			// the write may go ahead; until then the tag is busy.
			st.busy = true
			q.inflight++
			return
		case WriteStaged:
			q.issueStage(tag)
			return
		}
	}
	q.issue(tag)
}

// issueStage queues the operations of a tag's Stage as one linked chain.
func (q *queue) issueStage(tag int) {
	st := &q.tags[tag]
	ops := st.stage.IO
	st.stageFail, st.stagePending = 0, len(ops)
	if len(ops) == 0 || len(ops) > MaxStageIO {
		if len(ops) > 0 {
			st.stageFail = unix.EINVAL
		}
		st.stagePending = 1 // settled right here
		st.busy = true
		q.inflight++
		q.onStageDone(tag, 0, 0)
		return
	}
	if len(ops) == 1 && ops[0].Write && ops[0].Gather && len(ops[0].Buf) > 0 {
		// Issued with its neighbours when the ring is next submitted.
		q.gathered = append(q.gathered, tag)
		st.busy = true
		q.inflight++
		return
	}
	if q.ring.SQSpace() < uint32(len(ops)) {
		if _, err := q.ring.Submit(); err != nil {
			q.logf("queue %d: submit: %v", q.id, err)
		}
	}
	for i := range ops {
		s := q.prepStageIO(tag, &ops[i])
		if i < len(ops)-1 {
			s.Flags |= uapi.SQEIOLink
		}
	}
	st.busy = true
	q.inflight += len(ops)
}

// prepStageIO queues one operation of tag's Stage on its own.
func (q *queue) prepStageIO(tag int, o *StageIO) *uapi.SQE {
	s := q.sqe()
	if o.Write {
		uring.PrepWrite(s, int32(o.FD), unsafe.Pointer(&o.Buf[0]), uint32(len(o.Buf)), uint64(o.Off), 0)
	} else {
		uring.PrepRead(s, int32(o.FD), unsafe.Pointer(&o.Buf[0]), uint32(len(o.Buf)), uint64(o.Off))
	}
	s.UserData = userData(kindStage, tag) | uint64(len(o.Buf))<<24
	return s
}

// flushGathered issues the gathered Stage writes: one write for each run of
// them adjacent in the same file (up to maxGather and maxGatherBytes), a
// vectored one where the run has more than one.
func (q *queue) flushGathered() {
	if len(q.gathered) == 0 {
		return
	}
	slices.SortFunc(q.gathered, func(a, b int) int {
		x, y := &q.tags[a].stage.IO[0], &q.tags[b].stage.IO[0]
		return cmp.Or(cmp.Compare(x.FD, y.FD), cmp.Compare(x.Off, y.Off))
	})
	for i := 0; i < len(q.gathered); {
		lead := q.gathered[i]
		first := &q.tags[lead].stage.IO[0]
		end, bytes := first.Off+int64(len(first.Buf)), len(first.Buf)
		j := i + 1
		for ; j < len(q.gathered) && j-i < maxGather; j++ {
			o := &q.tags[q.gathered[j]].stage.IO[0]
			if o.FD != first.FD || o.Off != end || bytes+len(o.Buf) > maxGatherBytes {
				break
			}
			end += int64(len(o.Buf))
			bytes += len(o.Buf)
		}
		if j == i+1 {
			q.prepStageIO(lead, first)
		} else {
			s := q.sqe()
			lst := &q.tags[lead]
			lst.members = append(lst.members[:0], q.gathered[i:j]...)
			iov := q.gatherIov[lead*maxGather : lead*maxGather+len(lst.members)]
			for k, m := range lst.members {
				b := q.tags[m].stage.IO[0].Buf
				iov[k].Base = &b[0]
				iov[k].SetLen(len(b))
			}
			uring.PrepWritev(s, int32(first.FD), unsafe.Pointer(&iov[0]), uint32(len(iov)), uint64(first.Off))
			s.UserData = userData(kindGather, lead)
			q.stats.stageWritesMerged.Add(uint64(len(lst.members) - 1))
		}
		i = j
	}
	q.gathered = q.gathered[:0]
}

// onGatherDone settles each write a vectored write carried, by the bytes
// of its own that the write covered.
func (q *queue) onGatherDone(lead int, res int32) {
	members := q.tags[lead].members
	q.tags[lead].members = members[:0]
	var at int32
	for _, m := range members {
		want := int32(len(q.tags[m].stage.IO[0].Buf))
		got := want
		switch {
		case res < 0:
			got = res
		case res < at+want:
			got = max(res-at, 0)
		}
		at += want
		q.onStageDone(m, got, want)
	}
}

// onStageDone settles one operation of a Stage that wanted want bytes; the
// last one hands the outcome to the Stage's Done.
func (q *queue) onStageDone(tag int, res, want int32) {
	st := &q.tags[tag]
	q.inflight--
	if res != want && (st.stageFail == 0 || st.stageFail == unix.ECANCELED) {
		st.stageFail = unix.EIO
		if res < 0 {
			st.stageFail = unix.Errno(-res)
		}
	}
	if st.stagePending--; st.stagePending > 0 {
		return
	}
	st.busy = false
	var err error
	if st.stageFail != 0 {
		err = st.stageFail
	}
	more, verdict := st.stage.Done(err)
	if more {
		q.issueStage(tag)
		return
	}
	q.resolve(tag, verdict)
}

// resolve ends the wait of a deferred write with its verdict: nil issues
// it, ErrSkipWrite completes it untouched, ErrResumeLater waits for its
// resume, anything else fails it.
func (q *queue) resolve(tag int, verdict error) {
	st := &q.tags[tag]
	switch {
	case verdict == nil:
		q.issue(tag)
	case errors.Is(verdict, ErrSkipWrite):
		q.complete(tag, skipped(&st.desc))
	case errors.Is(verdict, ErrResumeLater):
		st.busy = true
		q.inflight++
	default:
		q.complete(tag, errnoResult(0, verdict))
	}
}

// issue queues the file operation of an admitted request.
func (q *queue) issue(tag int) {
	st := &q.tags[tag]
	op := prepare(&st.desc, q.bufSize, q.backend.CanDiscard())
	if op.opcode == noFileOp {
		q.complete(tag, op.immediate)
		return
	}
	s := q.sqe()
	switch op.opcode {
	case uapi.OpRead:
		if q.zeroCopy {
			uring.PrepReadFixed(s, fixedFile, uint16(tag), 0, uint32(op.n), op.off)
		} else {
			uring.PrepRead(s, fixedFile, unsafe.Pointer(&q.bufs[tag*q.bufSize]), uint32(op.n), op.off)
		}
	case uapi.OpWrite:
		if q.zeroCopy {
			uring.PrepWriteFixed(s, fixedFile, uint16(tag), 0, uint32(op.n), op.off, op.rwFlags)
		} else {
			uring.PrepWrite(s, fixedFile, unsafe.Pointer(&q.bufs[tag*q.bufSize]), uint32(op.n), op.off, op.rwFlags)
		}
	case uapi.OpFsync:
		uring.PrepFsync(s, fixedFile, op.fsync)
	case uapi.OpFallocate:
		uring.PrepFallocate(s, fixedFile, op.falloc, op.off, op.n)
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
		q.tags[r.tag].busy = false
		q.inflight--
		q.resolve(r.tag, r.err)
	}
	q.spare = batch[:0]
	if q.aborted < q.depth || q.inflight > 0 {
		q.armWake()
	}
}

// onFileDone settles a file operation's result.
func (q *queue) onFileDone(tag int, res int32) {
	st := &q.tags[tag]
	st.busy = false
	q.inflight--
	res = settle(&st.desc, res)
	if res > 0 && st.desc.Op() == uapi.IOOpRead && q.reader != nil {
		off := int64(st.desc.StartSector << 9)
		switch {
		case q.zeroCopy && q.patchRead(tag, off, res):
			return // patch reads in flight: onPatchDone completes
		case q.zeroCopy:
			if err := q.patcher.FinishPatchedRead(off, int(res)); err != nil {
				res = errnoResult(0, err)
			}
		default:
			if err := q.reader.FinishRead(q.buf(tag)[:res], off); err != nil {
				res = errnoResult(0, err)
			}
		}
	}
	q.complete(tag, res)
}

// patchRead issues the patch reads of a zero-copy read whose file read
// returned res bytes at off; false when there is none to issue (a
// PatchRead failure completes the request here, true).
func (q *queue) patchRead(tag int, off int64, res int32) bool {
	st := &q.tags[tag]
	var err error
	st.patches, err = q.patcher.PatchRead(off, int(res), st.patches[:0])
	if err != nil {
		q.complete(tag, errnoResult(0, err))
		return true
	}
	if len(st.patches) == 0 {
		return false
	}
	st.readRes, st.patchFail, st.pending = res, 0, len(st.patches)
	for _, p := range st.patches {
		fd := p.FD
		if fd == PatchZeros {
			fd = q.zeroFd
		}
		s := q.sqe()
		uring.PrepReadFixed(s, int32(fd), uint16(tag), uint64(p.At), uint32(p.Len), uint64(p.Off))
		s.UserData = userData(kindPatch, tag) | uint64(p.Len)<<24
	}
	st.busy = true
	q.inflight += st.pending
	return true
}

// onPatchDone settles one patch read of want bytes; the last one ends the
// request: any short or failed patch fails it (EIO, or the patch's errno),
// otherwise FinishPatchedRead decides.
func (q *queue) onPatchDone(tag int, res, want int32) {
	st := &q.tags[tag]
	q.inflight--
	if res != want && st.patchFail == 0 {
		st.patchFail = -int32(unix.EIO)
		if res < 0 {
			st.patchFail = res
		}
	}
	if st.pending--; st.pending > 0 {
		return
	}
	st.busy = false
	result := st.readRes
	switch {
	case st.patchFail != 0:
		result = st.patchFail
	default:
		if err := q.patcher.FinishPatchedRead(int64(st.desc.StartSector<<9), int(result)); err != nil {
			result = errnoResult(0, err)
		}
	}
	q.complete(tag, result)
}

// complete ends a request, issued or not: it settles a write interceptor's
// admission, counts the request and commits its result.
func (q *queue) complete(tag int, res int32) {
	st := &q.tags[tag]
	if st.hooked {
		st.hooked = false
		q.hook.AfterWrite(st.token)
	}
	q.stats.count(st.desc.Op(), res)
	q.commit(tag, res)
}

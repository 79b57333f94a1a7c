package ublk

import (
	"bytes"
	"fmt"
	"reflect"
	"syscall"
	"testing"

	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// memBackend is an in-memory Backend that logs every call. It implements
// only ReadAt and WriteAt; the wrapper types below add the optional
// interfaces in the combinations the tests need.
type memBackend struct {
	data  []byte
	calls []string

	// Injected outcomes; a negative count means "the real count".
	readN, writeN                           int
	readErr, writeErr, flushErr, discardErr error
	zeroErr                                 error
}

func newMem(size int) *memBackend {
	m := &memBackend{data: make([]byte, size), readN: -1, writeN: -1}
	for i := range m.data {
		m.data[i] = byte(i*7 + i>>9)
	}
	return m
}

func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	m.calls = append(m.calls, fmt.Sprintf("read %d+%d", off, len(p)))
	if m.readErr != nil {
		return 0, m.readErr
	}
	n := copy(p, m.data[off:])
	if m.readN >= 0 {
		n = m.readN
	}
	return n, nil
}

func (m *memBackend) WriteAt(p []byte, off int64) (int, error) {
	m.calls = append(m.calls, fmt.Sprintf("write %d+%d", off, len(p)))
	return m.write(p, off)
}

func (m *memBackend) write(p []byte, off int64) (int, error) {
	if m.writeErr != nil {
		return 0, m.writeErr
	}
	n := copy(m.data[off:], p)
	if m.writeN >= 0 {
		n = m.writeN
	}
	return n, nil
}

func (m *memBackend) writeFUA(p []byte, off int64) (int, error) {
	m.calls = append(m.calls, fmt.Sprintf("writefua %d+%d", off, len(p)))
	return m.write(p, off)
}

func (m *memBackend) flush() error {
	m.calls = append(m.calls, "flush")
	return m.flushErr
}

func (m *memBackend) discard(off, n int64) error {
	m.calls = append(m.calls, fmt.Sprintf("discard %d+%d", off, n))
	return m.discardErr
}

func (m *memBackend) writeZeroes(off, n int64, mayUnmap bool) error {
	m.calls = append(m.calls, fmt.Sprintf("zero %d+%d unmap=%v", off, n, mayUnmap))
	return m.zeroErr
}

type flushMem struct{ *memBackend }

func (b flushMem) Flush() error { return b.flush() }

// fuaMem is both a FUAWriter and a Flusher.
type fuaMem struct{ *memBackend }

func (b fuaMem) WriteAtFUA(p []byte, off int64) (int, error) { return b.writeFUA(p, off) }
func (b fuaMem) Flush() error                                { return b.flush() }

type discardMem struct{ *memBackend }

func (b discardMem) Discard(off, n int64) error { return b.discard(off, n) }

type zeroMem struct{ *memBackend }

func (b zeroMem) WriteZeroes(off, n int64, mayUnmap bool) error {
	return b.writeZeroes(off, n, mayUnmap)
}

// Interface sets the wrappers are meant to have, checked at compile time,
// and the ones they must not have, checked in TestFakeBackendInterfaces.
var (
	_ Flusher    = flushMem{}
	_ FUAWriter  = fuaMem{}
	_ Flusher    = fuaMem{}
	_ Discarder  = discardMem{}
	_ ZeroWriter = zeroMem{}
)

func TestFakeBackendInterfaces(t *testing.T) {
	var plain Backend = newMem(0)
	if _, ok := plain.(Flusher); ok {
		t.Error("memBackend is a Flusher")
	}
	if _, ok := plain.(FUAWriter); ok {
		t.Error("memBackend is a FUAWriter")
	}
	if _, ok := plain.(Discarder); ok {
		t.Error("memBackend is a Discarder")
	}
	if _, ok := plain.(ZeroWriter); ok {
		t.Error("memBackend is a ZeroWriter")
	}
	if _, ok := Backend(flushMem{newMem(0)}).(FUAWriter); ok {
		t.Error("flushMem is a FUAWriter")
	}
}

const (
	testDepth   = 4
	testBufSize = 64 << 10
	testTag     = 2
	sentinel    = 0xA5
)

func newTestQueue(t *testing.T, b Backend) *queue {
	q := &queue{id: 0, depth: testDepth, bufSize: testBufSize, bufs: make([]byte, testDepth*testBufSize), backend: b, logf: t.Logf}
	for i := range q.bufs {
		q.bufs[i] = sentinel
	}
	return q
}

func desc(op uapi.IOOp, flags uint32, startSector uint64, sectors uint32) *uapi.IODesc {
	return &uapi.IODesc{OpFlags: uint32(op) | flags, StartSector: startSector, NrSectors: sectors}
}

func wantCalls(t *testing.T, m *memBackend, want ...string) {
	t.Helper()
	if len(want) == 0 {
		want = nil
	}
	if !reflect.DeepEqual(m.calls, want) {
		t.Errorf("backend calls = %q, want %q", m.calls, want)
	}
}

func wantStats(t *testing.T, q *queue, want QueueStats) {
	t.Helper()
	if got := q.snapshotStats(); got != want {
		t.Errorf("stats = %+v, want %+v", got, want)
	}
}

// wantOtherTagsUntouched checks that only tag testTag's buffer was written.
func wantOtherTagsUntouched(t *testing.T, q *queue) {
	t.Helper()
	for tag := 0; tag < testDepth; tag++ {
		if tag == testTag {
			continue
		}
		for i, c := range q.buf(tag) {
			if c != sentinel {
				t.Errorf("tag %d buffer byte %d = %#x, want untouched %#x", tag, i, c, sentinel)
				break
			}
		}
	}
}

func errno(e syscall.Errno) int32 { return -int32(e) }

func TestHandleSyncRead(t *testing.T) {
	m := newMem(1 << 20)
	q := newTestQueue(t, m)
	// 16 sectors at sector 8: bytes 4096..12287. A failfast flag in the upper
	// bits must not change the operation.
	res := q.handleSync(testTag, desc(uapi.IOOpRead, uapi.IOFlagFailfastDev, 8, 16))
	if res != 8192 {
		t.Fatalf("read result = %d, want 8192", res)
	}
	wantCalls(t, m, "read 4096+8192")
	buf := q.buf(testTag)
	if !bytes.Equal(buf[:8192], m.data[4096:4096+8192]) {
		t.Error("tag buffer does not hold the data read")
	}
	for i, c := range buf[8192:] {
		if c != sentinel {
			t.Fatalf("tag buffer byte %d past the request = %#x, want untouched", 8192+i, c)
		}
	}
	wantOtherTagsUntouched(t, q)
	wantStats(t, q, QueueStats{Reads: 1, BytesRead: 8192})

	// A whole-buffer read is allowed.
	if res := q.handleSync(testTag, desc(uapi.IOOpRead, 0, 0, testBufSize>>9)); res != testBufSize {
		t.Errorf("full-buffer read = %d, want %d", res, testBufSize)
	}
	if !bytes.Equal(q.buf(testTag), m.data[:testBufSize]) {
		t.Error("full-buffer read did not fill the buffer")
	}
	wantStats(t, q, QueueStats{Reads: 2, BytesRead: 8192 + testBufSize})
}

func TestHandleSyncShortRead(t *testing.T) {
	m := newMem(1 << 20)
	m.readN = 1024
	q := newTestQueue(t, m)
	if res := q.handleSync(testTag, desc(uapi.IOOpRead, 0, 0, 8)); res != 1024 {
		t.Errorf("short read = %d, want 1024 (partial count passed through)", res)
	}
	wantStats(t, q, QueueStats{Reads: 1, BytesRead: 1024})
}

func TestHandleSyncWrite(t *testing.T) {
	m := newMem(1 << 20)
	q := newTestQueue(t, m)
	payload := bytes.Repeat([]byte("dbdublk!"), 4096/8)
	copy(q.buf(testTag), payload)
	before := bytes.Clone(m.data)

	res := q.handleSync(testTag, desc(uapi.IOOpWrite, 0, 100, 8))
	if res != 4096 {
		t.Fatalf("write result = %d, want 4096", res)
	}
	wantCalls(t, m, "write 51200+4096")
	if !bytes.Equal(m.data[51200:51200+4096], payload) {
		t.Error("backend does not hold the written data")
	}
	if !bytes.Equal(m.data[:51200], before[:51200]) || !bytes.Equal(m.data[51200+4096:], before[51200+4096:]) {
		t.Error("write changed bytes outside its range")
	}
	wantStats(t, q, QueueStats{Writes: 1, BytesWritten: 4096})
}

func TestHandleSyncWriteFUA(t *testing.T) {
	t.Run("FUAWriter", func(t *testing.T) {
		m := newMem(1 << 20)
		q := newTestQueue(t, fuaMem{m})
		copy(q.buf(testTag), "fua data")
		if res := q.handleSync(testTag, desc(uapi.IOOpWrite, uapi.IOFlagFUA, 2, 1)); res != 512 {
			t.Fatalf("FUA write = %d, want 512", res)
		}
		// WriteAtFUA alone: no plain write, no extra flush.
		wantCalls(t, m, "writefua 1024+512")
		if string(m.data[1024:1032]) != "fua data" {
			t.Error("FUA write did not store the data")
		}
		wantStats(t, q, QueueStats{Writes: 1, BytesWritten: 512})
	})
	t.Run("FUAWriter without FUA flag", func(t *testing.T) {
		m := newMem(1 << 20)
		q := newTestQueue(t, fuaMem{m})
		if res := q.handleSync(testTag, desc(uapi.IOOpWrite, 0, 2, 1)); res != 512 {
			t.Fatalf("write = %d, want 512", res)
		}
		wantCalls(t, m, "write 1024+512")
	})
	t.Run("Flusher", func(t *testing.T) {
		m := newMem(1 << 20)
		q := newTestQueue(t, flushMem{m})
		if res := q.handleSync(testTag, desc(uapi.IOOpWrite, uapi.IOFlagFUA, 2, 1)); res != 512 {
			t.Fatalf("FUA write = %d, want 512", res)
		}
		wantCalls(t, m, "write 1024+512", "flush")
		wantStats(t, q, QueueStats{Writes: 1, BytesWritten: 512})
	})
	t.Run("Flusher without FUA flag", func(t *testing.T) {
		m := newMem(1 << 20)
		q := newTestQueue(t, flushMem{m})
		if res := q.handleSync(testTag, desc(uapi.IOOpWrite, 0, 2, 1)); res != 512 {
			t.Fatalf("write = %d, want 512", res)
		}
		wantCalls(t, m, "write 1024+512")
	})
	t.Run("flush fails", func(t *testing.T) {
		m := newMem(1 << 20)
		m.flushErr = fmt.Errorf("fdatasync: %w", syscall.EIO)
		q := newTestQueue(t, flushMem{m})
		if res := q.handleSync(testTag, desc(uapi.IOOpWrite, uapi.IOFlagFUA, 2, 1)); res != errno(syscall.EIO) {
			t.Fatalf("FUA write with failing flush = %d, want -EIO", res)
		}
		wantCalls(t, m, "write 1024+512", "flush")
		wantStats(t, q, QueueStats{Writes: 1, Errors: 1})
	})
	t.Run("write fails before flush", func(t *testing.T) {
		m := newMem(1 << 20)
		m.writeErr = syscall.ENOSPC
		q := newTestQueue(t, flushMem{m})
		if res := q.handleSync(testTag, desc(uapi.IOOpWrite, uapi.IOFlagFUA, 2, 1)); res != errno(syscall.ENOSPC) {
			t.Fatalf("FUA write = %d, want -ENOSPC", res)
		}
		wantCalls(t, m, "write 1024+512") // no flush after a failed write
		wantStats(t, q, QueueStats{Writes: 1, Errors: 1})
	})
	t.Run("plain backend", func(t *testing.T) {
		m := newMem(1 << 20)
		q := newTestQueue(t, m)
		if res := q.handleSync(testTag, desc(uapi.IOOpWrite, uapi.IOFlagFUA, 2, 1)); res != 512 {
			t.Fatalf("FUA write = %d, want 512", res)
		}
		wantCalls(t, m, "write 1024+512")
	})
}

func TestHandleSyncFlush(t *testing.T) {
	m := newMem(4096)
	q := newTestQueue(t, flushMem{m})
	if res := q.handleSync(testTag, desc(uapi.IOOpFlush, 0, 0, 0)); res != 0 {
		t.Fatalf("flush = %d, want 0", res)
	}
	wantCalls(t, m, "flush")
	wantStats(t, q, QueueStats{Flushes: 1})

	m.flushErr = syscall.EIO
	if res := q.handleSync(testTag, desc(uapi.IOOpFlush, 0, 0, 0)); res != errno(syscall.EIO) {
		t.Fatalf("failing flush = %d, want -EIO", res)
	}
	wantStats(t, q, QueueStats{Flushes: 2, Errors: 1})

	// Without a Flusher there is nothing to make durable: success.
	plain := newMem(4096)
	q = newTestQueue(t, plain)
	if res := q.handleSync(testTag, desc(uapi.IOOpFlush, 0, 0, 0)); res != 0 {
		t.Fatalf("flush on a non-Flusher = %d, want 0", res)
	}
	wantCalls(t, plain)
	wantStats(t, q, QueueStats{Flushes: 1})
}

func TestHandleSyncDiscard(t *testing.T) {
	m := newMem(1 << 20)
	q := newTestQueue(t, discardMem{m})
	// Discard ranges are not bounded by the tag buffer.
	if res := q.handleSync(testTag, desc(uapi.IOOpDiscard, 0, 2048, 4096)); res != 0 {
		t.Fatalf("discard = %d, want 0", res)
	}
	wantCalls(t, m, fmt.Sprintf("discard %d+%d", 2048*512, 4096*512))
	wantStats(t, q, QueueStats{Discards: 1})

	m.discardErr = fmt.Errorf("punch hole: %w", syscall.EIO)
	if res := q.handleSync(testTag, desc(uapi.IOOpDiscard, 0, 0, 8)); res != errno(syscall.EIO) {
		t.Fatalf("failing discard = %d, want -EIO", res)
	}
	wantStats(t, q, QueueStats{Discards: 2, Errors: 1})

	plain := newMem(4096)
	q = newTestQueue(t, plain)
	if res := q.handleSync(testTag, desc(uapi.IOOpDiscard, 0, 0, 8)); res != 0 {
		t.Fatalf("discard on a non-Discarder = %d, want 0", res)
	}
	wantCalls(t, plain)
	wantStats(t, q, QueueStats{Discards: 1})
}

func TestHandleSyncWriteZeroes(t *testing.T) {
	m := newMem(1 << 20)
	q := newTestQueue(t, zeroMem{m})
	if res := q.handleSync(testTag, desc(uapi.IOOpWriteZeroes, 0, 16, 1<<20)); res != 0 {
		t.Fatalf("write-zeroes = %d, want 0", res)
	}
	if res := q.handleSync(testTag, desc(uapi.IOOpWriteZeroes, uapi.IOFlagNoUnmap, 8, 8)); res != 0 {
		t.Fatalf("write-zeroes NOUNMAP = %d, want 0", res)
	}
	wantCalls(t, m,
		fmt.Sprintf("zero %d+%d unmap=true", 16*512, (1<<20)*512),
		"zero 4096+4096 unmap=false")
	wantStats(t, q, QueueStats{WriteZeroes: 2})

	m.zeroErr = syscall.EOPNOTSUPP
	if res := q.handleSync(testTag, desc(uapi.IOOpWriteZeroes, 0, 0, 8)); res != errno(syscall.EOPNOTSUPP) {
		t.Fatalf("failing write-zeroes = %d, want -EOPNOTSUPP", res)
	}
	wantStats(t, q, QueueStats{WriteZeroes: 3, Errors: 1})

	// Unlike discard, write-zeroes cannot be ignored: the range must read
	// as zeros afterwards.
	plain := newMem(4096)
	q = newTestQueue(t, plain)
	if res := q.handleSync(testTag, desc(uapi.IOOpWriteZeroes, 0, 0, 8)); res != errno(syscall.EOPNOTSUPP) {
		t.Fatalf("write-zeroes on a non-ZeroWriter = %d, want -EOPNOTSUPP", res)
	}
	wantCalls(t, plain)
	wantStats(t, q, QueueStats{WriteZeroes: 1, Errors: 1})
}

func TestHandleSyncTooLarge(t *testing.T) {
	for _, op := range []uapi.IOOp{uapi.IOOpRead, uapi.IOOpWrite} {
		m := newMem(1 << 20)
		q := newTestQueue(t, m)
		if res := q.handleSync(testTag, desc(op, 0, 0, testBufSize>>9+1)); res != errno(syscall.EINVAL) {
			t.Errorf("%v of bufSize+512 = %d, want -EINVAL", op, res)
		}
		wantCalls(t, m)
		wantOtherTagsUntouched(t, q)
		if s := q.snapshotStats(); s.Reads != 0 || s.Writes != 0 || s.BytesRead != 0 || s.BytesWritten != 0 {
			t.Errorf("%v: rejected request counted as served: %+v", op, s)
		}
	}
}

func TestHandleSyncZeroBytes(t *testing.T) {
	// A zero result for a non-empty request would make the kernel requeue it
	// forever; it must become -EIO.
	m := newMem(1 << 20)
	m.readN, m.writeN = 0, 0
	q := newTestQueue(t, m)
	if res := q.handleSync(testTag, desc(uapi.IOOpRead, 0, 0, 8)); res != errno(syscall.EIO) {
		t.Errorf("zero-byte read = %d, want -EIO", res)
	}
	if res := q.handleSync(testTag, desc(uapi.IOOpWrite, 0, 0, 8)); res != errno(syscall.EIO) {
		t.Errorf("zero-byte write = %d, want -EIO", res)
	}
	wantStats(t, q, QueueStats{Reads: 1, Writes: 1, Errors: 2})
}

func TestHandleSyncBackendErrors(t *testing.T) {
	m := newMem(1 << 20)
	m.readErr = fmt.Errorf("pread: %w", syscall.ENXIO)
	m.writeErr = syscall.EROFS
	q := newTestQueue(t, m)
	if res := q.handleSync(testTag, desc(uapi.IOOpRead, 0, 0, 8)); res != errno(syscall.ENXIO) {
		t.Errorf("failing read = %d, want -ENXIO", res)
	}
	if res := q.handleSync(testTag, desc(uapi.IOOpWrite, 0, 0, 8)); res != errno(syscall.EROFS) {
		t.Errorf("failing write = %d, want -EROFS", res)
	}
	m.writeErr = fmt.Errorf("not an errno")
	if res := q.handleSync(testTag, desc(uapi.IOOpWrite, 0, 0, 8)); res != errno(syscall.EIO) {
		t.Errorf("write failing with a non-errno = %d, want -EIO", res)
	}
	wantStats(t, q, QueueStats{Reads: 1, Writes: 2, Errors: 3})
}

func TestHandleSyncUnknownOp(t *testing.T) {
	for _, op := range []uapi.IOOp{uapi.IOOpWriteSame, 6, 0x22, 0xff} {
		m := newMem(1 << 20)
		q := newTestQueue(t, fuaMem{m})
		if res := q.handleSync(testTag, desc(op, 0, 0, 8)); res != errno(syscall.EOPNOTSUPP) {
			t.Errorf("op %#x = %d, want -EOPNOTSUPP", uint8(op), res)
		}
		wantCalls(t, m)
		wantStats(t, q, QueueStats{Errors: 1})
	}
}

func TestDeviceStatsSumsQueues(t *testing.T) {
	q1 := newTestQueue(t, newMem(1<<20))
	q2 := newTestQueue(t, flushMem{newMem(1 << 20)})
	q1.handleSync(0, desc(uapi.IOOpRead, 0, 0, 8))
	q1.handleSync(1, desc(uapi.IOOpWrite, 0, 0, 1))
	q2.handleSync(0, desc(uapi.IOOpRead, 0, 0, 16))
	q2.handleSync(0, desc(uapi.IOOpFlush, 0, 0, 0))
	q2.handleSync(0, desc(uapi.IOOpDiscard, 0, 0, 8))
	q2.handleSync(0, desc(uapi.IOOpWriteZeroes, 0, 0, 8)) // not a ZeroWriter: error
	d := &Device{queues: []*queue{q1, q2}}
	want := QueueStats{Reads: 2, Writes: 1, Flushes: 1, Discards: 1, WriteZeroes: 1, Errors: 1,
		BytesRead: 4096 + 8192, BytesWritten: 512}
	if got := d.Stats(); got != want {
		t.Errorf("Device.Stats = %+v, want %+v", got, want)
	}
}

func TestUserData(t *testing.T) {
	if kindUblk == kindTarget {
		t.Fatal("kindUblk == kindTarget")
	}
	for _, kind := range []int{kindUblk, kindTarget} {
		for _, tag := range []int{0, 1, 127, uapi.MaxQueueDepth - 1, 0xffff} {
			ud := userData(kind, tag)
			// Decode the way serve does.
			if got := int(ud & 0xffff); got != tag {
				t.Errorf("userData(%d, %d): tag decodes as %d", kind, tag, got)
			}
			if got := int(ud >> 16); got != kind {
				t.Errorf("userData(%d, %d): kind decodes as %d", kind, tag, got)
			}
		}
	}
	if got, want := userData(kindTarget, 5), uint64(1<<16|5); got != want {
		t.Errorf("userData(kindTarget, 5) = %#x, want %#x", got, want)
	}
	if got := userData(kindUblk, 42); got != 42 {
		t.Errorf("userData(kindUblk, 42) = %#x, want 42", got)
	}
}

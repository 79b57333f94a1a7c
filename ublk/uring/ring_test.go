package uring

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/ublk/uapi"
)

func newRing(t testing.TB, opt Options) *Ring {
	t.Helper()
	r, err := New(opt)
	if err != nil {
		t.Fatalf("New(%+v): %v", opt, err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// mmapBuf returns n bytes of page-aligned, off-heap memory.
func mmapBuf(t testing.TB, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatalf("mmap %d: %v", n, err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

func tempFile(t testing.TB, extra int) (int, error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "data")
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC|extra, 0o600)
	if err != nil {
		return -1, err
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd, nil
}

func mustTempFile(t testing.TB) int {
	t.Helper()
	fd, err := tempFile(t, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

func mustSQE(t testing.TB, r *Ring) *uapi.SQE {
	t.Helper()
	s := r.NextSQE()
	if s == nil {
		t.Fatal("NextSQE: SQ full")
	}
	return s
}

// waitCQEs submits and collects exactly n CQEs.
func waitCQEs(t testing.TB, r *Ring, n int) []uapi.CQE {
	t.Helper()
	out := make([]uapi.CQE, 0, n)
	buf := make([]uapi.CQE, 64)
	for len(out) < n {
		want := uint32(min(n-len(out), int(r.cqCount)))
		if _, err := r.SubmitAndWait(want); err != nil {
			t.Fatalf("SubmitAndWait(%d): %v", want, err)
		}
		k := r.ReapCQEs(buf[:min(len(buf), n-len(out))])
		out = append(out, buf[:k]...)
	}
	if extra := r.cqReady(); extra != 0 {
		t.Fatalf("%d unexpected extra CQEs", extra)
	}
	return out
}

// source is a file of 64 KiB of fill(·, 0x33), read by the tests that
// only need some cheap operation to complete; scratch is off-heap memory
// to read it into.
type source struct {
	fd      int
	scratch []byte
}

func newSource(t testing.TB) source {
	t.Helper()
	fd := mustTempFile(t)
	data := make([]byte, 64<<10)
	fill(data, 0x33)
	if _, err := unix.Pwrite(fd, data, 0); err != nil {
		t.Fatal(err)
	}
	return source{fd: fd, scratch: mmapBuf(t, 64<<10)}
}

// prepSmallRead prepares a 512-byte read of the source (slot i of the
// scratch memory, modulo its size): an operation that completes at once
// with Res 512.
func (src source) prepSmallRead(s *uapi.SQE, i int) {
	off := (i * 512) % len(src.scratch)
	PrepRead(s, int32(src.fd), unsafe.Pointer(&src.scratch[off]), 512, uint64(off))
}

func fill(b []byte, seed byte) {
	for i := range b {
		b[i] = seed + byte(i*7+i/251)
	}
}

func TestRoundTrip(t *testing.T) {
	r := newRing(t, Options{Entries: 8})
	if r.sqCount != 8 || r.cqCount != 16 {
		t.Fatalf("geometry sq %d cq %d, want 8/16", r.sqCount, r.cqCount)
	}
	src := newSource(t)
	for i := uint64(1); i <= 3; i++ {
		s := mustSQE(t, r)
		src.prepSmallRead(s, int(i))
		s.UserData = 0xdead0000 + i
	}
	n, err := r.SubmitAndWait(3)
	if err != nil || n != 3 {
		t.Fatalf("SubmitAndWait = %d, %v; want 3, nil", n, err)
	}
	if c := r.cqReady(); c != 3 {
		t.Fatalf("%d CQEs ready, want 3", c)
	}
	var cqes [8]uapi.CQE
	if k := r.ReapCQEs(cqes[:]); k != 3 {
		t.Fatalf("ReapCQEs = %d, want 3", k)
	}
	for i, c := range cqes[:3] {
		if c.UserData != 0xdead0001+uint64(i) || c.Res != 512 {
			t.Errorf("cqe %d = %+v", i, c)
		}
	}
	if k := r.ReapCQEs(cqes[:]); k != 0 {
		t.Fatalf("ReapCQEs on empty CQ = %d", k)
	}
	// Nothing pending, nothing to wait for: Submit is a no-op.
	if n, err := r.Submit(); n != 0 || err != nil {
		t.Fatalf("empty Submit = %d, %v", n, err)
	}
	// Nor does SubmitAndWait enter the kernel for CQEs already there.
	src.prepSmallRead(mustSQE(t, r), 0)
	if n, err := r.SubmitAndWait(1); n != 1 || err != nil {
		t.Fatalf("SubmitAndWait = %d, %v", n, err)
	}
	if n, err := r.SubmitAndWait(1); n != 0 || err != nil || r.cqReady() != 1 {
		t.Fatalf("SubmitAndWait with a CQE ready = %d, %v", n, err)
	}
	r.ReapCQEs(cqes[:])
}

func TestSQFullAndZeroing(t *testing.T) {
	src := newSource(t)
	for _, sqe128 := range []bool{false, true} {
		var flags uint32
		stride := uapi.SizeofSQE
		if sqe128 {
			flags, stride = uapi.SetupSQE128, uapi.SizeofSQE128
		}
		r := newRing(t, Options{Entries: 8, Flags: flags})
		if (r.sqeShift == 7) != sqe128 {
			t.Fatalf("sqe128=%v: SQE stride 2^%d", sqe128, r.sqeShift)
		}
		var slots []*uapi.SQE
		for i := 0; i < 8; i++ {
			s := mustSQE(t, r)
			src.prepSmallRead(s, i)
			s.UserData = uint64(i)
			slots = append(slots, s)
		}
		if s := r.NextSQE(); s != nil {
			t.Fatal("NextSQE returned a slot on a full SQ")
		}
		if d := uintptr(unsafe.Pointer(slots[1])) - uintptr(unsafe.Pointer(slots[0])); d != uintptr(stride) {
			t.Fatalf("slot stride %d, want %d", d, stride)
		}
		waitCQEs(t, r, 8)
		// Dirty every byte of slot 0, now consumed by the kernel: the next
		// NextSQE over it must hand it out zeroed.
		dirty := unsafe.Slice((*byte)(unsafe.Pointer(slots[0])), stride)
		for i := range dirty {
			dirty[i] = 0xff
		}
		// After a full wrap every slot is handed out again, slot 0 first.
		s := mustSQE(t, r)
		if s != slots[0] {
			t.Fatalf("wrapped slot %p, want %p", s, slots[0])
		}
		for i, b := range unsafe.Slice((*byte)(unsafe.Pointer(s)), stride) {
			if b != 0 {
				t.Fatalf("sqe128=%v: byte %d of reused slot = %#x, want 0", sqe128, i, b)
			}
		}
		src.prepSmallRead(s, 0)
		if c := waitCQEs(t, r, 1)[0]; c.Res != 512 {
			t.Fatalf("read from a reused slot: res %d", c.Res)
		}
	}
}

func TestReadWrite(t *testing.T) {
	r := newRing(t, Options{Entries: 16})
	fd := mustTempFile(t)
	const bs = 4096
	src := mmapBuf(t, 3*bs)
	dst := mmapBuf(t, 3*bs)
	fill(src, 1)
	for i := 0; i < 3; i++ {
		s := mustSQE(t, r)
		// Blocks in reverse order to make offsets matter.
		PrepWrite(s, int32(fd), unsafe.Pointer(&src[i*bs]), bs, uint64((2-i)*bs), 0)
		s.UserData = uint64(i)
	}
	for _, c := range waitCQEs(t, r, 3) {
		if c.Res != bs {
			t.Fatalf("write %d: res %d", c.UserData, c.Res)
		}
	}
	for i := 0; i < 3; i++ {
		s := mustSQE(t, r)
		PrepRead(s, int32(fd), unsafe.Pointer(&dst[i*bs]), bs, uint64(i*bs))
	}
	for _, c := range waitCQEs(t, r, 3) {
		if c.Res != bs {
			t.Fatalf("read: res %d", c.Res)
		}
	}
	for i := 0; i < 3; i++ {
		if !bytes.Equal(dst[i*bs:(i+1)*bs], src[(2-i)*bs:(3-i)*bs]) {
			t.Fatalf("block %d differs", i)
		}
	}
	// Cross-check through the ordinary syscall path.
	check := make([]byte, bs)
	if _, err := unix.Pread(fd, check, 0); err != nil || !bytes.Equal(check, src[2*bs:]) {
		t.Fatalf("pread mismatch (%v)", err)
	}
	// A short read at EOF reports 0 bytes.
	s := mustSQE(t, r)
	PrepRead(s, int32(fd), unsafe.Pointer(&dst[0]), bs, 3*bs)
	if c := waitCQEs(t, r, 1)[0]; c.Res != 0 {
		t.Fatalf("read at EOF: res %d", c.Res)
	}
	// A bad fd comes back as a negative errno in the CQE.
	s = mustSQE(t, r)
	PrepRead(s, 1<<20, unsafe.Pointer(&dst[0]), bs, 0)
	if c := waitCQEs(t, r, 1)[0]; c.Res != -int32(unix.EBADF) {
		t.Fatalf("read on bad fd: res %d, want -EBADF", c.Res)
	}
}

func TestFixedFiles(t *testing.T) {
	r := newRing(t, Options{Entries: 8})
	fd := mustTempFile(t)
	const bs = 8192
	arena := mmapBuf(t, 2*bs)
	wbuf, rbuf := arena[:bs], arena[bs:]
	// Slot 1 names the file; the kernel keeps its own reference.
	if err := r.RegisterFiles([]int32{-1, int32(fd)}); err != nil {
		t.Fatal(err)
	}
	fill(wbuf, 9)
	s := mustSQE(t, r)
	PrepWrite(s, 1, unsafe.Pointer(&wbuf[0]), bs, 4096, 0)
	s.Flags |= uapi.SQEFixedFile
	if c := waitCQEs(t, r, 1)[0]; c.Res != bs {
		t.Fatalf("write through fixed file 1: res %d", c.Res)
	}
	s = mustSQE(t, r)
	PrepRead(s, 1, unsafe.Pointer(&rbuf[0]), bs, 4096)
	s.Flags |= uapi.SQEFixedFile
	if c := waitCQEs(t, r, 1)[0]; c.Res != bs {
		t.Fatalf("read through fixed file 1: res %d", c.Res)
	}
	if !bytes.Equal(rbuf, wbuf) {
		t.Fatal("data through the fixed file differs")
	}
	// The empty slot is refused.
	s = mustSQE(t, r)
	PrepRead(s, 0, unsafe.Pointer(&rbuf[0]), bs, 0)
	s.Flags |= uapi.SQEFixedFile
	if c := waitCQEs(t, r, 1)[0]; c.Res != -int32(unix.EBADF) {
		t.Fatalf("read through the empty slot: res %d, want -EBADF", c.Res)
	}
	if err := r.RegisterFiles(nil); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("RegisterFiles(nil) = %v", err)
	}
}

// TestSparseBuffers registers the table AUTO_BUF_REG fills, and checks the
// fixed-buffer ops address it: a slot nobody filled is refused (EFAULT)
// rather than read into, and an index past the table is refused too.
func TestSparseBuffers(t *testing.T) {
	r := newRing(t, Options{Entries: 8})
	fd := mustTempFile(t)
	if err := r.RegisterSparseBuffers(4); err != nil {
		t.Fatal(err)
	}
	s := mustSQE(t, r)
	PrepReadFixed(s, int32(fd), 2, 0, 4096, 0)
	if c := waitCQEs(t, r, 1)[0]; c.Res != -int32(unix.EFAULT) {
		t.Fatalf("read into empty slot 2: res %d, want -EFAULT", c.Res)
	}
	s = mustSQE(t, r)
	PrepWriteFixed(s, int32(fd), 4, 0, 4096, 0, 0)
	if c := waitCQEs(t, r, 1)[0]; c.Res != -int32(unix.EFAULT) {
		t.Fatalf("write from slot 4 of 4: res %d, want -EFAULT", c.Res)
	}
	if err := r.RegisterSparseBuffers(4); !errors.Is(err, unix.EBUSY) {
		t.Fatalf("a second table = %v, want EBUSY", err)
	}
}

func TestODirect(t *testing.T) {
	fd, err := tempFile(t, unix.O_DIRECT)
	if errors.Is(err, unix.EINVAL) {
		t.Skip("temp filesystem refuses O_DIRECT")
	}
	if err != nil {
		t.Fatal(err)
	}
	r := newRing(t, Options{Entries: 8})
	const n = 64 << 10
	src := mmapBuf(t, n)
	dst := mmapBuf(t, n)
	fill(src, 3)
	s := mustSQE(t, r)
	PrepWrite(s, int32(fd), unsafe.Pointer(&src[0]), n, 1<<20, uapi.RWFDsync)
	c := waitCQEs(t, r, 1)[0]
	if c.Res == -int32(unix.EINVAL) {
		t.Skip("O_DIRECT write refused with EINVAL")
	}
	if c.Res != n {
		t.Fatalf("O_DIRECT write res %d", c.Res)
	}
	s = mustSQE(t, r)
	PrepRead(s, int32(fd), unsafe.Pointer(&dst[0]), n, 1<<20)
	if c := waitCQEs(t, r, 1)[0]; c.Res != n {
		t.Fatalf("O_DIRECT read res %d", c.Res)
	}
	if !bytes.Equal(src, dst) {
		t.Fatal("O_DIRECT data differs")
	}
	// Misaligned buffer: the kernel refuses it.
	s = mustSQE(t, r)
	PrepRead(s, int32(fd), unsafe.Pointer(&dst[1]), 4096, 1<<20)
	if c := waitCQEs(t, r, 1)[0]; c.Res != -int32(unix.EINVAL) {
		t.Fatalf("misaligned O_DIRECT read: res %d, want -EINVAL", c.Res)
	}
}

func TestFsync(t *testing.T) {
	r := newRing(t, Options{Entries: 8})
	fd := mustTempFile(t)
	buf := mmapBuf(t, 4096)
	fill(buf, 5)
	s := mustSQE(t, r)
	PrepWrite(s, int32(fd), unsafe.Pointer(&buf[0]), 4096, 0, 0)
	s.Flags |= uapi.SQEIOLink // fsync only after the write
	s.UserData = 1
	s = mustSQE(t, r)
	PrepFsync(s, int32(fd), 0)
	s.Flags |= uapi.SQEIOLink
	s.UserData = 2
	s = mustSQE(t, r)
	PrepFsync(s, int32(fd), uapi.FsyncDatasync)
	s.UserData = 3
	for _, c := range waitCQEs(t, r, 3) {
		want := int32(0)
		if c.UserData == 1 {
			want = 4096
		}
		if c.Res != want {
			t.Fatalf("op %d: res %d, want %d", c.UserData, c.Res, want)
		}
	}
}

func TestFallocate(t *testing.T) {
	r := newRing(t, Options{Entries: 8})
	fd := mustTempFile(t)
	const size = 64 << 10
	data := bytes.Repeat([]byte{0xab}, size)
	if _, err := unix.Pwrite(fd, data, 0); err != nil {
		t.Fatal(err)
	}
	s := mustSQE(t, r)
	PrepFallocate(s, int32(fd), uapi.FallocPunchHole|uapi.FallocKeepSize, 16<<10, 16<<10)
	s.UserData = 1
	s = mustSQE(t, r)
	PrepFallocate(s, int32(fd), uapi.FallocZeroRange|uapi.FallocKeepSize, 40<<10, 4<<10)
	s.UserData = 2
	for _, c := range waitCQEs(t, r, 2) {
		if c.Res == -int32(unix.EOPNOTSUPP) {
			t.Skip("temp filesystem does not support hole punching")
		}
		if c.Res != 0 {
			t.Fatalf("fallocate %d: res %d", c.UserData, c.Res)
		}
	}
	got := make([]byte, size)
	if _, err := unix.Pread(fd, got, 0); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(data)
	clear(want[16<<10 : 32<<10])
	clear(want[40<<10 : 44<<10])
	if !bytes.Equal(got, want) {
		t.Fatal("punched/zeroed ranges do not read back as expected")
	}
	// Mode 0 extends the file: offset and length must not be swapped with
	// the mode (off=offset, addr=length, len=mode).
	s = mustSQE(t, r)
	PrepFallocate(s, int32(fd), 0, 100<<10, 28<<10)
	if c := waitCQEs(t, r, 1)[0]; c.Res != 0 {
		t.Fatalf("fallocate extend: res %d", c.Res)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != 128<<10 {
		t.Fatalf("size after fallocate(0, 100K, 28K) = %d, want %d", st.Size, 128<<10)
	}
}

// TestBatch256 pushes 256 writes and then 256 reads through a 64-entry SQ,
// submitting whenever the SQ fills.
func TestBatch256(t *testing.T) {
	r := newRing(t, Options{Entries: 64})
	fd := mustTempFile(t)
	const ops, bs = 256, 4096
	src := mmapBuf(t, ops*bs)
	dst := mmapBuf(t, ops*bs)
	fill(src, 11)
	for pass, op := range []uint8{uapi.OpWrite, uapi.OpRead} {
		seen := make([]bool, ops)
		done := 0
		cqes := make([]uapi.CQE, 32)
		reap := func() {
			k := r.ReapCQEs(cqes)
			for _, c := range cqes[:k] {
				if c.Res != bs || seen[c.UserData] {
					t.Fatalf("pass %d: cqe %+v", pass, c)
				}
				seen[c.UserData] = true
			}
			done += k
		}
		for i := 0; i < ops; i++ {
			s := r.NextSQE()
			for s == nil {
				if _, err := r.SubmitAndWait(1); err != nil {
					t.Fatal(err)
				}
				reap()
				s = r.NextSQE()
			}
			if op == uapi.OpWrite {
				PrepWrite(s, int32(fd), unsafe.Pointer(&src[i*bs]), bs, uint64(i*bs), 0)
			} else {
				PrepRead(s, int32(fd), unsafe.Pointer(&dst[i*bs]), bs, uint64(i*bs))
			}
			s.UserData = uint64(i)
		}
		for done < ops {
			if _, err := r.SubmitAndWait(1); err != nil {
				t.Fatal(err)
			}
			reap()
		}
	}
	if !bytes.Equal(src, dst) {
		t.Fatal("batched data differs")
	}
}

// TestURingCmdSQE128 exercises the URING_CMD encoding on an SQE128 ring
// without a ublk kernel: a regular file has no ->uring_cmd, so the CQE must
// carry a negative errno.
func TestURingCmdSQE128(t *testing.T) {
	r := newRing(t, Options{Entries: 4, Flags: uapi.SetupSQE128})
	if r.flags&uapi.SetupSQE128 == 0 {
		t.Fatalf("flags %#x lack SQE128", r.flags)
	}
	fd := mustTempFile(t)
	s := mustSQE(t, r)
	const op = 0xc0207504 // any ioctl-shaped value
	PrepURingCmd(s, int32(fd), op)
	s.UserData = 77
	area := CmdArea(s, true)
	if len(area) != 80 {
		t.Fatalf("CmdArea len %d, want 80", len(area))
	}
	for i := range area {
		area[i] = byte(i + 1)
	}
	raw := unsafe.Slice((*byte)(unsafe.Pointer(s)), 128)
	if raw[0] != uapi.OpURingCmd || *(*uint32)(unsafe.Pointer(&raw[4])) != uint32(fd) {
		t.Fatalf("opcode/fd bytes % x", raw[:8])
	}
	if got := *(*uint32)(unsafe.Pointer(&raw[8])); got != op {
		t.Fatalf("cmd_op = %#x", got)
	}
	if pad := *(*uint32)(unsafe.Pointer(&raw[12])); pad != 0 {
		t.Fatalf("__pad1 = %#x, want 0", pad)
	}
	for i := 48; i < 128; i++ {
		if raw[i] != byte(i-48+1) {
			t.Fatalf("payload byte %d = %d", i, raw[i])
		}
	}
	c := waitCQEs(t, r, 1)[0]
	if c.UserData != 77 || c.Res >= 0 {
		t.Fatalf("URING_CMD on a regular file: %+v, want a negative errno", c)
	}
	t.Logf("URING_CMD on a regular file: %v", unix.Errno(-c.Res))

	// The 64-byte variant: 16 bytes at offset 48.
	r64 := newRing(t, Options{Entries: 4})
	s = mustSQE(t, r64)
	PrepURingCmd(s, int32(fd), op)
	if a := CmdArea(s, false); len(a) != 16 || unsafe.Pointer(&a[0]) != unsafe.Pointer(&s.Addr3) {
		t.Fatalf("64-byte CmdArea: len %d at %p, want 16 at %p", len(a), &a[0], &s.Addr3)
	}
	if c := waitCQEs(t, r64, 1)[0]; c.Res >= 0 {
		t.Fatalf("URING_CMD (SQE64): res %d", c.Res)
	}
}

// sigurgStorm sends SIGURG (the Go preemption signal, ignored by the
// runtime's handler apart from preemption) to thread tid until stop closes,
// so that every blocking io_uring_enter on it sees EINTR.
func sigurgStorm(tid int) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		pid := unix.Getpid()
		for {
			select {
			case <-done:
				return
			default:
			}
			unix.Tgkill(pid, tid, unix.SIGURG)
			time.Sleep(200 * time.Microsecond)
		}
	}()
	return func() { close(done); wg.Wait() }
}

// TestWaitSurvivesSignals: SubmitAndWait blocks under a storm of SIGURG
// until the completion it waits for arrives, which another thread causes
// by writing to an eventfd whose read is in flight on the ring (how a
// queue's owner is woken).
func TestWaitSurvivesSignals(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	r := newRing(t, Options{Entries: 4})
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	buf := mmapBuf(t, 4096)
	stop := sigurgStorm(unix.Gettid())
	defer stop()

	s := mustSQE(t, r)
	PrepRead(s, int32(efd), unsafe.Pointer(&buf[0]), 8, 0)
	s.UserData = 5
	woken := make(chan struct{})
	go func() {
		time.Sleep(100 * time.Millisecond)
		close(woken)
		unix.Write(efd, []byte{7, 0, 0, 0, 0, 0, 0, 0})
	}()
	start := time.Now()
	n, err := r.SubmitAndWait(1)
	if n != 1 || err != nil {
		t.Fatalf("SubmitAndWait under signals = %d, %v", n, err)
	}
	select {
	case <-woken:
	default:
		t.Fatalf("SubmitAndWait returned after %v, before the eventfd was written", time.Since(start))
	}
	if r.eintr == 0 {
		t.Error("the signal storm caused no EINTR retry; the test proves nothing")
	}
	t.Logf("%d EINTR retries", r.eintr)
	var c [1]uapi.CQE
	if r.ReapCQEs(c[:]) != 1 || c[0].UserData != 5 || c[0].Res != 8 || buf[0] != 7 {
		t.Fatalf("eventfd read cqe %+v, value %d", c[0], buf[0])
	}
}

func TestCQOverflow(t *testing.T) {
	r := newRing(t, Options{Entries: 8, CQEntries: 8})
	if r.cqCount != 8 || r.flags&uapi.SetupCQSize == 0 {
		t.Fatalf("cq entries %d flags %#x", r.cqCount, r.flags)
	}
	src := newSource(t)
	const batches, total = 5, 40
	sawOverflow := false
	for b := 0; b < batches; b++ {
		for i := 0; i < 8; i++ {
			s := mustSQE(t, r)
			src.prepSmallRead(s, b*8+i)
			s.UserData = uint64(b*8 + i)
		}
		if n, err := r.Submit(); n != 8 || err != nil {
			t.Fatalf("batch %d: Submit = %d, %v", b, n, err)
		}
		sawOverflow = sawOverflow || r.overflowed()
		if r.cqReady() > 8 {
			t.Fatalf("%d CQEs ready exceed the CQ", r.cqReady())
		}
	}
	if !sawOverflow {
		t.Fatal("IORING_SQ_CQ_OVERFLOW never set")
	}
	seen := make([]bool, total)
	count := 0
	cqes := make([]uapi.CQE, 64)
	for rounds := 0; count < total && rounds < 100; rounds++ {
		k := r.ReapCQEs(cqes)
		for _, c := range cqes[:k] {
			if c.Res != 512 || c.UserData >= total || seen[c.UserData] {
				t.Fatalf("bad cqe %+v", c)
			}
			seen[c.UserData] = true
		}
		count += k
	}
	if count != total {
		t.Fatalf("reaped %d CQEs, want %d", count, total)
	}
	if r.overflowed() || r.cqReady() != 0 {
		t.Fatalf("after drain: overflow flag %v, ready %d", r.overflowed(), r.cqReady())
	}
	// SubmitAndWait also flushes: overflow again, then wait for more than
	// the CQ holds in one pass.
	for b := 0; b < 3; b++ {
		for i := 0; i < 8; i++ {
			src.prepSmallRead(mustSQE(t, r), i)
		}
		if _, err := r.Submit(); err != nil {
			t.Fatal(err)
		}
	}
	if got := len(waitCQEs(t, r, 24)); got != 24 {
		t.Fatalf("waitCQEs got %d", got)
	}
}

// ringWorkload runs nops small reads of src plus a write/read pair of fd
// through r, using the 8 KiB off-heap buf.
func ringWorkload(r *Ring, src source, fd int, buf []byte, nops int, seed byte) error {
	fill(buf[:4096], seed)
	cqes := make([]uapi.CQE, 32)
	for done := 0; done < nops; {
		k := min(32, int(r.sqCount), nops-done)
		for i := 0; i < k; i++ {
			s := r.NextSQE()
			if s == nil {
				return errors.New("SQ full")
			}
			src.prepSmallRead(s, i)
			s.UserData = uint64(done + i)
		}
		if _, err := r.SubmitAndWait(uint32(k)); err != nil {
			return err
		}
		if got := r.ReapCQEs(cqes[:k]); got != k {
			return errors.New("short reap")
		}
		for _, c := range cqes[:k] {
			if c.Res != 512 {
				return fmt.Errorf("read %d: res %d", c.UserData, c.Res)
			}
		}
		done += k
	}
	s := r.NextSQE()
	PrepWrite(s, int32(fd), unsafe.Pointer(&buf[0]), 4096, 0, 0)
	s.Flags |= uapi.SQEIOLink
	s = r.NextSQE()
	PrepRead(s, int32(fd), unsafe.Pointer(&buf[4096]), 4096, 0)
	if _, err := r.SubmitAndWait(2); err != nil {
		return err
	}
	if r.ReapCQEs(cqes[:2]) != 2 || cqes[0].Res != 4096 || cqes[1].Res != 4096 {
		return errors.New("write/read failed")
	}
	if !bytes.Equal(buf[:4096], buf[4096:]) {
		return errors.New("data differs")
	}
	return nil
}

func TestConcurrentRings(t *testing.T) {
	const rings = 4
	errs := make(chan error, rings)
	for g := 0; g < rings; g++ {
		fd := mustTempFile(t)
		buf := mmapBuf(t, 8192)
		src := newSource(t)
		go func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			r, err := New(Options{Entries: 32, Flags: uapi.SetupSingleIssuer | uapi.SetupCoopTaskrun})
			if err != nil {
				errs <- err
				return
			}
			defer r.Close()
			errs <- ringWorkload(r, src, fd, buf, 5000, byte(g))
		}()
	}
	for g := 0; g < rings; g++ {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

// TestSingleIssuerDeferTaskrun creates and drives a ring on one locked
// thread with the flags a ublk queue uses, and shows that another thread is
// refused.
func TestSingleIssuerDeferTaskrun(t *testing.T) {
	const want = uapi.SetupSingleIssuer | uapi.SetupDeferTaskrun | uapi.SetupCoopTaskrun | uapi.SetupSubmitAll
	fd := mustTempFile(t)
	buf := mmapBuf(t, 8192)
	src := newSource(t)
	owner := make(chan func(), 1)
	done := make(chan error, 1)
	var r *Ring
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		var err error
		r, err = New(Options{Entries: 16, CQEntries: 64, Flags: want})
		if err != nil {
			done <- err
			return
		}
		done <- nil
		for f := range owner {
			f()
		}
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	onOwner := func(f func() error) error {
		owner <- func() { done <- f() }
		return <-done
	}
	defer func() {
		onOwner(r.Close)
		close(owner)
	}()
	if got := r.flags & want; got != want {
		t.Fatalf("flags %#x, want %#x in force", r.flags, want)
	}
	if err := onOwner(func() error { return ringWorkload(r, src, fd, buf, 1000, 42) }); err != nil {
		t.Fatal(err)
	}

	// Another thread may fill an SQE (plain memory) but not enter.
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		src.prepSmallRead(r.NextSQE(), 0)
		_, err := r.Submit()
		errc <- err
	}()
	if err := <-errc; !errors.Is(err, unix.EEXIST) {
		t.Fatalf("Submit from a foreign thread = %v, want EEXIST", err)
	}
	// The owner submits the left-over SQE.
	if err := onOwner(func() error {
		n, err := r.SubmitAndWait(1)
		if err != nil || n != 1 {
			return errors.Join(fmt.Errorf("owner submit of the foreign SQE: %d", n), err)
		}
		var c [1]uapi.CQE
		if r.ReapCQEs(c[:]) != 1 || c[0].Res != 512 {
			return errors.New("bad read completion")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

func TestOptionalFlagFallback(t *testing.T) {
	// DEFER_TASKRUN without SINGLE_ISSUER is invalid: New drops it and
	// keeps the rest.
	r := newRing(t, Options{Entries: 4, Flags: uapi.SetupDeferTaskrun | uapi.SetupSQE128 | uapi.SetupSubmitAll})
	if r.flags&uapi.SetupDeferTaskrun != 0 || r.flags&(uapi.SetupSQE128|uapi.SetupSubmitAll) != uapi.SetupSQE128|uapi.SetupSubmitAll {
		t.Fatalf("flags %#x", r.flags)
	}
	newSource(t).prepSmallRead(mustSQE(t, r), 0)
	waitCQEs(t, r, 1)

	for _, opt := range []Options{
		{Entries: 0},
		{Entries: 4, Flags: uapi.SetupSQPoll},
		{Entries: 4, Flags: uapi.SetupCQE32},
		{Entries: 4, Flags: uapi.SetupCQSize},
		{Entries: 8, CQEntries: 4}, // CQ smaller than SQ: not optional, not retried
	} {
		if r, err := New(opt); err == nil {
			r.Close()
			t.Errorf("New(%+v) succeeded", opt)
		} else if !errors.Is(err, unix.EINVAL) {
			t.Errorf("New(%+v) = %v, want EINVAL", opt, err)
		}
	}
}

func TestClose(t *testing.T) {
	r, err := New(Options{Entries: 4})
	if err != nil {
		t.Fatal(err)
	}
	newSource(t).prepSmallRead(r.NextSQE(), 0) // never submitted
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if r.fd != -1 || r.NextSQE() != nil || r.ReapCQEs(make([]uapi.CQE, 4)) != 0 {
		t.Fatal("closed ring still answers")
	}
	if _, err := r.Submit(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Submit after Close = %v", err)
	}
	if _, err := r.SubmitAndWait(1); !errors.Is(err, ErrClosed) {
		t.Fatalf("SubmitAndWait after Close = %v", err)
	}
	if err := r.RegisterFiles([]int32{0}); !errors.Is(err, ErrClosed) {
		t.Fatalf("RegisterFiles after Close = %v", err)
	}
}

// TestHotPathAllocs proves that a prep + submit + wait + reap cycle
// allocates nothing.
func TestHotPathAllocs(t *testing.T) {
	r := newRing(t, Options{Entries: 32, Flags: uapi.SetupCoopTaskrun | uapi.SetupSubmitAll})
	src := newSource(t)
	var cqes [32]uapi.CQE
	cycle := func() {
		for i := 0; i < 32; i++ {
			s := r.NextSQE()
			src.prepSmallRead(s, i)
			s.UserData = uint64(i)
		}
		if _, err := r.Submit(); err != nil {
			panic(err)
		}
		if _, err := r.SubmitAndWait(32); err != nil {
			panic(err)
		}
		if n := r.ReapCQEs(cqes[:]); n != 32 {
			panic("short reap")
		}
	}
	cycle()
	if n := testing.AllocsPerRun(200, cycle); n != 0 {
		t.Fatalf("hot path allocates %v times per cycle", n)
	}
}

// BenchmarkRead measures one 512-byte read of a cached file through prep
// + submit + wait + reap, in batches of 32 (ns/op is per read).
func BenchmarkRead(b *testing.B) {
	// SINGLE_ISSUER binds the ring to the creating thread: lock first.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	r := newRing(b, Options{Entries: 64, Flags: uapi.SetupCoopTaskrun | uapi.SetupSingleIssuer | uapi.SetupDeferTaskrun})
	src := newSource(b)
	var cqes [32]uapi.CQE
	b.ReportAllocs()
	b.ResetTimer()
	for done := 0; done < b.N; {
		k := min(32, b.N-done)
		for i := 0; i < k; i++ {
			s := r.NextSQE()
			src.prepSmallRead(s, i)
			s.UserData = uint64(i)
		}
		if _, err := r.SubmitAndWait(uint32(k)); err != nil {
			b.Fatal(err)
		}
		if r.ReapCQEs(cqes[:k]) != k {
			b.Fatal("short reap")
		}
		done += k
	}
}

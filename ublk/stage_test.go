package ublk_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/internal/dio"
	"github.com/dbdublk/dbdublk/ublk"
	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// stager stages every write as two rounds: copy the write's first block
// of the device to the side file (a linked read then write), then run
// round2 (nil: none); the verdict is then verdict. It records what Done
// saw in each round.
type stager struct {
	fileDevice
	from    int // where the stage reads the old block (the device)
	side    int
	buf     []byte
	round2  []ublk.StageIO
	verdict error
	resumed chan func(error) // where an ErrResumeLater stage's resume goes
	saw     []error
	afters  int
}

func (s *stager) BeforeWrite(uapi.IOOp, int64, int64, func(error)) (uint64, ublk.WriteAction, error) {
	panic("a queue with a Stager called BeforeWrite")
}

func (s *stager) BeforeWriteStaged(_ uapi.IOOp, off, _ int64, resume func(error), st *ublk.Stage) (uint64, ublk.WriteAction, error) {
	st.IO = append(st.IO[:0],
		ublk.StageIO{FD: s.from, Off: off, Buf: s.buf},
		ublk.StageIO{Write: true, FD: s.side, Off: 0, Buf: s.buf})
	round := 0
	st.Done = func(err error) (bool, error) {
		s.saw = append(s.saw, err)
		round++
		if round == 1 && err == nil && s.round2 != nil {
			st.IO = s.round2
			return true, nil
		}
		if errors.Is(s.verdict, ublk.ErrResumeLater) {
			s.resumed <- resume
		}
		return false, s.verdict
	}
	return 0, ublk.WriteStaged, nil
}

func (s *stager) AfterWrite(uint64) { s.afters++ }

func newStager(t *testing.T) (*stager, []byte) {
	dev, orig := openDevice(t)
	side, err := unix.Open(filepath.Join(t.TempDir(), "side"), unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(side) })
	return &stager{fileDevice: dev, from: dev.fd, side: side, buf: dio.AlignedBuf(4096), resumed: make(chan func(error), 1)}, orig
}

func (s *stager) sideBytes(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/proc/self/fd", strconv.Itoa(s.side)))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// A Stage's I/O runs, linked and in order, before the write: the side file
// holds the block as it was before the write, and a second round runs
// before the verdict lets the write go.
func TestStageRunsBeforeTheWrite(t *testing.T) {
	s, orig := newStager(t)
	marker := []byte("round two")
	s.round2 = []ublk.StageIO{{Write: true, FD: s.side, Off: 4096, Buf: marker}}
	p := newPath(t, s)
	data := random(8192)
	if res := p.Do(write(3*4096, data, 0))[0]; res.Res != 8192 {
		t.Fatalf("staged write = %d", res.Res)
	}
	side := s.sideBytes(t)
	if len(side) != 4096+len(marker) || !bytes.Equal(side[:4096], orig[3*4096:4*4096]) || !bytes.Equal(side[4096:], marker) {
		t.Fatal("the stage did not copy the block's old data, then run its second round, before the write")
	}
	if !bytes.Equal(s.contents(t)[3*4096:5*4096], data) {
		t.Fatal("the write did not follow its stage")
	}
	if len(s.saw) != 2 || s.saw[0] != nil || s.saw[1] != nil || s.afters != 1 {
		t.Fatalf("Done saw %v, AfterWrite ran %d times", s.saw, s.afters)
	}
}

// A failed operation is Done's error, the operations linked after it do
// not run, and a failing verdict fails the write untouched.
func TestStageFailureCancelsTheRest(t *testing.T) {
	s, orig := newStager(t)
	s.from = -1 // the stage's read fails
	s.verdict = syscall.ENOSPC
	p := newPath(t, s)
	if res := p.Do(write(0, random(4096), 0))[0]; res.Res != errno(syscall.ENOSPC) {
		t.Fatalf("write after a failed stage = %d, want ENOSPC", res.Res)
	}
	if len(s.saw) != 1 || !errors.Is(s.saw[0], syscall.EBADF) {
		t.Fatalf("Done saw %v, want EBADF", s.saw)
	}
	if len(s.sideBytes(t)) != 0 {
		t.Fatal("the write linked after the failed read ran")
	}
	if !bytes.Equal(s.contents(t)[:4096], orig[:4096]) {
		t.Fatal("a failed write reached the device")
	}
}

// ErrResumeLater leaves the write waiting for its resume; ErrSkipWrite
// completes it without touching the device.
func TestStageVerdicts(t *testing.T) {
	s, orig := newStager(t)
	s.verdict = ublk.ErrResumeLater
	p := newPath(t, s)
	go func() { (<-s.resumed)(nil) }()
	data := random(4096)
	if res := p.Do(write(4096, data, 0))[0]; res.Res != 4096 {
		t.Fatalf("resumed write = %d", res.Res)
	}
	if !bytes.Equal(s.contents(t)[4096:8192], data) {
		t.Fatal("the resumed write did not reach the device")
	}
	s.verdict = ublk.ErrSkipWrite
	if res := p.Do(write(8192, random(4096), 0))[0]; res.Res != 4096 {
		t.Fatalf("skipped write = %d", res.Res)
	}
	if !bytes.Equal(s.contents(t)[8192:12288], orig[8192:12288]) {
		t.Fatal("a skipped write reached the device")
	}
}

package ublk_test

import (
	"bytes"
	"errors"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/ublk"
	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// gatherer stages each write as one gathered write of a block made of the
// write's block number to the side file, at the slot slots gives for that
// block; it records each stage's error by block.
type gatherer struct {
	fileDevice
	side  int
	slots map[int64]int64
	saw   map[int64]error
}

func (g *gatherer) BeforeWrite(uapi.IOOp, int64, int64, func(error)) (uint64, ublk.WriteAction, error) {
	panic("a queue with a Stager called BeforeWrite")
}

func (g *gatherer) BeforeWriteStaged(_ uapi.IOOp, off, _ int64, _ func(error), st *ublk.Stage) (uint64, ublk.WriteAction, error) {
	block := off / 4096
	st.IO = append(st.IO[:0], ublk.StageIO{Write: true, Gather: true, FD: g.side, Off: g.slots[block] * 4096, Buf: bytes.Repeat([]byte{byte(block + 1)}, 4096)})
	st.Done = func(err error) (bool, error) {
		g.saw[block] = err
		return false, err
	}
	return 0, ublk.WriteStaged, nil
}

func (g *gatherer) AfterWrite(uint64) {}

func newGatherer(t *testing.T, slots map[int64]int64, sideFlags int) *gatherer {
	dev, _ := openDevice(t)
	side, err := unix.Open(filepath.Join(t.TempDir(), "side"), sideFlags|unix.O_CREAT|unix.O_CLOEXEC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(side) })
	return &gatherer{fileDevice: dev, side: side, slots: slots, saw: map[int64]error{}}
}

// writeBlocks issues one 4 KiB write per block, all at once, and returns
// their results by block.
func writeBlocks(p *ublk.RequestPath, blocks ...int64) map[int64]int32 {
	reqs := make([]ublk.Request, len(blocks))
	for i, b := range blocks {
		reqs[i] = write(b*4096, random(4096), 0)
	}
	res := map[int64]int32{}
	for i, r := range p.Do(reqs...) {
		res[blocks[i]] = r.Res
	}
	return res
}

// Gathered writes that are ready together go out as one write per run of
// adjacent slots in the same file, each with its own bytes at its own
// offset; a slot apart from the others is written alone.
func TestStageGathersAdjacentWrites(t *testing.T) {
	// Blocks 0-3 go to slots 0-3 out of order, 4-5 to slots 5-6, 6 alone to 9.
	slots := map[int64]int64{0: 3, 1: 0, 2: 1, 3: 2, 4: 5, 5: 6, 6: 9}
	g := newGatherer(t, slots, unix.O_RDWR)
	p := newPath(t, g)
	for b, res := range writeBlocks(p, 0, 1, 2, 3, 4, 5, 6) {
		if res != 4096 || g.saw[b] != nil {
			t.Fatalf("write of block %d = %d, its stage saw %v", b, res, g.saw[b])
		}
	}
	side, err := os.ReadFile(filepath.Join("/proc/self/fd", strconv.Itoa(g.side)))
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 10*4096)
	for b, s := range slots {
		copy(want[s*4096:], bytes.Repeat([]byte{byte(b + 1)}, 4096))
	}
	if !bytes.Equal(side, want) {
		t.Fatal("the side file does not hold each block's data at its own slot")
	}
	// Three writes instead of seven: 0-3 as one, 5-6 as one, 9 alone.
	if got := p.Stats().StageWritesMerged; got != 4 {
		t.Fatalf("%d writes merged into a neighbour's, want 4", got)
	}
}

// A merged write that fails fails each write it carried with its errno; one
// cut short fails only the writes whose bytes it did not cover (EIO).
func TestStageGatheredWriteFailures(t *testing.T) {
	slots := map[int64]int64{0: 0, 1: 1, 2: 2, 3: 3}
	t.Run("failed", func(t *testing.T) {
		g := newGatherer(t, slots, unix.O_RDONLY)
		p := newPath(t, g)
		for b, res := range writeBlocks(p, 0, 1, 2, 3) {
			if res != errno(syscall.EBADF) || !errors.Is(g.saw[b], syscall.EBADF) {
				t.Fatalf("write of block %d = %d, its stage saw %v; want EBADF", b, res, g.saw[b])
			}
		}
	})
	t.Run("short", func(t *testing.T) {
		g := newGatherer(t, slots, unix.O_RDWR)
		p := newPath(t, g)
		// The file may not grow past 2.5 blocks: the merged write of
		// slots 0-3 stops there.
		signal.Ignore(syscall.SIGXFSZ)
		defer signal.Reset(syscall.SIGXFSZ)
		var old unix.Rlimit
		if err := unix.Getrlimit(unix.RLIMIT_FSIZE, &old); err != nil {
			t.Fatal(err)
		}
		if err := unix.Setrlimit(unix.RLIMIT_FSIZE, &unix.Rlimit{Cur: 2*4096 + 2048, Max: old.Max}); err != nil {
			t.Fatal(err)
		}
		res := writeBlocks(p, 0, 1, 2, 3)
		if err := unix.Setrlimit(unix.RLIMIT_FSIZE, &old); err != nil {
			t.Fatal(err)
		}
		for _, b := range []int64{0, 1} {
			if res[b] != 4096 || g.saw[b] != nil {
				t.Fatalf("covered write of block %d = %d, its stage saw %v", b, res[b], g.saw[b])
			}
		}
		for _, b := range []int64{2, 3} {
			if res[b] != errno(syscall.EIO) || !errors.Is(g.saw[b], syscall.EIO) {
				t.Fatalf("write of block %d past the short end = %d, its stage saw %v; want EIO", b, res[b], g.saw[b])
			}
		}
		if got := p.Stats().StageWritesMerged; got != 3 {
			t.Fatalf("%d writes merged, want 3 (one write of four)", got)
		}
	})
}

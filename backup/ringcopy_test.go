package backup

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/dbdublk/dbdublk/cow"
)

// ringFile is a RingSource over a regular file. Its snapshot is the file's
// bytes XOR key, applied by FinishRead after a ring read (as the server's
// view overlays what the COW store preserved) and by ReadAt in one call,
// so that an image shows whether a ring read was finished.
type ringFile struct {
	f, direct *os.File
	key       byte
	failAt    int64 // FinishRead fails at this offset; -1 never
	ringBytes atomic.Int64
	readBytes atomic.Int64
}

func openRingFile(t *testing.T, path string, key byte) *ringFile {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	direct, err := os.OpenFile(path, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Skipf("no O_DIRECT here: %v", err)
	}
	t.Cleanup(func() { f.Close(); direct.Close() })
	return &ringFile{f: f, direct: direct, key: key, failAt: -1}
}

func (r *ringFile) FD() int { return int(r.direct.Fd()) }

func (r *ringFile) FinishRead(p []byte, off int64) error {
	if off == r.failAt {
		return errors.New("the snapshot failed")
	}
	r.ringBytes.Add(int64(len(p)))
	for i := range p {
		p[i] ^= r.key
	}
	return nil
}

func (r *ringFile) ReadAt(p []byte, off int64) error {
	if _, err := r.f.ReadAt(p, off); err != nil {
		return err
	}
	r.readBytes.Add(int64(len(p)))
	for i := range p {
		p[i] ^= r.key
	}
	return nil
}

// ringShare is how many bytes of the changed runs, cut into copies of at
// most chunk bytes, are the ring's (takes), and how many the copiers'.
func ringShare(size int64, blocks []uint64, chunk int64) (ring, copiers int64) {
	for _, r := range runsOf(blocks) {
		off := int64(r[0]) * cow.BlockSize
		end := min(int64(r[0]+r[1])*cow.BlockSize, size)
		for ; off < end; off += chunk {
			e := extent{off, min(chunk, end-off)}
			if takes(e) {
				ring += e.n
			} else {
				copiers += e.n
			}
		}
	}
	return ring, copiers
}

// TestCopyOnRing: from a RingSource, small whole-block copies run on the
// ring, each read finished before it is written, and the rest (long runs,
// the partial last block) on the copiers; the image gets exactly the
// snapshot's changed blocks either way, with progress up to the total.
func TestCopyOnRing(t *testing.T) {
	const size = 17<<20 + 1536 // two sections, a partial last block
	blocks := pickBlocks(rand.New(rand.NewPCG(91, 92)), cow.Blocks(size))
	for _, workers := range []int{1, 8} {
		for _, chunk := range []int64{4096, 1 << 20} {
			t.Run(fmt.Sprintf("workers=%d/chunk=%d", workers, chunk), func(t *testing.T) {
				fx, data := newFixture(t, size, 91, blocks)
				want := readFile(t, fx.img)
				for _, b := range blocks {
					for i := int64(b) * cow.BlockSize; i < min(int64(b+1)*cow.BlockSize, size); i++ {
						want[i] = data[i] ^ 0x5a
					}
				}
				src := openRingFile(t, fx.snap, 0x5a)
				ck, err := Check(fx.snapshot(), fx.cowPath, fx.img)
				if err != nil {
					t.Fatal(err)
				}
				defer ck.Close()
				var log progressLog
				sum, err := Copy(ck.Cow, src, ck.Image, size, Options{Workers: workers, ChunkMax: chunk, Progress: log.fn})
				if err != nil {
					t.Fatal(err)
				}
				if got := readFile(t, fx.img); !bytes.Equal(got, want) {
					t.Fatalf("image differs from the snapshot's changed blocks: %s", firstDiff(got, want))
				}
				total := changedBytes(size, blocks)
				if sum.BytesCopied != total {
					t.Errorf("summary %+v, want %d bytes", sum, total)
				}
				ring, copiers := ringShare(size, blocks, chunk)
				if ring == 0 || copiers == 0 {
					t.Fatalf("the fixture gives the ring %d bytes and the copiers %d: want both", ring, copiers)
				}
				if got := src.ringBytes.Load(); got != ring {
					t.Errorf("%d bytes copied on the ring, want %d", got, ring)
				}
				if got := src.readBytes.Load(); got != copiers {
					t.Errorf("%d bytes copied by the copiers, want %d", got, copiers)
				}
				log.check(t, total, chunk, wantCopies(size, blocks, chunk), false)
			})
		}
	}
}

// TestCopyOnRingFailure: a ring read that cannot be finished fails the
// copy with its offset, and the copy still ends (the change list is
// drained), never reporting the whole total done.
func TestCopyOnRingFailure(t *testing.T) {
	const size = 5 << 20
	blocks := pickBlocks(rand.New(rand.NewPCG(93, 94)), cow.Blocks(size))
	fx, _ := newFixture(t, size, 93, blocks)
	src := openRingFile(t, fx.snap, 0)
	src.failAt = int64(blocks[0]) * cow.BlockSize // block 0: a single block, the ring's
	ck, err := Check(fx.snapshot(), fx.cowPath, fx.img)
	if err != nil {
		t.Fatal(err)
	}
	defer ck.Close()
	var log progressLog
	_, err = Copy(ck.Cow, src, ck.Image, size, Options{Workers: 4, Progress: log.fn})
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("read snapshot at %d", src.failAt)) {
		t.Fatalf("Copy = %v, want the failed read at %d", err, src.failAt)
	}
	log.mu.Lock()
	defer log.mu.Unlock()
	for _, d := range log.done {
		if d >= changedBytes(size, blocks) {
			t.Errorf("Progress reported %d bytes done, the whole total, although a copy failed", d)
		}
	}
}

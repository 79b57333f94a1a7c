package cow

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestMappedStorage: a file scattered over a device in shuffled extents
// reads and writes like a plain file, aligned or not, across extents.
func TestMappedStorage(t *testing.T) {
	dev := filepath.Join(t.TempDir(), "dev")
	const blocks = 64
	if err := os.WriteFile(dev, make([]byte, blocks*BlockSize), 0o600); err != nil {
		t.Fatal(err)
	}
	if f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0); err != nil {
		t.Skipf("O_DIRECT unsupported here: %v", err)
	} else {
		f.Close()
	}
	// 48 file blocks, each its own extent at a shuffled device place
	// (listed in reverse, as checkExtents must sort them).
	rng := rand.New(rand.NewPCG(1, 2))
	perm := rng.Perm(blocks)
	var xs []Extent
	for i := 47; i >= 0; i-- {
		xs = append(xs, Extent{Logical: int64(i) * BlockSize, Physical: int64(perm[i]) * BlockSize, Length: BlockSize})
	}
	xs, err := checkExtents("f", xs, 48*BlockSize)
	if err != nil {
		t.Fatal(err)
	}
	m, err := openMapped(dev, xs)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	model := make([]byte, 48*BlockSize)
	for range 300 {
		off := rng.Int64N(int64(len(model)) - 1)
		n := 1 + rng.IntN(min(3*BlockSize, len(model)-int(off)))
		if rng.IntN(3) == 0 { // aligned whole blocks
			off = off / BlockSize * BlockSize
			n = (1 + rng.IntN(3)) * BlockSize
			n = min(n, len(model)-int(off))
		}
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		if _, err := m.WriteAt(p, off); err != nil {
			t.Fatalf("write %d+%d: %v", off, n, err)
		}
		copy(model[off:], p)
		q := make([]byte, n)
		roff := rng.Int64N(int64(len(model) - n + 1))
		if _, err := m.ReadAt(q, roff); err != nil {
			t.Fatalf("read %d+%d: %v", roff, n, err)
		}
		if !bytes.Equal(q, model[roff:roff+int64(n)]) {
			t.Fatalf("read %d+%d differs from the model", roff, n)
		}
	}
	// What is on the device is the file, block by block, at the extents.
	raw, _ := os.ReadFile(dev)
	for _, x := range xs {
		if !bytes.Equal(raw[x.Physical:x.Physical+x.Length], model[x.Logical:x.Logical+x.Length]) {
			t.Fatalf("extent %+v does not hold the file's bytes", x)
		}
	}
	if _, err := m.WriteAt([]byte{1}, 48*BlockSize); err == nil {
		t.Fatal("a write past the mapped size was accepted")
	}
}

func TestCheckExtents(t *testing.T) {
	ok := []Extent{{4096, 0, 4096}, {0, 8192, 4096}}
	if got, err := checkExtents("f", ok, 8192); err != nil || got[0].Logical != 0 {
		t.Fatalf("%v %v", got, err)
	}
	if _, err := checkExtents("f", []Extent{{0, 0, 4096}, {8192, 4096, 4096}}, 12288); err == nil {
		t.Fatal("a hole was accepted")
	}
	if _, err := checkExtents("f", []Extent{{0, 0, 4096}}, 8192); err == nil {
		t.Fatal("a short map was accepted")
	}
	if got, _ := checkExtents("f", []Extent{{0, 0, 16384}}, 8192); got[0].Length != 8192 {
		t.Fatalf("not clipped: %v", got)
	}
}

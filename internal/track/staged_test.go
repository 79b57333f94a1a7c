package track

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"os"
	"syscall"
	"testing"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/ublk"
	"github.com/dbdublk/dbdublk/ublk/uapi"
)

func ringWrite(off int64, data []byte) ublk.Request {
	return ublk.Request{Desc: uapi.IODesc{OpFlags: uint32(uapi.IOOpWrite), StartSector: uint64(off) >> 9, NrSectors: uint32(len(data) >> 9)}, Data: data}
}

func requestPath(t *testing.T, b ublk.Backend) *ublk.RequestPath {
	t.Helper()
	p, err := ublk.NewRequestPath(b, 8, ublk.DefaultMaxIOBytes)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// onDisk returns the index entry of block as the COW file holds it on disk
// (what a server that died would leave), and that slot's data.
func onDisk(t *testing.T, c *cow.File, block uint64) (entry uint64, data []byte) {
	t.Helper()
	raw, err := os.ReadFile(c.Path())
	if err != nil {
		t.Fatal(err)
	}
	entry = binary.LittleEndian.Uint64(raw[cow.HeaderSize+block*8:])
	if entry > 1 && int64(entry+1)*cow.BlockSize <= int64(len(raw)) {
		data = raw[entry*cow.BlockSize : (entry+1)*cow.BlockSize]
	}
	return entry, data
}

// TestStagedFirstWrites: first writes served by a queue on a real ring take
// the staged path (no copy-on-write worker ever starts), and leave what the
// workers' path leaves: the old data in the COW file with its index entries
// written through to the file before the write reached the device, and a
// snapshot that reads the old data. The writes cover a sub-block write, a
// 1 MiB write across an index section's end, and one whose range holds an
// already preserved block (two runs to read).
func TestStagedFirstWrites(t *testing.T) {
	const blocks = cow.SectionEntries + 512
	dev, orig, trk, c := inSnapshot(t, blocks)
	view := trk.View(trk.Current())
	front := requestPath(t, trk)
	const (
		sub      = 3*cow.BlockSize + 512
		crossing = (cow.SectionEntries - 100) * cow.BlockSize
		split    = 1000 * cow.BlockSize
	)
	first := []ublk.Request{
		ringWrite(0, random(cow.BlockSize)),
		ringWrite(sub, random(1024)),
		ringWrite(7*cow.BlockSize, random(2*cow.BlockSize)),
		ringWrite(crossing, random(ublk.DefaultMaxIOBytes)),
		ringWrite(split+5*cow.BlockSize, random(cow.BlockSize)),
	}
	then := []ublk.Request{ringWrite(split, random(64*cow.BlockSize))}
	for _, batch := range [][]ublk.Request{first, then} {
		for i, r := range front.Do(batch...) {
			if want := int32(len(batch[i].Data)); r.Res != want {
				t.Fatalf("write at %d = %d, want %d", batch[i].Desc.StartSector<<9, r.Res, want)
			}
		}
	}
	if trk.jobsReady.L != nil {
		t.Fatal("a copy-on-write worker started: some first write did not take the staged path")
	}
	if trk.Failed() != 0 {
		t.Fatalf("tracker failed: %v", trk.Failed())
	}
	now := make([]byte, len(orig))
	if _, err := syscall.Pread(dev.fd, now, 0); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(orig)
	for _, r := range append(first, then...) {
		copy(want[r.Desc.StartSector<<9:], r.Data)
	}
	if !bytes.Equal(now, want) {
		t.Fatal("the device does not hold the writes")
	}
	for _, r := range append(first, then...) {
		off := int64(r.Desc.StartSector << 9)
		for b := uint64(off) / cow.BlockSize; b < uint64(off+int64(len(r.Data))+cow.BlockSize-1)/cow.BlockSize; b++ {
			entry, data := onDisk(t, c, b)
			if entry <= 1 || !bytes.Equal(data, orig[b*cow.BlockSize:(b+1)*cow.BlockSize]) {
				t.Fatalf("block %d: the file holds entry %d and not its old data", b, entry)
			}
		}
	}
	snap := make([]byte, len(orig))
	if _, err := readSnapshot(view, snap, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(snap, orig) {
		t.Fatal("the snapshot does not read the data of its instant")
	}
}

// TestStagedCopyFailureIsDurable: when the old data cannot be read (the
// device ends early), the staged copy fails the snapshot durably, in the
// COW file, before the write is let through, and the write still succeeds;
// no index entry is written for the block whose old data was never read.
func TestStagedCopyFailureIsDurable(t *testing.T) {
	dev, _ := fakeDevice(t, 16)
	dev.size += 4 * cow.BlockSize // reads of the last 4 blocks come back empty
	trk := newTracker(t, dev)
	c := newCow(t, dev.Size(), 0)
	var hooked syscall.Errno
	trk.OnFailure(func(errno syscall.Errno, why error) {
		if x := c.Failed(); x == nil || x.Errno != syscall.EIO {
			t.Errorf("OnFailure ran before the COW file recorded the failure (%v)", x)
		}
		hooked = errno
	})
	if err := trk.Swap(dattobd.Snapshot, c, nil, nil); err != nil {
		t.Fatal(err)
	}
	front := requestPath(t, trk)
	data := random(cow.BlockSize)
	if r := front.Do(ringWrite(17*cow.BlockSize, data)); r[0].Res != cow.BlockSize {
		t.Fatalf("write = %d, want %d: a failed copy must not fail the live write", r[0].Res, cow.BlockSize)
	}
	if trk.Failed() != syscall.EIO || hooked != syscall.EIO {
		t.Fatalf("Failed() = %v, hook saw %v; want EIO", trk.Failed(), hooked)
	}
	got := make([]byte, cow.BlockSize)
	if _, err := syscall.Pread(dev.fd, got, 17*cow.BlockSize); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the write did not reach the device (%v)", err)
	}
	if entry, _ := onDisk(t, c, 17); entry != 0 {
		t.Fatalf("the file holds entry %d for block 17, whose old data was never read: its index write must not run after a failed read", entry)
	}
}

func random(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

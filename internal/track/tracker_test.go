package track

import (
	"bytes"
	"crypto/rand"
	"errors"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/bitmap"
	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/dio"
	"github.com/dbdublk/dbdublk/ublk"
	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// fileDevice is a Device over a regular file (no O_DIRECT).
type fileDevice struct {
	fd   int
	size int64
}

func (d *fileDevice) FD() int          { return d.fd }
func (d *fileDevice) CanDiscard() bool { return true }
func (d *fileDevice) Size() int64      { return d.size }

// fakeDevice is a device of blocks 4 KiB blocks of random content.
func fakeDevice(t *testing.T, blocks int) (*fileDevice, []byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "dev")
	data := make([]byte, blocks*cow.BlockSize)
	rand.Read(data)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return &fileDevice{fd: fd, size: int64(len(data))}, data
}

// newTracker is New, closed at the end of the test.
func newTracker(t *testing.T, dev Device) *Tracker {
	trk := New(dev, t.Logf)
	t.Cleanup(trk.Close)
	return trk
}

// readSnapshot reads the snapshot as its device's queue does: the real
// device, then FinishRead (View.ReadAt), up to the device's end.
func readSnapshot(v *View, p []byte, off int64) (int, error) {
	n := min(int64(len(p)), v.t.Size()-off)
	if err := v.ReadAt(p[:n], off); err != nil {
		return 0, err
	}
	return int(n), nil
}

// write goes through the tracker exactly as a queue does: admission, the
// write itself, then settlement.
func write(t *testing.T, trk *Tracker, p []byte, off int64) {
	resumed := make(chan error, 1)
	token, action, err := trk.BeforeWrite(uapi.IOOpWrite, off, int64(len(p)), func(err error) { resumed <- err })
	if err != nil {
		t.Errorf("BeforeWrite: %v", err)
		return
	}
	if action == ublk.WritePending {
		if err := <-resumed; err != nil {
			t.Errorf("resume: %v", err)
		}
		action = ublk.WriteProceed
	}
	if action == ublk.WriteProceed {
		if _, err := unix.Pwrite(trk.FD(), p, off); err != nil {
			t.Errorf("pwrite: %v", err)
		}
	}
	trk.AfterWrite(token)
}

func newCow(t *testing.T, size int64, fileSize int64) *cow.File {
	t.Helper()
	c, err := cow.Create(filepath.Join(t.TempDir(), "cow"), cow.Options{DeviceSize: size, FileSize: fileSize, CacheBytes: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(false) })
	return c
}

// inSnapshot is a tracker over a fake device of blocks blocks (its
// original contents returned) in snapshot mode with a fresh COW file.
func inSnapshot(t *testing.T, blocks int) (*fileDevice, []byte, *Tracker, *cow.File) {
	t.Helper()
	dev, orig := fakeDevice(t, blocks)
	trk := newTracker(t, dev)
	c := newCow(t, dev.Size(), 0)
	if err := trk.Swap(dattobd.Snapshot, c, nil, nil); err != nil {
		t.Fatal(err)
	}
	return dev, orig, trk, c
}

// TestSnapshotReadsRaceWrites: readers of the snapshot racing writers of
// the same blocks always see the pre-snapshot data, at any offset and
// length (sub-block writes included).
func TestSnapshotReadsRaceWrites(t *testing.T) {
	const blocks = 256
	dev, orig, trk, _ := inSnapshot(t, blocks)
	view := trk.View(trk.Current())
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			r := mrand.New(mrand.NewPCG(seed, 1))
			for i := 0; i < 400; i++ {
				off := int64(r.IntN(blocks*8)) * 512 // 512-byte aligned, any block
				n := int64(1+r.IntN(16)) * 512
				if off+n > dev.Size() {
					n = dev.Size() - off
				}
				p := make([]byte, n)
				rand.Read(p)
				write(t, trk, p, off)
			}
		}(uint64(w))
	}
	var reads int
	var rmu sync.Mutex
	for rd := 0; rd < 4; rd++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			r := mrand.New(mrand.NewPCG(seed, 2))
			buf := make([]byte, 64<<10)
			for {
				select {
				case <-stop:
					return
				default:
				}
				off := int64(r.IntN(blocks*8)) * 512
				n := int64(1+r.IntN(128)) * 512
				if off+n > dev.Size() {
					n = dev.Size() - off
				}
				got, err := readSnapshot(view, buf[:n], off)
				if err != nil {
					t.Errorf("snapshot read at %d: %v", off, err)
					return
				}
				if !bytes.Equal(buf[:got], orig[off:off+int64(got)]) {
					t.Errorf("snapshot read at %d+%d returned post-snapshot data", off, n)
					return
				}
				rmu.Lock()
				reads++
				rmu.Unlock()
			}
		}(uint64(rd))
	}
	time.Sleep(50 * time.Millisecond)
	// Writers finish on their own; then stop the readers.
	done := make(chan struct{})
	go func() {
		for trk.inflight[0].Load()+trk.inflight[1].Load() > 0 {
			time.Sleep(time.Millisecond)
		}
		close(done)
	}()
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
	<-done
	full := make([]byte, dev.Size())
	if _, err := readSnapshot(view, full, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(full, orig) {
		t.Fatal("the whole snapshot differs from the pre-snapshot device")
	}
	if reads == 0 {
		t.Fatal("no snapshot read ran concurrently with the writers")
	}
	if trk.Failed() != 0 {
		t.Fatalf("tracker failed: %v", trk.Failed())
	}
}

// TestSwapWaitsForAdmittedWrites: a transition does not complete while a
// write admitted under the old state is still in flight.
func TestSwapWaitsForAdmittedWrites(t *testing.T) {
	dev, _ := fakeDevice(t, 16)
	trk := newTracker(t, dev)
	token, _, _ := trk.BeforeWrite(uapi.IOOpWrite, 0, 4096, nil)
	c := newCow(t, dev.Size(), 0)
	swapped := make(chan error, 1)
	go func() { swapped <- trk.Swap(dattobd.Snapshot, c, nil, nil) }()
	select {
	case <-swapped:
		t.Fatal("swap returned while a write admitted before it was in flight")
	case <-time.After(100 * time.Millisecond):
	}
	trk.AfterWrite(token)
	select {
	case err := <-swapped:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("swap did not return after the write completed")
	}
}

// TestIncrementalMarksEveryWrite: every block a write touches is recorded,
// with and without the bitmap filter.
func TestIncrementalMarksEveryWrite(t *testing.T) {
	for _, withBits := range []bool{true, false} {
		dev, _ := fakeDevice(t, 300)
		trk := newTracker(t, dev)
		c := newCow(t, dev.Size(), 0)
		var bits *bitmap.Bitmap
		if withBits {
			bits = bitmap.New(c.Blocks())
		}
		if err := trk.Swap(dattobd.Incremental, c, bits, nil); err != nil {
			t.Fatal(err)
		}
		want := map[uint64]bool{}
		r := mrand.New(mrand.NewPCG(7, 7))
		var mu sync.Mutex
		var wg sync.WaitGroup
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 100; i++ {
					mu.Lock()
					off := int64(r.IntN(300*8)) * 512
					n := int64(1+r.IntN(20)) * 512
					mu.Unlock()
					if off+n > dev.Size() {
						n = dev.Size() - off
					}
					write(t, trk, make([]byte, n), off)
					mu.Lock()
					for b := off / 4096; b < (off+n+4095)/4096; b++ {
						want[uint64(b)] = true
					}
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		for b := range want {
			if e, err := c.Lookup(b); err != nil || e == 0 {
				t.Errorf("bits=%v: block %d was written but not recorded (entry %d, %v)", withBits, b, e, err)
			}
		}
		if got := c.NrChangedBlocks(); got != uint64(len(want)) {
			t.Errorf("bits=%v: %d blocks recorded, %d written", withBits, got, len(want))
		}
	}
}

// TestFullCowFailsClosed: when the COW store fills, the front write still
// happens, the tracker records EFBIG and the snapshot serves only EIO.
func TestFullCowFailsClosed(t *testing.T) {
	dev, _ := fakeDevice(t, 64)
	trk := newTracker(t, dev)
	c := newCow(t, dev.Size(), cow.DataOffset(cow.Blocks(dev.Size()))+2*cow.BlockSize)
	if err := trk.Swap(dattobd.Snapshot, c, nil, nil); err != nil {
		t.Fatal(err)
	}
	view := trk.View(trk.Current())
	// The failure is durable before anything sees the tracker failed.
	var hooked syscall.Errno
	trk.OnFailure(func(errno syscall.Errno, why error) {
		hooked = errno
		if trk.Failed() != 0 {
			t.Error("the tracker reported its failure before the hook made it durable")
		}
		if x := c.Failed(); x == nil || x.Errno != syscall.EFBIG {
			t.Errorf("the COW file had not recorded the failure when the hook ran: %+v", x)
		}
	})
	newData := bytes.Repeat([]byte{0xAB}, 3*cow.BlockSize)
	write(t, trk, newData, 0)
	if got := trk.Failed(); got != syscall.EFBIG || hooked != syscall.EFBIG {
		t.Fatalf("Failed() = %v, hook saw %v; want EFBIG", got, hooked)
	}
	// On disk: whoever opens the file now is refused (reload, recovery).
	s, err := cow.FileStorage(c.Path(), true)
	if err != nil {
		t.Fatal(err)
	}
	g, _, err := cow.Open(c.Path(), s, cow.ReadOnly, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if x := g.Failed(); x == nil || x.Errno != syscall.EFBIG {
		t.Errorf("the failure is not in the COW file on disk: %+v", x)
	}
	g.Close(false)
	got := make([]byte, 3*cow.BlockSize)
	if _, err := unix.Pread(trk.FD(), got, 0); err != nil || !bytes.Equal(got, newData) {
		t.Fatalf("the front write was lost when the snapshot failed")
	}
	if _, err := readSnapshot(view, make([]byte, cow.BlockSize), 0); !errors.Is(err, syscall.EIO) {
		t.Fatalf("snapshot read after failure: %v, want EIO", err)
	}
	if _, err := readSnapshot(view, make([]byte, cow.BlockSize), 40*cow.BlockSize); !errors.Is(err, syscall.EIO) {
		t.Fatalf("snapshot read of an untouched block after failure: %v, want EIO", err)
	}
}

// TestDiscardInSnapshotMode: a discard over blocks the snapshot still reads
// from the device is dropped; over preserved blocks it is forwarded.
func TestDiscardInSnapshotMode(t *testing.T) {
	_, _, trk, _ := inSnapshot(t, 32)
	tok, action, _ := trk.BeforeWrite(uapi.IOOpDiscard, 0, 8*cow.BlockSize, nil)
	trk.AfterWrite(tok)
	if action != ublk.WriteSkip {
		t.Errorf("discard of unpreserved blocks was forwarded")
	}
	write(t, trk, make([]byte, 2*cow.BlockSize), 4*cow.BlockSize)
	tok, action, _ = trk.BeforeWrite(uapi.IOOpDiscard, 4*cow.BlockSize, 2*cow.BlockSize, nil)
	trk.AfterWrite(tok)
	if action != ublk.WriteProceed {
		t.Errorf("discard of preserved blocks was dropped")
	}
}

// TestIncrementalWriteWaitsForIntent: in incremental mode with write-intent
// logging, by the time a write is let through, a crash (the COW file as it
// is on disk at that instant) already recovers its blocks as changed.
func TestIncrementalWriteWaitsForIntent(t *testing.T) {
	dev, _ := fakeDevice(t, 8192) // 32 MiB: 8 regions of 4 MiB
	trk := newTracker(t, dev)
	path := filepath.Join(t.TempDir(), "inc")
	c, err := cow.Create(path, cow.Options{DeviceSize: dev.Size(), IndexOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(false)
	if err := c.EnableIntent(); err != nil {
		t.Fatal(err)
	}
	if err := trk.Swap(dattobd.Incremental, c, bitmap.New(c.Blocks()), nil); err != nil {
		t.Fatal(err)
	}
	r := mrand.New(mrand.NewPCG(5, 5))
	pending := 0
	for i := 0; i < 60; i++ {
		off := int64(r.IntN(8192)) * cow.BlockSize
		resumed := make(chan error, 1)
		token, action, err := trk.BeforeWrite(uapi.IOOpWrite, off, cow.BlockSize, func(err error) { resumed <- err })
		if err != nil {
			t.Fatal(err)
		}
		if action == ublk.WritePending {
			pending++
			<-resumed
		}
		// The write would reach the device now: crash here.
		img, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		crashed := filepath.Join(t.TempDir(), "crashed")
		os.WriteFile(crashed, img, 0o600)
		s, err := cow.FileStorage(crashed, false)
		if err != nil {
			t.Fatal(err)
		}
		g, _, err := cow.Open(crashed, s, cow.ReloadIncremental, dev.Size(), 0)
		if err != nil {
			t.Fatalf("recover after write %d: %v", i, err)
		}
		if e, _ := g.Lookup(uint64(off / cow.BlockSize)); e == 0 {
			t.Fatalf("write %d to block %d was let through before a crash could recover it", i, off/cow.BlockSize)
		}
		g.Close(false)
		trk.AfterWrite(token)
	}
	if pending == 0 || pending > 8 {
		t.Fatalf("%d writes waited for a commit; want at most one per new 4 MiB region (1..8)", pending)
	}
	if err := trk.Failed(); err != 0 {
		t.Fatal(err)
	}
}

// beforeWrite calls BeforeWrite for a write of n bytes at off and returns
// its token, its action and a channel its resume sends on.
func beforeWrite(t *testing.T, trk *Tracker, op uapi.IOOp, off, n int64) (uint64, ublk.WriteAction, chan error) {
	t.Helper()
	resumed := make(chan error, 1)
	token, action, err := trk.BeforeWrite(op, off, n, func(err error) { resumed <- err })
	if err != nil {
		t.Fatal(err)
	}
	return token, action, resumed
}

// TestSwapHoldsWritesAtTheGate: while a Swap waits for the previous
// state's writes, a new write is neither let through nor admitted under
// the previous state: it is held, and once the new state is in, it is
// prepared under it (here: preserved for the snapshot) before it may go.
func TestSwapHoldsWritesAtTheGate(t *testing.T) {
	dev, orig := fakeDevice(t, 16)
	trk := newTracker(t, dev)
	old, _, _ := beforeWrite(t, trk, uapi.IOOpWrite, 0, 4096) // in flight under passthrough
	c := newCow(t, dev.Size(), 0)
	swapped := make(chan error, 1)
	go func() { swapped <- trk.Swap(dattobd.Snapshot, c, nil, nil) }()
	for !trk.Current().gate {
		time.Sleep(time.Millisecond)
	}
	token, action, resumed := beforeWrite(t, trk, uapi.IOOpWrite, 8192, 4096)
	if action != ublk.WritePending {
		t.Fatalf("a write at the gate was %v, want held (pending)", action)
	}
	select {
	case err := <-resumed:
		t.Fatalf("a held write resumed (%v) before the gate opened", err)
	case <-time.After(50 * time.Millisecond):
	}
	trk.AfterWrite(old)
	if err := <-swapped; err != nil {
		t.Fatal(err)
	}
	if err := <-resumed; err != nil {
		t.Fatalf("held write resumed with %v", err)
	}
	// It was preserved for the snapshot before it was let go.
	if e, _ := c.Lookup(2); e <= 1 {
		t.Fatalf("the held write's block was not preserved (entry %d)", e)
	}
	blk := make([]byte, cow.BlockSize)
	e, _ := c.Lookup(2)
	if err := c.ReadBlock(e, blk); err != nil || !bytes.Equal(blk, orig[8192:12288]) {
		t.Fatal("the preserved block is not the pre-snapshot data")
	}
	trk.AfterWrite(token)
}

// TestSwapTimeoutRollsBack: when the previous state's writes do not drain,
// Swap puts the previous state back and says so; writes held meanwhile are
// admitted under it; a later Swap works once the stuck write completes.
func TestSwapTimeoutRollsBack(t *testing.T) {
	old := drainTimeout
	drainTimeout = 100 * time.Millisecond
	t.Cleanup(func() { drainTimeout = old })
	dev, _ := fakeDevice(t, 16)
	trk := newTracker(t, dev)
	inc := newCow(t, dev.Size(), 0)
	if err := trk.Swap(dattobd.Incremental, inc, nil, nil); err != nil {
		t.Fatal(err)
	}
	stuck, _, _ := beforeWrite(t, trk, uapi.IOOpWrite, 0, 4096)
	snap := newCow(t, dev.Size(), 0)
	swapped := make(chan error, 1)
	go func() { swapped <- trk.Swap(dattobd.Snapshot, snap, nil, nil) }()
	for !trk.Current().gate {
		time.Sleep(time.Millisecond)
	}
	token, action, resumed := beforeWrite(t, trk, uapi.IOOpWrite, 3*4096, 4096)
	if action != ublk.WritePending {
		t.Fatalf("a write at the gate was %v", action)
	}
	err := <-swapped
	if !errors.Is(err, ErrDrain) {
		t.Fatalf("Swap with a stuck write = %v, want ErrDrain", err)
	}
	if st := trk.Current(); st.Mode != dattobd.Incremental || st.Cow != inc || st.gate {
		t.Fatalf("after a failed Swap the state is %v on %v (gate %v)", st.Mode, st.Cow.Path(), st.gate)
	}
	if err := <-resumed; err != nil {
		t.Fatal(err)
	}
	// The held write was admitted under the incremental state: recorded.
	if e, _ := inc.Lookup(3); e == 0 {
		t.Fatal("a write held at a failed Swap's gate was not recorded by the state put back")
	}
	if e, _ := snap.Lookup(3); e != 0 {
		t.Fatal("a write held at a failed Swap's gate went to the abandoned state")
	}
	trk.AfterWrite(token)
	trk.AfterWrite(stuck)
	if err := trk.Swap(dattobd.Snapshot, snap, nil, nil); err != nil {
		t.Fatalf("Swap after the stuck write completed: %v", err)
	}
}

// A discard held at a gate that opens on a snapshot is completed without
// reaching the device when the snapshot still reads its blocks there.
func TestHeldDiscardSkipped(t *testing.T) {
	dev, _ := fakeDevice(t, 16)
	trk := newTracker(t, dev)
	old, _, _ := beforeWrite(t, trk, uapi.IOOpWrite, 0, 4096)
	swapped := make(chan error, 1)
	c := newCow(t, dev.Size(), 0)
	go func() { swapped <- trk.Swap(dattobd.Snapshot, c, nil, nil) }()
	for !trk.Current().gate {
		time.Sleep(time.Millisecond)
	}
	token, action, resumed := beforeWrite(t, trk, uapi.IOOpDiscard, 4096, 8192)
	if action != ublk.WritePending {
		t.Fatalf("a discard at the gate was %v", action)
	}
	trk.AfterWrite(old)
	if err := <-swapped; err != nil {
		t.Fatal(err)
	}
	if err := <-resumed; !errors.Is(err, ublk.ErrSkipWrite) {
		t.Fatalf("held discard resumed with %v, want ErrSkipWrite", err)
	}
	trk.AfterWrite(token)
}

// Deferring a write never blocks the queue thread, however many wait: with
// every worker stuck, a thousand more first writes are still admitted.
func TestDeferNeverBlocks(t *testing.T) {
	const writes = 1000
	dev, _ := fakeDevice(t, writes)
	trk := newTracker(t, dev)
	if err := trk.Swap(dattobd.Snapshot, newCow(t, dev.Size(), 0), nil, nil); err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	var resumed sync.WaitGroup
	done := make(chan struct{})
	go func() {
		defer close(done)
		for b := 0; b < writes; b++ {
			resumed.Add(1)
			token, action, err := trk.BeforeWrite(uapi.IOOpWrite, int64(b)*cow.BlockSize, cow.BlockSize, func(error) {
				<-release // a worker stuck in its resume
				resumed.Done()
			})
			if err != nil || action != ublk.WritePending {
				t.Errorf("first write %d: %v %v", b, action, err)
			}
			defer trk.AfterWrite(token)
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("BeforeWrite blocked with the copy-on-write workers busy")
	}
	close(release)
	resumed.Wait()
}

// The race a snapshot read must survive, made to happen: the snapshot
// read's device read is done, then a write to the same block runs to
// completion (preserved, written), and only then does the read look the
// block up. It must still return the pre-snapshot data.
func TestSnapshotReadWriteRaceDeterministic(t *testing.T) {
	_, orig, trk, _ := inSnapshot(t, 16)
	view := trk.View(trk.Current())
	const off, n = 4 * cow.BlockSize, 2 * cow.BlockSize
	buf := make([]byte, n)
	if err := dio.ReadFull(view.FD(), buf, off); err != nil { // the device read
		t.Fatal(err)
	}
	write(t, trk, bytes.Repeat([]byte{0x5A}, n), off) // the racing write, whole
	if err := view.FinishRead(buf, off); err != nil { // the lookup, after it
		t.Fatal(err)
	}
	if !bytes.Equal(buf, orig[off:off+n]) {
		t.Fatal("a snapshot read overtaken by a write returned post-snapshot data")
	}
	// The other order: the write lands before the device read, which then
	// reads new data that the lookup must replace.
	const off2 = 9 * cow.BlockSize
	write(t, trk, bytes.Repeat([]byte{0xA5}, n), off2)
	if err := dio.ReadFull(view.FD(), buf, off2); err != nil {
		t.Fatal(err)
	}
	if err := view.FinishRead(buf, off2); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, orig[off2:off2+n]) {
		t.Fatal("a snapshot read after a write returned post-snapshot data")
	}
}

// syncGate is a COW file's storage whose Sync waits until it is opened: a
// write-intent commit held mid-fsync.
type syncGate struct {
	cow.Storage
	inSync chan struct{}
	open   chan struct{}
}

func (s *syncGate) Sync() error {
	select {
	case s.inSync <- struct{}{}:
		<-s.open
	default:
	}
	return s.Storage.Sync()
}

// A write into a region not yet recorded is not resumed before its write
// intent is on disk: with the commit's fsync held, the write waits.
func TestIncrementalWriteNotResumedBeforeCommit(t *testing.T) {
	dev, _ := fakeDevice(t, 8192)
	trk := newTracker(t, dev)
	path := filepath.Join(t.TempDir(), "inc")
	c, err := cow.Create(path, cow.Options{DeviceSize: dev.Size(), IndexOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	c.Close(true)
	fs, err := cow.FileStorage(path, false)
	if err != nil {
		t.Fatal(err)
	}
	gate := &syncGate{Storage: fs, inSync: make(chan struct{}), open: make(chan struct{})}
	var opened sync.Once
	release := func() { opened.Do(func() { close(gate.open) }) }
	c, _, err = cow.Open(path, gate, cow.ReloadIncremental, dev.Size(), 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(false) })
	t.Cleanup(release) // runs first: Close waits for a held commit
	if err := c.EnableIntent(); err != nil {
		t.Fatal(err)
	}
	if err := trk.Swap(dattobd.Incremental, c, nil, nil); err != nil {
		t.Fatal(err)
	}
	token, action, resumed := beforeWrite(t, trk, uapi.IOOpWrite, 0, cow.BlockSize)
	if action != ublk.WritePending {
		t.Fatalf("a write into an unrecorded region was %v, want pending", action)
	}
	<-gate.inSync // the commit is in its fsync
	select {
	case <-resumed:
		t.Fatal("the write was resumed before its write intent was on disk")
	case <-time.After(100 * time.Millisecond):
	}
	release()
	if err := <-resumed; err != nil {
		t.Fatal(err)
	}
	trk.AfterWrite(token)
}

// TestSealRefusesLaterWrites: Seal waits for the writes admitted before it,
// hands back the state they ran under, and from then on every modifying
// request fails with EROFS (one arriving at the gate as well as one after
// it) and is not counted in flight: nothing reaches the device untracked
// once the COW file is closed. A write admitted before Seal is marked.
func TestSealRefusesLaterWrites(t *testing.T) {
	dev, _ := fakeDevice(t, 64)
	trk := newTracker(t, dev)
	c := newCow(t, dev.Size(), 0)
	if err := trk.Swap(dattobd.Incremental, c, nil, nil); err != nil {
		t.Fatal(err)
	}
	write(t, trk, make([]byte, 4096), 4096)
	inFlight, action, resumed := beforeWrite(t, trk, uapi.IOOpWrite, 0, 4096)
	if action == ublk.WritePending {
		if err := <-resumed; err != nil {
			t.Fatal(err)
		}
	}
	sealed := make(chan *State, 1)
	go func() {
		prev, err := trk.Seal()
		if err != nil {
			t.Error(err)
		}
		sealed <- prev
	}()
	for !trk.Current().gate {
		time.Sleep(time.Millisecond)
	}
	held := make(chan error, 1)
	_, action, err := trk.BeforeWrite(uapi.IOOpWrite, 8192, 4096, func(err error) { held <- err })
	if err != nil || action != ublk.WritePending {
		t.Fatalf("a write at the seal's gate: %v, %v; want held", action, err)
	}
	trk.AfterWrite(inFlight)
	prev := <-sealed
	if prev == nil || prev.Cow != c || prev.Mode != dattobd.Incremental {
		t.Fatalf("Seal returned %+v, want the incremental state", prev)
	}
	if err := <-held; !errors.Is(err, syscall.EROFS) {
		t.Fatalf("the write held at the gate resumed with %v, want EROFS", err)
	}
	for _, op := range []uapi.IOOp{uapi.IOOpWrite, uapi.IOOpDiscard, uapi.IOOpWriteZeroes} {
		if _, _, err := trk.BeforeWrite(op, 12288, 4096, func(error) { t.Error("resumed a sealed write") }); !errors.Is(err, syscall.EROFS) {
			t.Fatalf("%v after Seal: %v, want EROFS", op, err)
		}
	}
	if n := trk.inflight[0].Load() + trk.inflight[1].Load(); n != 1 {
		// the held write stays counted until its AfterWrite
		t.Fatalf("%d writes counted in flight, want only the held one", n)
	}
	for _, blk := range []uint64{0, 1} {
		if e, err := c.Lookup(blk); err != nil || e == 0 {
			t.Fatalf("block %d written before the seal is not marked", blk)
		}
	}
}

// A COW file on the volume reads as zeros in the snapshot even where one
// of its blocks was also preserved: PatchRead's patches never overlap, so
// the zero-copy queue may apply them in any order, and the view is the
// same whichever order they land in.
func TestPatchReadZerosCowExtents(t *testing.T) {
	dev, orig := fakeDevice(t, 16)
	trk := newTracker(t, dev)
	c := newCow(t, dev.Size(), 0)
	ext := []cow.Extent{{Logical: 0, Physical: 5 * cow.BlockSize, Length: 2 * cow.BlockSize}} // blocks 5 and 6
	if err := trk.Swap(dattobd.Snapshot, c, nil, ext); err != nil {
		t.Fatal(err)
	}
	view := trk.View(trk.Current())
	write(t, trk, bytes.Repeat([]byte{0x77}, 3*cow.BlockSize), 6*cow.BlockSize) // blocks 6-8 preserved
	const off, n = 4*cow.BlockSize + 512, 5 * cow.BlockSize
	want := append([]byte(nil), orig[off:off+n]...)
	clear(want[5*cow.BlockSize-off : 7*cow.BlockSize-off])

	got := dio.AlignedBuf(n)
	if err := view.ReadAt(got, off); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the snapshot view differs: extents not zero, or preserved blocks not overlaid")
	}
	patches, err := view.PatchRead(off, n, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range patches {
		for _, q := range patches[i+1:] {
			if p.At < q.At+q.Len && q.At < p.At+p.Len {
				t.Fatalf("patches %+v and %+v overlap", p, q)
			}
		}
	}
	// The device read, then the patches last to first.
	if err := dio.ReadFull(dev.FD(), got, off); err != nil {
		t.Fatal(err)
	}
	for i := len(patches) - 1; i >= 0; i-- {
		p := patches[i]
		if p.FD == ublk.PatchZeros {
			clear(got[p.At : p.At+p.Len])
		} else if err := dio.ReadFull(p.FD, got[p.At:p.At+p.Len], p.Off); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, want) {
		t.Fatal("patches applied in reverse order give another view")
	}
}

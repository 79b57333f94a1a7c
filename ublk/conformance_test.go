package ublk_test

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/dio"
	"github.com/dbdublk/dbdublk/internal/track"
	"github.com/dbdublk/dbdublk/ublk"
	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// The Backend conformance suite: every backend a device ships with (the
// tracker in each of its modes, the snapshot view) served through the
// shipped request path (ublk.RequestPath, the queue code with only the ublk
// commands replaced), on files of the host.

const (
	devBlocks = 256 // 1 MiB device
	devSize   = devBlocks * 4096
	depth     = 8
	bufSize   = 64 << 10
)

// fileDevice is the real device of the tests: a file opened with O_DIRECT.
type fileDevice struct {
	fd int
}

func (d fileDevice) FD() int          { return d.fd }
func (d fileDevice) CanDiscard() bool { return true }
func (d fileDevice) Size() int64      { return devSize }

func openDevice(t *testing.T) (fileDevice, []byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "dev")
	data := make([]byte, devSize)
	rand.Read(data)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fileDevice{fd}, data
}

// contents reads the whole device.
func (d fileDevice) contents(t *testing.T) []byte {
	t.Helper()
	b := dio.AlignedBuf(devSize)
	if err := dio.ReadFull(d.fd, b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// target is one backend under test and what it promises.
type target struct {
	backend ublk.Backend
	// want returns what a read of the whole device must return now.
	want func(t *testing.T) []byte
	// writable: modifying requests succeed and show in want; otherwise
	// they fail with EROFS and change nothing.
	writable bool
}

func newCow(t *testing.T, indexOnly bool) *cow.File {
	t.Helper()
	c, err := cow.Create(filepath.Join(t.TempDir(), "cow"), cow.Options{DeviceSize: devSize, IndexOnly: indexOnly})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(false) })
	return c
}

func frontTarget(t *testing.T, mode dattobd.Mode) target {
	dev, _ := openDevice(t)
	trk := track.New(dev, t.Logf)
	t.Cleanup(trk.Close)
	if mode != dattobd.Passthrough {
		c := newCow(t, mode == dattobd.Incremental)
		if mode == dattobd.Incremental {
			if err := c.EnableIntent(); err != nil {
				t.Fatal(err)
			}
		}
		if err := trk.Swap(mode, c, nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	return target{backend: trk, want: dev.contents, writable: true}
}

// viewTarget is the snapshot view, after the front device has rewritten
// half the blocks: reads must still give the data of the snapshot instant.
func viewTarget(t *testing.T) target {
	dev, orig := openDevice(t)
	trk := track.New(dev, t.Logf)
	t.Cleanup(trk.Close)
	if err := trk.Swap(dattobd.Snapshot, newCow(t, false), nil, nil); err != nil {
		t.Fatal(err)
	}
	view := trk.View(trk.Current())
	front := newPath(t, trk)
	for b := 0; b < devBlocks; b += 2 {
		res := front.Do(write(int64(b)*4096, random(4096), 0))
		if res[0].Res != 4096 {
			t.Fatalf("front write of block %d = %d", b, res[0].Res)
		}
	}
	if bytes.Equal(dev.contents(t), orig) {
		t.Fatal("the front writes did not change the device")
	}
	return target{backend: view, want: func(*testing.T) []byte { return orig }}
}

func newPath(t *testing.T, b ublk.Backend) *ublk.RequestPath {
	t.Helper()
	p, err := ublk.NewRequestPath(b, depth, bufSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

func req(op uapi.IOOp, flags uint32, off, n int64) ublk.Request {
	return ublk.Request{Desc: uapi.IODesc{OpFlags: uint32(op) | flags, StartSector: uint64(off) >> 9, NrSectors: uint32(n >> 9)}}
}

func read(off, n int64) ublk.Request { return req(uapi.IOOpRead, 0, off, n) }

func write(off int64, data []byte, flags uint32) ublk.Request {
	r := req(uapi.IOOpWrite, flags, off, int64(len(data)))
	r.Data = data
	return r
}

func random(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func errno(e syscall.Errno) int32 { return -int32(e) }

func TestBackendConformance(t *testing.T) {
	targets := map[string]func(*testing.T) target{
		"passthrough": func(t *testing.T) target { return frontTarget(t, dattobd.Passthrough) },
		"snapshot":    func(t *testing.T) target { return frontTarget(t, dattobd.Snapshot) },
		"incremental": func(t *testing.T) target { return frontTarget(t, dattobd.Incremental) },
		"view":        viewTarget,
	}
	for name, mk := range targets {
		t.Run(name, func(t *testing.T) {
			tg := mk(t)
			p := newPath(t, tg.backend)
			var reads, writes, errs uint64

			// Reads of any aligned range give the device's contents.
			for _, r := range [][2]int64{{0, 4096}, {512, 512}, {4096 * 7, 3 * 4096}, {devSize - bufSize, bufSize}, {1536, 8192}} {
				res := p.Do(read(r[0], r[1]))[0]
				reads++
				want := tg.want(t)[r[0] : r[0]+r[1]]
				if res.Res != int32(r[1]) || !bytes.Equal(res.Data, want) {
					t.Fatalf("read %d+%d = %d, data equal %v", r[0], r[1], res.Res, bytes.Equal(res.Data, want))
				}
			}

			// Writes, plain and FUA, land (or are refused on a read-only
			// device, changing nothing).
			for _, w := range []struct {
				off   int64
				n     int
				flags uint32
			}{{8192, 4096, 0}, {512, 1024, 0}, {40960, 3 * 4096, uapi.IOFlagFUA}} {
				before := tg.want(t)
				data := random(w.n)
				res := p.Do(write(w.off, data, w.flags))[0]
				writes++
				after := tg.want(t)
				if tg.writable {
					if res.Res != int32(w.n) || !bytes.Equal(after[w.off:w.off+int64(w.n)], data) {
						t.Fatalf("write %d+%d (flags %#x) = %d; landed %v", w.off, w.n, w.flags, res.Res, bytes.Equal(after[w.off:w.off+int64(w.n)], data))
					}
				} else {
					errs++
					if res.Res != errno(syscall.EROFS) || !bytes.Equal(after, before) {
						t.Fatalf("write to a read-only device = %d, changed %v", res.Res, !bytes.Equal(after, before))
					}
				}
			}

			// Write-zeroes makes a range read as zeros.
			res := p.Do(req(uapi.IOOpWriteZeroes, 0, 65536, 2*4096))[0]
			if tg.writable {
				if res.Res != 0 || !bytes.Equal(tg.want(t)[65536:65536+2*4096], make([]byte, 2*4096)) {
					t.Fatalf("write-zeroes = %d", res.Res)
				}
			} else if res.Res != errno(syscall.EROFS) {
				t.Fatalf("write-zeroes on a read-only device = %d", res.Res)
			} else {
				errs++
			}

			// Discard completes (it is a hint); a read-only device refuses it.
			res = p.Do(req(uapi.IOOpDiscard, 0, 131072, 4096))[0]
			if (tg.writable && res.Res != 0) || (!tg.writable && res.Res != errno(syscall.EROFS)) {
				t.Fatalf("discard = %d", res.Res)
			}
			if !tg.writable {
				errs++
			}

			// Flush succeeds.
			if res := p.Do(req(uapi.IOOpFlush, 0, 0, 0))[0]; res.Res != 0 {
				t.Fatalf("flush = %d", res.Res)
			}

			// Requests that cannot be served fail with their errno.
			if res := p.Do(read(0, bufSize+512))[0]; res.Res != errno(syscall.EINVAL) {
				t.Fatalf("read past the buffer = %d, want EINVAL", res.Res)
			}
			if res := p.Do(req(uapi.IOOpWriteSame, 0, 0, 4096))[0]; res.Res != errno(syscall.EOPNOTSUPP) {
				t.Fatalf("write-same = %d, want EOPNOTSUPP", res.Res)
			}
			reads++
			errs += 2

			// Many requests in flight at once, each on its own tag (first
			// writes in snapshot mode wait for the copy-on-write workers and
			// come back through the queue's wake eventfd).
			var batch []ublk.Request
			var datas [][]byte
			for i := 0; i < depth; i++ {
				d := random(2 * 4096)
				datas = append(datas, d)
				batch = append(batch, write(int64(100+3*i)*4096, d, 0))
			}
			before := tg.want(t)
			for i, r := range p.Do(batch...) {
				writes++
				if tg.writable && r.Res != 2*4096 {
					t.Fatalf("concurrent write %d = %d", i, r.Res)
				}
				if !tg.writable {
					errs++
				}
			}
			after := tg.want(t)
			for i, d := range datas {
				off := int64(100+3*i) * 4096
				if tg.writable != bytes.Equal(after[off:off+int64(len(d))], d) {
					t.Fatalf("concurrent write %d landed: %v, writable %v", i, !tg.writable, tg.writable)
				}
			}
			if !tg.writable && !bytes.Equal(before, after) {
				t.Fatal("refused writes changed the device")
			}

			st := p.Stats()
			if st.Reads != reads || st.Writes != writes || st.WriteZeroes != 1 || st.Discards != 1 || st.Flushes != 1 || st.Errors != errs {
				t.Errorf("stats %+v; want %d reads, %d writes, 1 write-zeroes, 1 discard, 1 flush, %d errors", st, reads, writes, errs)
			}
		})
	}
}

// Reads that end at the end of the file read zero bytes: EIO, never 0
// (which would make the kernel requeue the request forever).
func TestReadPastEndIsEIO(t *testing.T) {
	dev, _ := openDevice(t)
	trk := track.New(dev, t.Logf)
	t.Cleanup(trk.Close)
	p := newPath(t, trk)
	if res := p.Do(read(devSize, 4096))[0]; res.Res != errno(syscall.EIO) {
		t.Fatalf("read at the end = %d, want EIO", res.Res)
	}
}

// Every request a tracker admitted is settled whatever its end (issued,
// deferred, failed before reaching the file, refused): a mode change after
// them does not wait.
func TestAdmissionsSettle(t *testing.T) {
	dev, _ := openDevice(t)
	trk := track.New(dev, t.Logf)
	t.Cleanup(trk.Close)
	if err := trk.Swap(dattobd.Snapshot, newCow(t, false), nil, nil); err != nil {
		t.Fatal(err)
	}
	p := newPath(t, trk)
	p.Do(
		write(0, random(4096), 0),                    // deferred: first write
		write(0, random(4096), uapi.IOFlagFUA),       // admitted while the first is preserved
		write(8192, random(bufSize+4096), 0),         // too large: fails after admission
		req(uapi.IOOpDiscard, 0, 65536, 4096),        // dropped (WriteSkip)
		req(uapi.IOOpWriteZeroes, 0, 131072, 2*4096), // deferred, then issued
	)
	done := make(chan error, 1)
	go func() { done <- trk.Swap(dattobd.Passthrough, nil, nil, nil) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a mode change waits for requests that have completed")
	}
}

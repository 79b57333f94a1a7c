// Package backup brings a backup image up to date: given the current
// snapshot device and the previous snapshot's COW file (its changed-block
// list), it copies only the blocks that changed into the image. This is
// dattobd's update-img, checked more strictly and run in parallel.
package backup

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/dio"
	"github.com/dbdublk/dbdublk/internal/safepath"
)

// Snapshot identifies the snapshot an image is brought up to.
type Snapshot struct {
	Path  string   // the snapshot device, e.g. /dev/datto0
	UUID  [16]byte // its series
	SeqID uint64   // its sequence number
	Size  int64    // bytes
}

// Options tune a run.
type Options struct {
	Workers  int                               // parallel copiers; 0 = DefaultWorkers
	ChunkMax int64                             // largest single copy; 0 = DefaultChunk
	Progress func(doneBytes, totalBytes int64) // called as copies finish; may be nil
}

// Summary is what a run did.
type Summary struct {
	BlocksChanged uint64
	BytesCopied   int64
	Seconds       float64
}

// Checked is what Check found good: the open COW file and the image,
// opened once for writing (its name is not looked up again).
type Checked struct {
	Cow   *cow.File
	Image *os.File
}

// Close closes both.
func (c *Checked) Close() {
	c.Cow.Close(false)
	c.Image.Close()
}

// Check validates the COW file and the image against the snapshot without
// changing anything, and returns them open. Neither is reached through a
// symbolic link, and neither may sit in a directory a user other than root
// can change (the paths are names a root program follows once).
func Check(snap Snapshot, cowPath, imagePath string) (*Checked, error) {
	if err := safepath.CheckDir(filepath.Dir(cowPath)); err != nil {
		return nil, fmt.Errorf("COW file %s: %w", cowPath, err)
	}
	c, err := openCow(cowPath)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*Checked, error) {
		c.Close(false)
		return nil, err
	}
	if err := CheckCow(c, snap, cowPath); err != nil {
		return fail(err)
	}
	img, err := openImage(imagePath, snap.Size)
	if err != nil {
		return fail(err)
	}
	return &Checked{Cow: c, Image: img}, nil
}

// CheckCow checks that the COW file is the intact change list of the
// snapshot before snap, of the same series and size.
func CheckCow(c *cow.File, snap Snapshot, cowPath string) error {
	h := c.Header()
	if x := c.Failed(); x != nil {
		return fmt.Errorf("COW file %s records a tracking failure: %s; its changed-block list misses writes, a full backup is required", cowPath, x)
	}
	if h.UUID != snap.UUID {
		return fmt.Errorf("COW file %s belongs to another snapshot series (uuid %s, the snapshot's is %s)",
			cowPath, hex.EncodeToString(h.UUID[:]), hex.EncodeToString(snap.UUID[:]))
	}
	if snap.SeqID < 2 || h.SeqID+1 != snap.SeqID {
		return fmt.Errorf("COW file %s is the changed-block list of snapshot %d, but %s is snapshot %d: it needs snapshot %d's COW file",
			cowPath, h.SeqID, snap.Path, snap.SeqID, snap.SeqID-1)
	}
	if h.Flags&cow.FlagClean == 0 {
		return fmt.Errorf("COW file %s was not closed cleanly; its changed-block list cannot be trusted, a full backup is required", cowPath)
	}
	if err := c.SetDeviceSize(snap.Size); err != nil {
		return fmt.Errorf("COW file %s does not match the snapshot's size: %w", cowPath, err)
	}
	return nil
}

// openImage opens the image for writing, never through a symbolic link
// (a block device named by a link, such as /dev/mapper/x, is resolved once
// here), and checks its size.
func openImage(path string, size int64) (*os.File, error) {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("image %s does not exist", path)
		}
		return nil, fmt.Errorf("image %s: %w", path, err)
	}
	if err := safepath.CheckDir(filepath.Dir(real)); err != nil {
		return nil, fmt.Errorf("image %s: %w", path, err)
	}
	f, err := os.OpenFile(real, os.O_WRONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", path, err)
	}
	n, err := f.Seek(0, io.SeekEnd) // a file's size, or a block device's
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("size of image %s: %w", path, err)
	}
	if n != size {
		f.Close()
		return nil, fmt.Errorf("image %s is %d bytes, but the snapshot is %d bytes", path, n, size)
	}
	return f, nil
}

// openCow opens the COW file at path read-only, through its filesystem.
func openCow(path string) (*cow.File, error) {
	s, err := cow.FileStorage(path, true)
	if err != nil {
		return nil, err
	}
	c, _, err := cow.Open(path, s, cow.ReadOnly, 0, 0)
	return c, err
}

// DefaultWorkers is how many copies run at once: enough requests in flight
// to keep the snapshot device's queues and the image's disk busy (scattered
// 4 KiB changes are latency-bound, one request per copy), at 1 MiB of
// buffer each.
const DefaultWorkers = 16

// DefaultChunk is the largest single copy: adjacent changed blocks are
// coalesced up to it.
const DefaultChunk = 1 << 20

// extent is one copy: a byte range of the snapshot.
type extent struct{ off, n int64 }

// UpdateImage copies every block the COW file marks as changed from the
// snapshot device to the image (Copy), after Check. When a check fails the
// image is not touched.
func UpdateImage(snap Snapshot, cowPath, imagePath string, opt Options) (Summary, error) {
	ck, err := Check(snap, cowPath, imagePath)
	if err != nil {
		return Summary{}, err
	}
	defer ck.Close()
	return CopyFromDevice(ck, snap, opt)
}

// CopyFromDevice is Copy of what Check found good, reading the snapshot
// device at snap.Path.
func CopyFromDevice(ck *Checked, snap Snapshot, opt Options) (Summary, error) {
	src, err := OpenDevice(snap.Path)
	if err != nil {
		return Summary{}, err
	}
	defer src.Close()
	return Copy(ck.Cow, src, ck.Image, snap.Size, opt)
}

// Source is where a copy reads the snapshot: its device (Device), or the
// snapshot's own server, which reads the real device and the COW store.
type Source interface {
	// ReadAt fills p with the snapshot's bytes at off. p is aligned for
	// O_DIRECT (dio.AlignedBuf); off and len(p) are multiples of
	// cow.BlockSize, but at the device's end.
	ReadAt(p []byte, off int64) error
}

// Copy copies every block c marks as changed from src to image, adjacent
// blocks coalesced into large copies run in parallel, then fsyncs the
// image. Its memory does not grow with the device or the number of
// changes: the change list is streamed to the copiers. The copy does not
// wait for the change list's count, a pass of its own for progress's
// total: the two passes run at once, and progress is reported from the
// moment the total is known.
func Copy(c *cow.File, src Source, image *os.File, size int64, opt Options) (Summary, error) {
	start := time.Now()
	if opt.Workers <= 0 {
		opt.Workers = DefaultWorkers
	}
	if opt.ChunkMax <= 0 {
		opt.ChunkMax = DefaultChunk
	}
	prog := &progress{report: opt.Progress}
	var blocks uint64
	counted := make(chan error, 1)
	go func() {
		var total int64
		var err error
		blocks, total, err = countChanges(c, size)
		if err == nil {
			prog.setTotal(total)
		}
		counted <- err
	}()
	dst := openSink(image)
	defer dst.close()
	err := copyChanges(c, src, dst, size, prog, opt)
	if cerr := <-counted; cerr != nil && err == nil {
		err = fmt.Errorf("read changed-block list %s: %w", c.Path(), cerr)
	}
	if err != nil {
		return Summary{}, err
	}
	if err := dst.sync(); err != nil {
		return Summary{}, fmt.Errorf("fsync image %s: %w", image.Name(), err)
	}
	return Summary{BlocksChanged: blocks, BytesCopied: prog.total, Seconds: time.Since(start).Seconds()}, nil
}

// progress orders a copy's progress reports (done only ever grows) and
// holds them until the total is known.
type progress struct {
	mu          sync.Mutex
	report      func(done, total int64)
	done, total int64
	totalKnown  bool
}

// finished counts n more bytes copied.
func (p *progress) finished(n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done += n
	if p.report != nil && p.totalKnown {
		p.report(p.done, p.total)
	}
}

// setTotal makes the total known, and reports what is done so far.
func (p *progress) setTotal(total int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.total, p.totalKnown = total, true
	if p.report != nil && p.done > 0 {
		p.report(p.done, p.total)
	}
}

// countChanges returns how many blocks the change list marks and how many
// bytes of the device they cover (a first pass over the index, so progress
// has a total without the extents being held in memory).
func countChanges(c *cow.File, size int64) (blocks uint64, bytes int64, err error) {
	err = c.ChangedRuns(func(first, count uint64) error {
		blocks += count
		bytes += min(int64(first+count)*cow.BlockSize, size) - int64(first)*cow.BlockSize
		return nil
	})
	return blocks, bytes, err
}

// Device is a snapshot device as a Source, with a buffered descriptor and,
// where the device allows, an O_DIRECT one: a one-pass copy gains nothing
// from the page cache, which only slows it down. The buffered descriptor
// serves unaligned tails.
type Device struct{ f, direct *os.File }

// OpenDevice opens the snapshot device at path (twice, the second with
// O_DIRECT through the first's descriptor).
func OpenDevice(path string) (*Device, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open snapshot %s: %w", path, err)
	}
	d := &Device{f: f}
	d.direct, _ = os.OpenFile(fdPath(f), os.O_RDONLY|syscall.O_DIRECT, 0)
	return d, nil
}

// ReadAt reads the snapshot device.
func (d *Device) ReadAt(p []byte, off int64) error {
	aligned := off%dio.Align == 0 && len(p)%dio.Align == 0
	if err := ioAt(d.direct, d.f, aligned, func(x *os.File) (int, error) { return x.ReadAt(p, off) }); err != nil {
		return fmt.Errorf("read snapshot at %d: %w", off, err)
	}
	return nil
}

// Close closes the device.
func (d *Device) Close() {
	d.f.Close()
	if d.direct != nil {
		d.direct.Close()
	}
}

// sink is the image a copy writes: the caller's descriptor and its
// O_DIRECT twin, opened through the descriptor, where the file allows.
type sink struct{ f, direct *os.File }

func openSink(image *os.File) *sink {
	s := &sink{f: image}
	s.direct, _ = os.OpenFile(fdPath(image), os.O_WRONLY|syscall.O_DIRECT, 0)
	return s
}

// fdPath names an open file by its descriptor.
func fdPath(f *os.File) string { return fmt.Sprintf("/proc/self/fd/%d", f.Fd()) }

// close closes the twin (the image is the caller's).
func (s *sink) close() {
	if s.direct != nil {
		s.direct.Close()
	}
}

// writeAt writes p at off, through the O_DIRECT twin when aligned.
func (s *sink) writeAt(p []byte, off int64) error {
	aligned := off%dio.Align == 0 && len(p)%dio.Align == 0
	if err := ioAt(s.direct, s.f, aligned, func(x *os.File) (int, error) { return x.WriteAt(p, off) }); err != nil {
		return fmt.Errorf("write image at %d: %w", off, err)
	}
	return nil
}

// sync makes the image durable (the fsync covers writes through both of
// its descriptors; both are synced all the same).
func (s *sink) sync() error {
	if s.direct != nil {
		if err := s.direct.Sync(); err != nil {
			return err
		}
	}
	return s.f.Sync()
}

// copyChanges streams the changed runs, cut into copies of at most
// opt.ChunkMax bytes, to opt.Workers copiers, and the small ones to a ring
// copier when src is a RingSource (see ringCopier), set up at the first
// small copy, counting each copy's bytes in prog.
func copyChanges(c *cow.File, src Source, dst *sink, size int64, prog *progress, opt Options) error {
	finished := prog.finished
	var firstErr error
	var errOnce sync.Once
	fail := func(err error) { errOnce.Do(func() { firstErr = err }) }
	work := make(chan extent, opt.Workers)
	var wg sync.WaitGroup
	for i := 0; i < opt.Workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := dio.AlignedBuf(int(opt.ChunkMax))
			for e := range work {
				err := src.ReadAt(buf[:e.n], e.off)
				if err == nil {
					err = dst.writeAt(buf[:e.n], e.off)
				}
				if err != nil {
					fail(err)
					continue
				}
				finished(e.n)
			}
		}()
	}
	rs, ringable := src.(RingSource)
	var small chan extent
	startRing := func() {
		ringable = false // one try
		if r, err := newRingCopier(rs, dst); err == nil {
			small = make(chan extent, ringSlots)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer r.close()
				r.run(small, finished, fail)
			}()
		}
	}
	err := c.ChangedRuns(func(first, count uint64) error {
		off := int64(first) * cow.BlockSize
		end := min(int64(first+count)*cow.BlockSize, size)
		for ; off < end; off += opt.ChunkMax {
			e := extent{off, min(opt.ChunkMax, end-off)}
			if ringable && takes(e) {
				startRing()
			}
			if small != nil && takes(e) {
				small <- e
			} else {
				work <- e
			}
		}
		return nil
	})
	close(work)
	if small != nil {
		close(small)
	}
	wg.Wait()
	if err != nil {
		return fmt.Errorf("read changed-block list %s: %w", c.Path(), err)
	}
	return firstErr
}

// ioAt runs op on the O_DIRECT descriptor when the range is aligned for it
// and on the buffered one otherwise (or when a filesystem refuses O_DIRECT
// with EINVAL).
func ioAt(direct, buffered *os.File, aligned bool, op func(*os.File) (int, error)) error {
	if direct != nil && aligned {
		_, err := op(direct)
		if !errors.Is(err, syscall.EINVAL) {
			return err
		}
	}
	_, err := op(buffered)
	return err
}

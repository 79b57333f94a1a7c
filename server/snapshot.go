package server

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/bitmap"
	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/ublk"
)

// Defaults and units follow dattobd: -c is bytes, -f and sizes are MiB.
const (
	DefaultCacheBytes = 300 << 20
	mib               = 1 << 20
	// snapshotIDBase offsets snapshot devices' ublk ids past every minor.
	snapshotIDBase = MaxMinor + 1
)

// Filesystem freeze ioctls (linux/fs.h: _IOWR('X', 119/120, int)); x/sys
// does not name them.
const (
	ioctlFIFREEZE = 0xC0045877
	ioctlFITHAW   = 0xC0045878
)

// dattobd's /proc/datto-info state values for active devices.
const (
	stateActiveIncremental = 2
	stateActiveSnapshot    = 3
)

// DattoPath is the dattobd-compatible name of minor's snapshot device.
func DattoPath(minor int) string { return fmt.Sprintf("/dev/datto%d", minor) }

// SnapshotBlockPath is the ublk block device serving minor's snapshot.
func SnapshotBlockPath(minor int) string { return fmt.Sprintf("/dev/ublkb%d", snapshotIDBase+minor) }

// snapshot is the tracking state a server adds to its front device.
type snapshot struct {
	cowPath    string
	cacheBytes int64
	fallocMiB  int64 // as requested; 0 = default
	// extents are where a COW file on the volume itself lies on the
	// device (nil for one on another filesystem); reloads need them.
	extents []cow.Extent
	// prevExtents, in snapshot mode, are those of the previous COW file
	// (the change list update-img is about to use) when it is on the
	// volume: the server wrote its index there directly, untracked, so
	// the snapshot shows those blocks as zeros too, as the previous
	// snapshot (and so the image) did.
	prevExtents []cow.Extent
	relative    string // the COW file's path below its volume's mount point
	dev         *ublk.Device
}

// relativeToFront is path relative to where the front device is mounted.
func (s *Server) relativeToFront(path string) string {
	var st unix.Stat_t
	if unix.Stat(s.FrontPath(), &st) != nil {
		return ""
	}
	mnt := MountPoint(uint64(st.Rdev))
	if mnt == "" {
		return ""
	}
	rel, err := filepath.Rel(mnt, path)
	if err != nil || strings.HasPrefix(rel, "..") {
		return ""
	}
	return rel
}

// releaseStore gives a snapshot's data store on the volume back to its
// filesystem once the snapshot is over. The store's blocks showed as zeros
// in the snapshot (and so in its image), but hold COW data the server
// wrote directly, which the tracking never saw: they are zeroed on the
// device first, so the next snapshot agrees with the image there. The
// index stays where it is, still written at its extents.
func (s *Server) releaseStore(c *cow.File) {
	end := cow.DataOffset(c.Blocks())
	for _, x := range s.snap.extents {
		lo := max(x.Logical, end)
		if lo >= x.Logical+x.Length {
			continue
		}
		r := [2]uint64{uint64(x.Physical + lo - x.Logical), uint64(x.Logical + x.Length - lo)}
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(s.trk.fd), unix.BLKZEROOUT, uintptr(unsafe.Pointer(&r))); errno != 0 {
			s.trk.fail(syscall.EIO, fmt.Errorf("zero the data store of %s on %s: %w", c.Path(), s.cfg.BlockDevice, errno))
		}
	}
	s.snap.extents = clipExtents(s.snap.extents, end)
	if err := os.Truncate(s.snap.cowPath, end); err != nil {
		s.log.Printf("truncate %s through its filesystem: %v", s.snap.cowPath, err)
	}
}

// clipExtents keeps the part of extents below end (a file's byte offset).
func clipExtents(xs []cow.Extent, end int64) []cow.Extent {
	var out []cow.Extent
	for _, x := range xs {
		if x.Logical >= end {
			break
		}
		x.Length = min(x.Length, end-x.Logical)
		out = append(out, x)
	}
	return out
}

func (s *Server) mode() Mode { return s.trk.current().mode }

func (s *Server) setupSnapshot(req Request) error {
	if m := s.mode(); m != ModePassthrough {
		return fmt.Errorf("minor %d is already tracking (%s mode); destroy it first", s.cfg.Minor, m)
	}
	onVolume, err := s.checkCowPath(req.CowFile)
	if err != nil {
		return err
	}
	cache := req.CacheBytes
	if cache <= 0 {
		cache = DefaultCacheBytes
	}
	c, extents, err := s.createCow(req.CowFile, onVolume, cow.Options{
		DeviceSize: s.trk.Size, FileSize: req.FallocMiB * mib, CacheBytes: cache,
	})
	if err != nil {
		return err
	}
	abandon := func(err error) error {
		c.Close(false)
		os.Remove(req.CowFile)
		return err
	}
	if err := s.transition(ModeSnapshot, c, s.newBitmap(c, cache), extents); err != nil {
		return abandon(err)
	}
	s.snap = &snapshot{cowPath: req.CowFile, cacheBytes: cache, fallocMiB: req.FallocMiB, extents: extents}
	if extents != nil {
		s.snap.relative = s.relativeToFront(req.CowFile)
	}
	if err := s.startSnapshotDevice(); err != nil {
		s.trk.swap(ModePassthrough, nil, nil, nil)
		s.snap = nil
		return abandon(err)
	}
	s.persist()
	s.log.Printf("snapshot set up: COW file %s, seq %d, snapshot device %s", req.CowFile, c.Header().SeqID, DattoPath(s.cfg.Minor))
	return nil
}

// Reload says which COW file to resume tracking from, and how.
type Reload struct {
	Mode       Mode // ModeSnapshot or ModeIncremental
	CowFile    string
	CacheBytes int64 // 0 = DefaultCacheBytes
	FallocMiB  int64 // the size transition-to-snapshot reuses; 0 = default
	// Extents, for a COW file on the volume itself, say where it lies on
	// the device: it is opened there, without its filesystem.
	Extents []cow.Extent
	// PrevExtents are the previous COW file's, for a snapshot (see
	// snapshot.prevExtents).
	PrevExtents []cow.Extent
	// resume is set when the server that had this file died while the
	// machine kept running: a dirty snapshot is then provably intact.
	resume bool
}

// reload resumes tracking from r's COW file before the front device
// starts, so no write escapes it. An incremental file left dirty by a
// crash is recovered from its write-intent record; anything not provably
// intact is refused and left as it is.
func (s *Server) reload(r Reload) error {
	relative := ""
	if len(r.Extents) == 0 {
		// A COW file on the volume itself is opened where it lies on the
		// device: its filesystem is not mounted yet.
		if p, ok := OnVolumeRecord(s.cfg.Minor, r.CowFile); ok {
			r.CowFile, r.Extents, r.PrevExtents, relative = p.CowFile, p.CowExtents, p.PrevCowExtents, p.CowRelative
		}
	}
	cache := r.CacheBytes
	if cache <= 0 {
		cache = DefaultCacheBytes
	}
	var c *cow.File
	switch r.Mode {
	case ModeIncremental:
		var f *cow.File
		var rec cow.Recovered
		var err error
		if len(r.Extents) > 0 {
			f, rec, err = cow.OpenOnVolume(r.CowFile, s.cfg.BlockDevice, r.Extents, s.trk.Size, cache, cow.ReloadIncremental)
		} else {
			f, rec, err = cow.Recover(r.CowFile, s.trk.Size, cache)
		}
		if err != nil {
			return err
		}
		if rec.Crashed {
			s.log.Printf("%s was not closed cleanly: replayed its write-intent record, %d regions of %d bytes, %d more blocks marked",
				r.CowFile, rec.Regions, rec.RegionBytes, rec.Marked)
		}
		if err := f.EnableIntent(); err != nil {
			f.Close(false)
			return err
		}
		c = f
	case ModeSnapshot:
		var f *cow.File
		var err error
		switch {
		case len(r.Extents) > 0:
			how := cow.ReloadSnapshot
			if r.resume {
				how = cow.ResumeSnapshot
			}
			f, _, err = cow.OpenOnVolume(r.CowFile, s.cfg.BlockDevice, r.Extents, s.trk.Size, cache, how)
		case r.resume:
			f, err = cow.RecoverSnapshot(r.CowFile, s.trk.Size, cache)
		default:
			f, err = cow.OpenSnapshot(r.CowFile, s.trk.Size, cache)
		}
		if err != nil {
			return err
		}
		c = f
	default:
		return fmt.Errorf("cannot reload in %s mode", r.Mode)
	}
	var extents []cow.Extent
	if r.Mode == ModeSnapshot {
		// the snapshot device shows them as zeros
		extents = append(append([]cow.Extent(nil), r.Extents...), r.PrevExtents...)
	}
	if err := s.trk.swap(r.Mode, c, s.newBitmap(c, cache), extents); err != nil {
		c.Close(false)
		return err
	}
	s.snap = &snapshot{cowPath: r.CowFile, cacheBytes: cache, fallocMiB: r.FallocMiB, extents: r.Extents, relative: relative}
	if r.Mode == ModeSnapshot {
		s.snap.prevExtents = r.PrevExtents
	}
	h := c.Header()
	s.log.Printf("reloaded %s mode from %s: seq %d, %d changed blocks", r.Mode, r.CowFile, h.SeqID, c.NrChangedBlocks())
	return nil
}

func (s *Server) transitionToIncremental() error {
	st := s.trk.current()
	if st.mode != ModeSnapshot {
		return fmt.Errorf("minor %d is not in snapshot mode (it is %s)", s.cfg.Minor, st.mode)
	}
	if errno := s.trk.Failed(); errno != 0 {
		return fmt.Errorf("minor %d has failed (%v); destroy it and set up a new snapshot", s.cfg.Minor, errno)
	}
	if err := s.snapshotDeviceIdle(); err != nil {
		return err
	}
	if err := s.transition(ModeIncremental, st.cow, s.newBitmap(st.cow, s.snap.cacheBytes), nil); err != nil {
		return err
	}
	s.stopSnapshotDevice()
	prev := s.snap.prevExtents
	s.snap.prevExtents = nil
	s.trk.autoExpand.stepBytes, s.trk.autoExpand.reserveBytes = 0, 0
	if err := st.cow.TruncateToIndex(); err != nil {
		s.log.Printf("truncate %s to its index: %v", s.snap.cowPath, err)
	} else if st.cow.Mapped() {
		s.releaseStore(st.cow)
	}
	// The previous COW file's index leaves the snapshot's zeroed blocks
	// at the next snapshot, showing what the server wrote there: it is a
	// change, recorded like one.
	for _, x := range prev {
		first := uint64(x.Physical) / cow.BlockSize
		if _, err := st.cow.MarkRange(first, first+uint64(x.Length)/cow.BlockSize); err != nil {
			s.trk.fail(syscall.EIO, fmt.Errorf("record the previous COW file's blocks as changed: %w", err))
		}
	}
	if err := st.cow.EnableIntent(); err != nil {
		s.trk.fail(syscall.EIO, fmt.Errorf("start write-intent logging in %s: %w", s.snap.cowPath, err))
	}
	s.persist()
	s.log.Printf("now incremental: tracking changes in %s", s.snap.cowPath)
	return nil
}

func (s *Server) transitionToSnapshot(req Request) error {
	st := s.trk.current()
	if st.mode != ModeIncremental {
		return fmt.Errorf("minor %d is not in incremental mode (it is %s)", s.cfg.Minor, st.mode)
	}
	if errno := s.trk.Failed(); errno != 0 {
		return fmt.Errorf("minor %d has failed (%v); destroy it and set up a new snapshot", s.cfg.Minor, errno)
	}
	if filepath.Clean(req.CowFile) == filepath.Clean(s.snap.cowPath) {
		return fmt.Errorf("%s is the current COW file, which holds the changed-block list; give a new path", req.CowFile)
	}
	onVolume, err := s.checkCowPath(req.CowFile)
	if err != nil {
		return err
	}
	falloc := req.FallocMiB
	if falloc == 0 {
		falloc = s.snap.fallocMiB // dattobd: 0 reuses the previous size
	}
	h := st.cow.Header()
	c, extents, err := s.createCow(req.CowFile, onVolume, cow.Options{
		DeviceSize: s.trk.Size, FileSize: falloc * mib, CacheBytes: s.snap.cacheBytes,
		UUID: h.UUID, SeqID: h.SeqID + 1,
	})
	if err != nil {
		return err
	}
	prev := s.snap.extents
	if err := s.transition(ModeSnapshot, c, s.newBitmap(c, s.snap.cacheBytes), append(append([]cow.Extent(nil), extents...), prev...)); err != nil {
		c.Close(false)
		os.Remove(req.CowFile)
		return err
	}
	old := s.snap.cowPath
	if err := s.closeCow(st.cow, true); err != nil {
		s.log.Printf("close %s clean: %v", old, err)
	}
	s.snap.cowPath, s.snap.fallocMiB, s.snap.extents, s.snap.relative = req.CowFile, falloc, extents, ""
	s.snap.prevExtents = prev
	if extents != nil {
		s.snap.relative = s.relativeToFront(req.CowFile)
	}
	if err := s.startSnapshotDevice(); err != nil {
		s.trk.fail(syscall.EIO, err)
		return fmt.Errorf("snapshot taken but its device could not start: %w", err)
	}
	s.persist()
	s.log.Printf("snapshot %d taken: COW file %s; %s holds the changes since the previous one", h.SeqID+1, req.CowFile, old)
	return nil
}

func (s *Server) destroy() error {
	st := s.trk.current()
	if st.mode == ModePassthrough {
		return fmt.Errorf("minor %d is not tracking", s.cfg.Minor)
	}
	if err := s.snapshotDeviceIdle(); err != nil {
		return err
	}
	s.stopSnapshotDevice()
	if err := s.trk.swap(ModePassthrough, nil, nil, nil); err != nil {
		return err
	}
	st.cow.Close(false)
	if err := os.Remove(s.snap.cowPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		s.log.Printf("remove %s: %v", s.snap.cowPath, err)
	}
	s.trk.failed.Store(0)
	s.trk.autoExpand.stepBytes, s.trk.autoExpand.reserveBytes = 0, 0
	s.log.Printf("tracking destroyed; %s removed", s.snap.cowPath)
	s.snap = nil
	s.persist()
	return nil
}

func (s *Server) reconfigure(req Request) error {
	if req.CacheBytes <= 0 {
		return errors.New("cache size must be a positive number of bytes")
	}
	st := s.trk.current()
	if st.mode == ModePassthrough {
		return fmt.Errorf("minor %d is not tracking", s.cfg.Minor)
	}
	st.cow.SetCacheLimit(req.CacheBytes)
	s.snap.cacheBytes = req.CacheBytes
	return nil
}

func (s *Server) expandCowFile(req Request) error {
	st := s.trk.current()
	if st.mode != ModeSnapshot {
		return fmt.Errorf("minor %d is not in snapshot mode (it is %s)", s.cfg.Minor, st.mode)
	}
	if req.SizeMiB <= 0 {
		return errors.New("expansion size must be a positive number of MiB")
	}
	if errno := s.trk.Failed(); errno != 0 {
		return fmt.Errorf("minor %d has failed (%v); expanding cannot repair it", s.cfg.Minor, errno)
	}
	s.trk.expandMu.Lock()
	defer s.trk.expandMu.Unlock()
	return st.cow.Expand(req.SizeMiB * mib)
}

func (s *Server) reconfigureAutoExpand(req Request) error {
	st := s.trk.current()
	if st.mode != ModeSnapshot {
		return fmt.Errorf("minor %d is not in snapshot mode (it is %s)", s.cfg.Minor, st.mode)
	}
	if req.SizeMiB < 0 || req.ReserveMiB < 0 {
		return errors.New("step and reserve must not be negative")
	}
	s.trk.expandMu.Lock()
	defer s.trk.expandMu.Unlock()
	s.trk.autoExpand.stepBytes, s.trk.autoExpand.reserveBytes = req.SizeMiB*mib, req.ReserveMiB*mib
	return nil
}

// transition swaps the tracking state at one instant, with the filesystem
// on the front device (if any) frozen around it, so the snapshot is a
// clean filesystem.
func (s *Server) transition(mode Mode, c *cow.File, bits *bitmap.Bitmap, extents []cow.Extent) error {
	thaw, err := s.freeze()
	if err != nil {
		return err
	}
	err = s.trk.swap(mode, c, bits, extents)
	thaw()
	return err
}

// freeze freezes the filesystem mounted on the front device; with none
// mounted there is nothing to quiesce.
func (s *Server) freeze() (thaw func(), err error) {
	var st unix.Stat_t
	if err := unix.Stat(s.FrontPath(), &st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", s.FrontPath(), err)
	}
	mnt := MountPoint(uint64(st.Rdev))
	if mnt == "" {
		return func() {}, nil
	}
	fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s to freeze it: %w", mnt, err)
	}
	if err := unix.IoctlSetInt(fd, ioctlFIFREEZE, 0); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("freeze %s: %w", mnt, err)
	}
	return func() {
		if err := unix.IoctlSetInt(fd, ioctlFITHAW, 0); err != nil {
			s.log.Printf("thaw %s: %v", mnt, err)
		}
		unix.Close(fd)
	}, nil
}

// checkCowPath refuses a COW path that cannot work, before anything
// changes. It reports whether the path is on the filesystem mounted from
// the front device itself (dattobd's default layout, see cow/mapped.go).
func (s *Server) checkCowPath(path string) (onVolume bool, err error) {
	if path == "" {
		return false, errors.New("COW file path is empty")
	}
	if !filepath.IsAbs(path) {
		return false, fmt.Errorf("COW file path %s must be absolute", path)
	}
	dir := filepath.Dir(path)
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, fmt.Errorf("directory %s of the COW file does not exist", dir)
		}
		return false, fmt.Errorf("COW file directory %s: %w", dir, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return false, fmt.Errorf("%s is not a directory", dir)
	}
	if _, err := os.Lstat(path); err == nil {
		return false, fmt.Errorf("COW file %s already exists; give a new path", path)
	}
	if st.Dev == s.trk.Rdev {
		return false, fmt.Errorf("COW file %s is on the tracked device %s itself", path, s.cfg.BlockDevice)
	}
	var front unix.Stat_t
	if err := unix.Stat(s.FrontPath(), &front); err == nil && st.Dev == front.Rdev {
		return true, nil
	}
	if onPartitionOf(uint64(st.Dev), s.cfg.Minor) {
		return false, fmt.Errorf("COW file %s is on a partition of %s; put it on the filesystem of the whole device or on another one", path, s.FrontPath())
	}
	return false, nil
}

// onPartitionOf reports whether dev is a partition of /dev/ublkb<minor>.
func onPartitionOf(dev uint64, minor int) bool {
	target, err := os.Readlink(fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(dev), unix.Minor(dev)))
	return err == nil && strings.Contains(target, fmt.Sprintf("/ublkb%d/", minor))
}

// createCow creates a COW file, on the volume itself or elsewhere.
func (s *Server) createCow(path string, onVolume bool, opt cow.Options) (*cow.File, []cow.Extent, error) {
	if onVolume {
		c, extents, err := cow.CreateOnVolume(path, s.cfg.BlockDevice, opt)
		if err == nil {
			s.log.Printf("COW file %s is on the snapshotted volume: %d extents, written at their places on %s", path, len(extents), s.cfg.BlockDevice)
		}
		return c, extents, err
	}
	c, err := cow.Create(path, opt)
	return c, nil, err
}

// closeCow closes a COW file clean (or not) and, for one on the volume,
// drops its cached pages so readers through the filesystem (update-img)
// see what was written at its extents.
func (s *Server) closeCow(c *cow.File, clean bool) error {
	err := c.Close(clean)
	if c.Mapped() {
		cow.DropCache(c.Path())
	}
	return err
}

// newBitmap returns a fast filter in front of the COW index (blocks known
// preserved in snapshot mode, known recorded in incremental mode), or nil
// when its memory would not fit a quarter of the cache budget (the COW
// index, which is bounded by the cache, is then the only record).
func (s *Server) newBitmap(c *cow.File, cacheBytes int64) *bitmap.Bitmap {
	if bitmap.BytesFor(c.Blocks()) > uint64(cacheBytes/4) {
		return nil
	}
	return bitmap.New(c.Blocks())
}

func (s *Server) startSnapshotDevice() error {
	st := s.trk.current()
	spec := ublk.DeviceSpec{
		ID:                snapshotIDBase + s.cfg.Minor,
		Queues:            s.cfg.Queues,
		Depth:             64,
		MaxIOBytes:        s.cfg.MaxIOBytes,
		Size:              s.trk.Size,
		LogicalBlockSize:  s.trk.LogicalBlockSize,
		PhysicalBlockSize: s.trk.PhysicalBlockSize,
		ReadOnly:          true,
	}
	dev, err := ublk.Create(s.ctrl, spec, &snapView{t: s.trk, st: st}, s.log.Printf)
	if err != nil {
		return fmt.Errorf("create snapshot device: %w", err)
	}
	if err := dev.Start(); err != nil {
		dev.Stop()
		dev.Delete()
		return fmt.Errorf("start snapshot device: %w", err)
	}
	s.snap.dev = dev
	link := DattoPath(s.cfg.Minor)
	os.Remove(link)
	if err := os.Symlink(dev.BlockPath(), link); err != nil {
		s.log.Printf("symlink %s: %v", link, err)
	}
	return nil
}

// snapshotDeviceIdle refuses while someone has the snapshot device open:
// tearing it down would fail their reads.
func (s *Server) snapshotDeviceIdle() error {
	if s.snap == nil || s.snap.dev == nil {
		return nil
	}
	fd, err := unix.Open(s.snap.dev.BlockPath(), unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("snapshot device %s is in use (mounted or open); unmount or close it first", DattoPath(s.cfg.Minor))
		}
		return nil
	}
	unix.Close(fd)
	return nil
}

func (s *Server) stopSnapshotDevice() {
	if s.snap == nil || s.snap.dev == nil {
		return
	}
	if err := s.snap.dev.Stop(); err != nil {
		s.log.Printf("stop snapshot device: %v", err)
	}
	if err := s.snap.dev.Delete(); err != nil {
		s.log.Printf("delete snapshot device: %v", err)
	}
	s.snap.dev = nil
	os.Remove(DattoPath(s.cfg.Minor))
}

// fillTrackingInfo adds dattobd's per-device fields.
func (s *Server) fillTrackingInfo(d *DeviceInfo) {
	st := s.trk.current()
	d.Mode = st.mode.String()
	if st.mode == ModePassthrough || s.snap == nil {
		d.State = StateAttached
		return
	}
	h := st.cow.Header()
	d.CowFile = s.snap.cowPath
	d.MaxCache = s.snap.cacheBytes
	d.Fallocate = s.snap.fallocMiB * mib
	d.CowSizeCurrent = int64(h.FSize)
	d.SeqID = h.SeqID
	d.UUID = hex.EncodeToString(h.UUID[:])
	d.Version = h.Version
	d.NrChangedBlocks = st.cow.NrChangedBlocks()
	d.CacheInUse = st.cow.CacheBytes()
	d.Error = -int(s.trk.Failed())
	if st.mode == ModeSnapshot {
		d.State = stateActiveSnapshot
		if s.snap.dev != nil {
			d.SnapshotDevice = DattoPath(s.cfg.Minor)
		}
		if step := s.trk.autoExpand.stepBytes; step > 0 {
			d.AutoExpand = &struct {
				StepSizeMiB      int64 `json:"step_size_mib"`
				ReservedSpaceMiB int64 `json:"reserved_space_mib"`
			}{step / mib, s.trk.autoExpand.reserveBytes / mib}
		}
	} else {
		d.State = stateActiveIncremental
	}
}

package ublk

import (
	"errors"
	"fmt"
	"math/bits"
	"os"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// DeviceSpec describes a device to create. It is plain data, checked by
// Validate without a kernel.
type DeviceSpec struct {
	ID                int          // device id = minor of /dev/ublkbN; -1 lets the kernel choose
	Queues            int          // hardware queues (the kernel clamps to the CPU count)
	Depth             int          // tags per queue
	MaxIOBytes        int          // largest request; also each tag's buffer size
	Size              int64        // bytes
	LogicalBlockSize  int          // 512..4096
	PhysicalBlockSize int          // >= logical
	ReadOnly          bool         // the block device is read-only
	Flags             uapi.Feature // extra UBLK_F_* flags, e.g. FeatUserRecovery
	// DiscardGranularity, when non-zero, advertises DISCARD with this
	// granularity in bytes (the backend must handle it).
	DiscardGranularity int
	// WriteZeroes advertises WRITE_ZEROES (the backend must handle it).
	WriteZeroes bool
	// VolatileCache advertises a write-back cache, so the kernel sends FLUSH
	// and FUA (the backend must make them durable).
	VolatileCache bool
	// DMAAlignment, when non-zero, is the memory alignment (a mask, e.g.
	// 511) the device asks of a request's buffers, as the device it serves
	// does. Zero keeps ublk's own, 4 bytes: with zero copy, a request's
	// pages go to the backend's O_DIRECT I/O as they are, and a backend
	// that needs more refuses them only once the request is on the way,
	// as an I/O error, where the real device would have refused the
	// O_DIRECT call itself. Kernels before 6.15 ignore it.
	DMAAlignment int
}

// Defaults used by Validate for zero fields.
const (
	DefaultQueues     = 2
	DefaultDepth      = 128
	DefaultMaxIOBytes = 1 << 20
)

// A smaller shape for copy mode, for servers that bound their memory. In
// copy mode each tag owns a buffer of MaxIOBytes that the kernel copies
// through, resident once requests have cycled through the tags (the
// kernel hands tags out in turn), so Queues x Depth x MaxIOBytes is the
// server's buffer memory: 2 x 64 x 256 KiB = 32 MiB, against 256 MiB with
// the defaults. The kernel splits larger requests. Zero copy has no
// buffers and needs no smaller shape.
const (
	CopyDepth      = 64
	CopyMaxIOBytes = 256 << 10
)

// Validate fills defaults and rejects impossible specs.
func (s *DeviceSpec) Validate() error {
	if s.Queues == 0 {
		s.Queues = DefaultQueues
	}
	if s.Depth == 0 {
		s.Depth = DefaultDepth
	}
	if s.MaxIOBytes == 0 {
		s.MaxIOBytes = DefaultMaxIOBytes
	}
	if s.LogicalBlockSize == 0 {
		s.LogicalBlockSize = 512
	}
	if s.PhysicalBlockSize == 0 {
		s.PhysicalBlockSize = s.LogicalBlockSize
	}
	page := os.Getpagesize()
	switch {
	case s.ID < -1 || s.ID > uapi.MaxDevID:
		return fmt.Errorf("device id %d out of range 0..%d", s.ID, uapi.MaxDevID)
	case s.Queues < 1 || s.Queues > 64:
		return fmt.Errorf("queue count %d out of range 1..64", s.Queues)
	case s.Depth < 1 || s.Depth > uapi.MaxQueueDepth:
		return fmt.Errorf("queue depth %d out of range 1..%d", s.Depth, uapi.MaxQueueDepth)
	case s.MaxIOBytes < page || s.MaxIOBytes%page != 0 || s.MaxIOBytes > 32<<20:
		return fmt.Errorf("max I/O size %d must be a multiple of %d up to 32 MiB", s.MaxIOBytes, page)
	case !validBlockSize(s.LogicalBlockSize, page):
		return fmt.Errorf("logical block size %d must be a power of two in 512..%d", s.LogicalBlockSize, page)
	case !validBlockSize(s.PhysicalBlockSize, 1<<20) || s.PhysicalBlockSize < s.LogicalBlockSize:
		return fmt.Errorf("physical block size %d must be a power of two >= logical block size %d",
			s.PhysicalBlockSize, s.LogicalBlockSize)
	case s.Size <= 0 || s.Size%int64(s.LogicalBlockSize) != 0:
		return fmt.Errorf("size %d must be a positive multiple of the logical block size %d", s.Size, s.LogicalBlockSize)
	case s.DMAAlignment < 0 || s.DMAAlignment >= page || s.DMAAlignment&(s.DMAAlignment+1) != 0:
		return fmt.Errorf("DMA alignment mask %d must be one less than a power of two below %d", s.DMAAlignment, page)
	}
	return nil
}

func validBlockSize(n, max int) bool { return n >= 512 && n <= max && n&(n-1) == 0 }

func shift(n int) uint8 { return uint8(bits.TrailingZeros(uint(n))) }

// params builds ublk_params for the spec.
func (s *DeviceSpec) params() uapi.Params {
	var p uapi.Params
	p.Types = uapi.ParamTypeBasic
	p.Basic = uapi.ParamBasic{
		LogicalBSShift:  shift(s.LogicalBlockSize),
		PhysicalBSShift: shift(s.PhysicalBlockSize),
		IOOptShift:      shift(s.PhysicalBlockSize),
		IOMinShift:      shift(s.PhysicalBlockSize),
		MaxSectors:      uint32(s.MaxIOBytes >> 9),
		DevSectors:      uint64(s.Size >> 9),
	}
	if s.ReadOnly {
		p.Basic.Attrs |= uapi.AttrReadOnly
	}
	if s.DMAAlignment > 0 {
		p.Types |= uapi.ParamTypeDMA
		p.DMA.Alignment = uint32(s.DMAAlignment)
	}
	if s.VolatileCache {
		p.Basic.Attrs |= uapi.AttrVolatileCache | uapi.AttrFUA
	}
	if s.DiscardGranularity > 0 || s.WriteZeroes {
		const maxOp = (1 << 30) >> 9 // bound a single discard/zero request to 1 GiB
		p.Types |= uapi.ParamTypeDiscard
		g := s.DiscardGranularity
		if g == 0 {
			g = s.PhysicalBlockSize
		}
		p.Discard.DiscardGranularity = uint32(g)
		if s.DiscardGranularity > 0 {
			p.Discard.MaxDiscardSectors = maxOp
			p.Discard.MaxDiscardSegments = 1
		}
		if s.WriteZeroes {
			p.Discard.MaxWriteZeroesSectors = maxOp
		}
	}
	return p
}

// Device is a ublk device this process created and serves.
type Device struct {
	ctrl    *Control
	spec    DeviceSpec
	info    uapi.CtrlDevInfo
	charFd  int
	backend Backend
	queues  []*queue
	logf    func(string, ...any)

	// finished is closed when every queue thread has ended; queueErr is the
	// first error one of them reported.
	finished chan struct{}
	queueErr error

	stopOnce sync.Once
	stopErr  error

	// recovering makes Start finish with END_USER_RECOVERY instead of
	// START_DEV: the device already exists and its users are waiting.
	recovering bool
}

// Recoverable reports whether device id is waiting for a new server: its
// server died and it was created with user recovery, so the kernel holds
// its I/O (state QUIESCED) and keeps /dev/ublkb<id>.
func Recoverable(ctrl *Control, id uint32) (uapi.CtrlDevInfo, bool) {
	info, err := ctrl.DevInfo(id)
	if err != nil {
		return info, false
	}
	return info, info.State == uapi.DevQuiesced && info.Flags&uapi.FeatUserRecovery != 0
}

// recoveryWait bounds how long Recover waits for the kernel to let a new
// server in: the dead server's files must all be released first.
const recoveryWait = 30 * time.Second

// Recover takes over a device whose server died (see Recoverable): it
// starts user recovery, rebuilds the spec from the parameters the kernel
// kept and opens the char device. Start then fetches every tag and ends
// the recovery, and the held I/O flows to backend. The spec's Size and
// block sizes come from the kernel; spec must agree on what the backend
// can serve (its size is checked).
func Recover(ctrl *Control, id uint32, backendSize int64, backend Backend, logf func(string, ...any)) (*Device, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	info, ok := Recoverable(ctrl, id)
	if !ok {
		return nil, fmt.Errorf("ublk device %d is not waiting for recovery (state %v)", id, info.State)
	}
	if err := ctrl.StartUserRecovery(id, recoveryWait); err != nil {
		return nil, fmt.Errorf("start recovery of ublk device %d: %w", id, err)
	}
	p, err := ctrl.Params(id)
	if err != nil {
		return nil, fmt.Errorf("read parameters of ublk device %d: %w", id, err)
	}
	spec := DeviceSpec{
		ID:                int(id),
		Queues:            int(info.NrHWQueues),
		Depth:             int(info.QueueDepth),
		MaxIOBytes:        int(info.MaxIOBufBytes),
		Size:              int64(p.Basic.DevSectors) << 9,
		LogicalBlockSize:  1 << p.Basic.LogicalBSShift,
		PhysicalBlockSize: 1 << p.Basic.PhysicalBSShift,
		ReadOnly:          p.Basic.Attrs&uapi.AttrReadOnly != 0,
		Flags:             info.Flags,
		VolatileCache:     p.Basic.Attrs&uapi.AttrVolatileCache != 0,
	}
	if p.Types&uapi.ParamTypeDMA != 0 {
		spec.DMAAlignment = int(p.DMA.Alignment)
	}
	if spec.Size != backendSize {
		return nil, fmt.Errorf("ublk device %d has %d bytes, the device to serve has %d", id, spec.Size, backendSize)
	}
	d := &Device{ctrl: ctrl, spec: spec, info: info, charFd: -1, backend: backend, logf: logf, recovering: true}
	if d.charFd, err = openRetry(d.CharPath()); err != nil {
		return nil, err
	}
	return d, nil
}

// DataPath is how request data moves between the kernel and the backend.
type DataPath string

const (
	// Copy: the kernel copies each request's data into a per-tag server
	// buffer (writes) or out of it (reads); the file I/O uses that buffer.
	Copy DataPath = "copy"
	// ZeroCopy: the kernel lends each request's own pages to the queue's
	// ring (UBLK_F_AUTO_BUF_REG, Linux >= 6.16) and the file I/O reads and
	// writes them in place; the server holds no data buffers.
	ZeroCopy DataPath = "zero-copy"
)

// ZeroCopyFlags are the flags a spec asks for to be served zero copy; the
// kernel grants them only if its GET_FEATURES answer has them (see
// ZeroCopyOffered), and the device then reports ZeroCopy.
const ZeroCopyFlags = uapi.FeatSupportZeroCopy | uapi.FeatAutoBufReg

// ZeroCopyOffered reports whether a kernel with these GET_FEATURES bits
// can serve a device zero copy.
func ZeroCopyOffered(kernel uapi.Feature) bool { return kernel&ZeroCopyFlags == ZeroCopyFlags }

// DataPath reports the data path the kernel granted.
func (d *Device) DataPath() DataPath {
	if d.info.Flags&uapi.FeatAutoBufReg != 0 {
		return ZeroCopy
	}
	return Copy
}

// Create adds a device, opens its char device and sets its parameters. The
// backend serves its I/O once Start is called. Only the creator deletes the
// device; on any error here nothing is left behind.
func Create(ctrl *Control, spec DeviceSpec, backend Backend, logf func(string, ...any)) (*Device, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	_, finishes := backend.(ReadFinisher)
	_, patches := backend.(ReadPatcher)
	if finishes && !patches && spec.Flags&uapi.FeatAutoBufReg != 0 {
		// Its reads are rewritten in server memory, which zero copy has not.
		return nil, errors.New("a backend that finishes reads but cannot patch them is served in copy mode only")
	}
	if logf == nil {
		logf = func(string, ...any) {}
	}
	id := uint32(uapi.NewDevID)
	if spec.ID >= 0 {
		id = uint32(spec.ID)
	}
	info, err := ctrl.Add(uapi.CtrlDevInfo{
		NrHWQueues:    uint16(spec.Queues),
		QueueDepth:    uint16(spec.Depth),
		MaxIOBufBytes: uint32(spec.MaxIOBytes),
		DevID:         id,
		UblksrvPID:    -1,
		Flags:         spec.Flags,
	})
	if err != nil {
		return nil, err
	}
	d := &Device{ctrl: ctrl, spec: spec, info: info, charFd: -1, backend: backend, logf: logf}
	fail := func(err error) (*Device, error) {
		d.closeChar()
		if derr := ctrl.Delete(info.DevID); derr != nil {
			logf("delete device %d after failed setup: %v", info.DevID, derr)
		}
		return nil, err
	}
	if d.charFd, err = openRetry(d.CharPath()); err != nil {
		return fail(err)
	}
	// The kernel may have page-rounded the buffer size; trust its value.
	if int(info.MaxIOBufBytes) < d.spec.MaxIOBytes {
		d.spec.MaxIOBytes = int(info.MaxIOBufBytes)
	}
	if err := ctrl.SetParams(info.DevID, d.spec.params()); err != nil {
		return fail(err)
	}
	return d, nil
}

// openRetry opens a char device node that devtmpfs may still be creating
// (it waits up to nodeWait).
func openRetry(path string) (int, error) {
	deadline := time.Now().Add(nodeWait)
	for {
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err == nil {
			return fd, nil
		}
		if !errors.Is(err, unix.ENOENT) || time.Now().After(deadline) {
			return -1, fmt.Errorf("open %s: %w", path, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// ID is the device id (the N of /dev/ublkbN).
func (d *Device) ID() uint32 { return d.info.DevID }

// BlockPath is the block device users read and write.
func (d *Device) BlockPath() string { return uapi.BlockPath(d.info.DevID) }

// CharPath is the server's command channel.
func (d *Device) CharPath() string { return uapi.CharPath(d.info.DevID) }

// Info is the negotiated device info (queues, depth, flags).
func (d *Device) Info() uapi.CtrlDevInfo { return d.info }

// Spec is the effective spec after negotiation.
func (d *Device) Spec() DeviceSpec { return d.spec }

// Start launches one locked thread per queue, waits until each has fetched
// its tags, then sends START_DEV (or ends a recovery). When it returns,
// BlockPath exists.
func (d *Device) Start() error {
	if err := d.startQueues(); err != nil {
		// Queues that did start hold their tags; closing the char device
		// and deleting the device aborts them.
		return err
	}
	if d.recovering {
		if err := d.ctrl.EndUserRecovery(d.info.DevID, os.Getpid()); err != nil {
			return fmt.Errorf("end recovery of ublk device %d: %w", d.info.DevID, err)
		}
		d.recovering = false
		return nil
	}
	if err := d.ctrl.Start(d.info.DevID, os.Getpid()); err != nil {
		return err
	}
	waitForNode(d.BlockPath())
	return nil
}

// startQueues runs one thread per queue and waits until each has fetched
// its tags (or failed to set up).
func (d *Device) startQueues() error {
	nq := int(d.info.NrHWQueues)
	// Each blocked queue thread releases its P, but each needs one to run.
	if runtime.GOMAXPROCS(0) < nq+2 {
		runtime.GOMAXPROCS(nq + 2)
	}
	ready := make(chan error, nq)
	done := make(chan error, nq)
	d.finished = make(chan struct{})
	for i := 0; i < nq; i++ {
		q := newQueue(i, int(d.info.QueueDepth), d.spec.MaxIOBytes, d.charFd, d.DataPath() == ZeroCopy, d.backend, d.logf)
		d.queues = append(d.queues, q)
		go q.run(ready, done)
	}
	go func() {
		for i := 0; i < nq; i++ {
			if err := <-done; err != nil && d.queueErr == nil {
				d.queueErr = err
			}
		}
		close(d.finished)
	}()
	var firstErr error
	for i := 0; i < nq; i++ {
		if err := <-ready; err != nil && firstErr == nil {
			firstErr = err
		}
	}
	return firstErr
}

// nodeWait bounds how long the device waits for devtmpfs to create a node
// (the char device after ADD_DEV, the block device after START_DEV).
const nodeWait = 2 * time.Second

// waitForNode waits until path exists; a node that devtmpfs is slow to
// create is not an error of the device (its users will find it later).
func waitForNode(path string) {
	for deadline := time.Now().Add(nodeWait); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return
		}
	}
}

// Stop removes the block device: the kernel writes back dirty pages and
// drains in-flight requests through the still-serving queues, then aborts
// every tag, and Stop returns once all queue threads have finished.
func (d *Device) Stop() error {
	d.stopOnce.Do(func() {
		if err := d.ctrl.Stop(d.info.DevID); err != nil {
			d.stopErr = err
			return
		}
		if d.finished != nil {
			<-d.finished
			d.stopErr = d.queueErr
		}
	})
	return d.stopErr
}

// Finished is closed once every queue thread has ended, whether through
// Stop or because the device was stopped from outside.
func (d *Device) Finished() <-chan struct{} { return d.finished }

// Delete frees the device id. Stop first; Delete closes the char device
// itself, since the kernel waits for that reference to go.
func (d *Device) Delete() error {
	d.closeChar()
	return d.ctrl.Delete(d.info.DevID)
}

func (d *Device) closeChar() {
	if d.charFd >= 0 {
		unix.Close(d.charFd)
		d.charFd = -1
	}
}

// Stats sums the per-queue counters.
func (d *Device) Stats() QueueStats {
	var t QueueStats
	for _, q := range d.queues {
		s := q.stats.snapshot()
		t.Reads += s.Reads
		t.Writes += s.Writes
		t.Flushes += s.Flushes
		t.Discards += s.Discards
		t.WriteZeroes += s.WriteZeroes
		t.Errors += s.Errors
		t.BytesRead += s.BytesRead
		t.BytesWritten += s.BytesWritten
		t.StageWritesMerged += s.StageWritesMerged
	}
	return t
}

package ublk

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/ublk/uapi"
	"github.com/dbdublk/dbdublk/ublk/uring"
)

// ControlPath is the ublk driver's control device.
const ControlPath = "/dev/ublk-control"

// ErrNoUblk means the running kernel offers no ublk driver.
var ErrNoUblk = errors.New("ublk is not available: " + ControlPath +
	" is missing; load the ublk_drv module (modprobe ublk_drv; Linux >= 6.4 required)")

// Control sends control commands to /dev/ublk-control. Commands may block in
// the kernel for a long time (START_DEV waits for every queue's FETCHes), so a
// Control is never used from a queue thread. It is safe for concurrent use:
// commands are serialised.
type Control struct {
	mu   sync.Mutex
	fd   int
	ring *uring.Ring
	// buf is an off-heap page the kernel reads and writes asynchronously
	// while a command is in flight (Go heap memory may move).
	buf []byte
}

// OpenControl opens the control device and its SQE128 ring.
func OpenControl() (*Control, error) {
	fd, err := unix.Open(ControlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENXIO) {
			return nil, ErrNoUblk
		}
		return nil, fmt.Errorf("open %s: %w", ControlPath, err)
	}
	ring, err := uring.New(uring.Options{Entries: 4, Flags: uapi.SetupSQE128})
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("control ring: %w", err)
	}
	buf, err := unix.Mmap(-1, 0, os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		ring.Close()
		unix.Close(fd)
		return nil, fmt.Errorf("control buffer: %w", err)
	}
	return &Control{fd: fd, ring: ring, buf: buf}, nil
}

// Close releases the control device.
func (c *Control) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd < 0 {
		return nil
	}
	c.ring.Close()
	unix.Munmap(c.buf)
	err := unix.Close(c.fd)
	c.fd = -1
	return err
}

// CtrlError is a control command the kernel refused.
type CtrlError struct {
	Op    uapi.CtrlOp
	DevID uint32
	Errno unix.Errno
}

func (e *CtrlError) Error() string {
	if e.DevID == uapi.NewDevID {
		return fmt.Sprintf("ublk %s: %v", e.Op, e.Errno)
	}
	return fmt.Sprintf("ublk %s dev %d: %v", e.Op, e.DevID, e.Errno)
}

func (e *CtrlError) Unwrap() error { return e.Errno }

// cmd sends one control command and waits for its result. in is copied into
// the off-heap buffer before the command and the buffer's first outLen bytes
// are returned after it.
func (c *Control) cmd(op uapi.CtrlOp, devID uint32, data uint64, in []byte, bufLen int) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd < 0 {
		return nil, errors.New("ublk control is closed")
	}
	clear(c.buf)
	copy(c.buf, in)
	sqe := c.ring.NextSQE()
	if sqe == nil {
		return nil, errors.New("ublk control ring full")
	}
	uring.PrepURingCmd(sqe, int32(c.fd), uint32(op))
	sqe.UserData = uint64(op)
	cmd := (*uapi.CtrlCmd)(unsafe.Pointer(&uring.CmdArea(sqe, true)[0]))
	*cmd = uapi.CtrlCmd{DevID: devID, QueueID: uapi.AnyQueue, Data: data}
	if bufLen > 0 {
		cmd.Len = uint16(bufLen)
		cmd.Addr = uint64(uintptr(unsafe.Pointer(&c.buf[0])))
	}
	if _, err := c.ring.SubmitAndWait(1); err != nil {
		return nil, fmt.Errorf("ublk %s: submit: %w", op, err)
	}
	var cqe [1]uapi.CQE
	for c.ring.ReapCQEs(cqe[:]) == 0 {
		if _, err := c.ring.SubmitAndWait(1); err != nil {
			return nil, fmt.Errorf("ublk %s: wait: %w", op, err)
		}
	}
	if cqe[0].Res < 0 {
		return nil, &CtrlError{Op: op, DevID: devID, Errno: unix.Errno(-cqe[0].Res)}
	}
	out := make([]byte, bufLen)
	copy(out, c.buf[:bufLen])
	return out, nil
}

// Features returns the driver's UBLK_F_* set (GET_FEATURES, Linux >= 6.5).
// Older kernels answer EINVAL or EOPNOTSUPP.
func (c *Control) Features() (uapi.Feature, error) {
	out, err := c.cmd(uapi.CmdGetFeatures, 0, 0, nil, 8)
	if err != nil {
		return 0, err
	}
	return *(*uapi.Feature)(unsafe.Pointer(&out[0])), nil
}

// DevInfo returns the kernel's view of device id.
func (c *Control) DevInfo(id uint32) (uapi.CtrlDevInfo, error) {
	out, err := c.cmd(uapi.CmdGetDevInfo, id, 0, nil, int(unsafe.Sizeof(uapi.CtrlDevInfo{})))
	if err != nil {
		return uapi.CtrlDevInfo{}, err
	}
	return *(*uapi.CtrlDevInfo)(unsafe.Pointer(&out[0])), nil
}

// Add creates a device (ADD_DEV). The returned info is the negotiated one:
// the kernel clamps the queue count and drops flags it does not know.
func (c *Control) Add(info uapi.CtrlDevInfo) (uapi.CtrlDevInfo, error) {
	in := unsafe.Slice((*byte)(unsafe.Pointer(&info)), unsafe.Sizeof(info))
	out, err := c.cmd(uapi.CmdAddDev, info.DevID, 0, in, len(in))
	if err != nil {
		return uapi.CtrlDevInfo{}, err
	}
	return *(*uapi.CtrlDevInfo)(unsafe.Pointer(&out[0])), nil
}

// SetParams sends the device parameters; allowed only before START_DEV.
func (c *Control) SetParams(id uint32, p uapi.Params) error {
	p.Len = uint32(unsafe.Sizeof(p))
	in := unsafe.Slice((*byte)(unsafe.Pointer(&p)), unsafe.Sizeof(p))
	_, err := c.cmd(uapi.CmdSetParams, id, 0, in, len(in))
	return err
}

// Params reads the device parameters back (GET_PARAMS).
func (c *Control) Params(id uint32) (uapi.Params, error) {
	var p uapi.Params
	p.Len = uint32(unsafe.Sizeof(p))
	in := unsafe.Slice((*byte)(unsafe.Pointer(&p)), unsafe.Sizeof(p))
	out, err := c.cmd(uapi.CmdGetParams, id, 0, in, len(in))
	if err != nil {
		return p, err
	}
	return *(*uapi.Params)(unsafe.Pointer(&out[0])), nil
}

// Start makes the block device appear (START_DEV). It blocks until every
// queue has fetched every tag, then the kernel scans partitions, which the
// queues must serve.
func (c *Control) Start(id uint32, pid int) error {
	_, err := c.cmd(uapi.CmdStartDev, id, uint64(pid), nil, 0)
	return err
}

// Stop removes the block device (STOP_DEV): dirty data is written back and
// in-flight I/O drained, so the queues must keep serving until they see
// ABORT.
func (c *Control) Stop(id uint32) error {
	_, err := c.cmd(uapi.CmdStopDev, id, 0, nil, 0)
	return err
}

// Delete frees the device id (DEL_DEV). It waits until every reference is
// gone: the char device fd, descriptor mappings and block device openers.
func (c *Control) Delete(id uint32) error {
	_, err := c.cmd(uapi.CmdDelDev, id, 0, nil, 0)
	return err
}

// StartUserRecovery begins re-attaching a new server to a quiesced device.
// The kernel answers EBUSY until the old server has fully let go, so it is
// retried for up to timeout.
func (c *Control) StartUserRecovery(id uint32, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		_, err := c.cmd(uapi.CmdStartUserRecovery, id, 0, nil, 0)
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// EndUserRecovery completes recovery once the new queues have fetched.
func (c *Control) EndUserRecovery(id uint32, pid int) error {
	_, err := c.cmd(uapi.CmdEndUserRecovery, id, uint64(pid), nil, 0)
	return err
}

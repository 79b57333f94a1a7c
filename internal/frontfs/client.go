package frontfs

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/insert"
	"github.com/dbdublk/dbdublk/internal/protocol"
)

// ErrGone reports a helper that is no longer there (it exited or was
// killed): start another.
var ErrGone = errors.New("front filesystem helper is gone")

// Helper is the server's side of one helper process. Its methods may be
// called from any goroutine, one request at a time.
type Helper struct {
	mu   sync.Mutex
	cmd  *exec.Cmd
	in   io.WriteCloser
	enc  *json.Encoder
	dec  *json.Decoder
	gone bool
}

// Start runs exe with args (the server's executable and Command) as a
// helper, its errors going to stderr. argv0, if not empty, is its argv[0]
// (a boot server's helper is spared at shutdown as its server is).
func Start(exe, argv0 string, args ...string) (*Helper, error) {
	cmd := exec.Command(exe, args...)
	if argv0 != "" {
		cmd.Args[0] = argv0
	}
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		in.Close()
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the front filesystem helper: %w", err)
	}
	return &Helper{cmd: cmd, in: in, enc: json.NewEncoder(in), dec: json.NewDecoder(out)}, nil
}

// call sends req and waits for the answer. An error the helper answered
// with keeps its kind (protocol.RemoteError); a helper that is gone
// answers ErrGone.
func (h *Helper) call(req request) (response, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.gone {
		return response{}, ErrGone
	}
	var resp response
	if err := h.enc.Encode(req); err != nil {
		h.gone = true
		return resp, fmt.Errorf("%w: %v", ErrGone, err)
	}
	if err := h.dec.Decode(&resp); err != nil {
		h.gone = true
		return resp, fmt.Errorf("%w: %v", ErrGone, err)
	}
	if resp.Error != "" {
		return resp, &protocol.RemoteError{Code: resp.Code, Message: resp.Error}
	}
	return resp, nil
}

// Gone reports whether the helper has stopped answering.
func (h *Helper) Gone() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.gone
}

// Close ends the helper (it thaws what it still holds frozen) and waits
// for it.
func (h *Helper) Close() error {
	h.mu.Lock()
	h.gone = true
	h.mu.Unlock()
	h.in.Close()
	return h.cmd.Wait()
}

// FreezeError names the filesystem that could not be frozen.
type FreezeError struct {
	Point string // its mount point
	Err   error
}

func (e *FreezeError) Error() string { return fmt.Sprintf("freeze %s: %v", e.Point, e.Err) }
func (e *FreezeError) Unwrap() error { return e.Err }

// Freeze freezes the filesystems mounted at points (FIFREEZE), all or
// none: if one cannot be frozen, the others are thawed again and a
// *FreezeError names it.
func (h *Helper) Freeze(points []string) error {
	resp, err := h.call(request{Op: opFreeze, Points: points})
	if err != nil && resp.Point != "" {
		return &FreezeError{Point: resp.Point, Err: err}
	}
	return err
}

// Thaw thaws the filesystems mounted at points, whoever froze them; one
// that is not frozen is no error.
func (h *Helper) Thaw(points []string) error {
	_, err := h.call(request{Op: opThaw, Points: points})
	return err
}

// CheckCowPath refuses a new COW file path that cannot work, before
// anything changes, and reports whether it is on the filesystem mounted
// from the front device itself.
func (h *Helper) CheckCowPath(c CowPath) (onVolume bool, err error) {
	resp, err := h.call(request{Op: opCheck, Check: &c})
	return resp.OnVolume, err
}

// CreateOnVolume creates a COW file on the volume's filesystem and moves
// it onto device (cow.CreateOnVolume): the server then opens it at its
// extents on the device.
func (h *Helper) CreateOnVolume(path, device string, opt cow.Options) ([]cow.Extent, uint64, error) {
	resp, err := h.call(request{Op: opCreate, Path: path, Device: device, Options: &opt})
	return resp.Extents, resp.Inode, err
}

// Truncate shortens the COW file on the volume at path (inode ino on the
// filesystem of front device frontDev) to size through its filesystem,
// leaving it immutable.
func (h *Helper) Truncate(path string, frontDev, ino uint64, size int64) error {
	_, err := h.call(request{Op: opTruncate, Path: path, FrontDev: frontDev, Inode: ino, Size: size})
	return err
}

// Unpin gives the COW file on the volume at path back to its filesystem:
// its cached pages dropped, no longer immutable.
func (h *Helper) Unpin(path string, frontDev, ino uint64) error {
	_, err := h.call(request{Op: opUnpin, Path: path, FrontDev: frontDev, Inode: ino})
	return err
}

// Remove unpins and removes the COW file on the volume at path; one that
// is already gone is no error.
func (h *Helper) Remove(path string, frontDev, ino uint64) error {
	_, err := h.call(request{Op: opRemove, Path: path, FrontDev: frontDev, Inode: ino})
	return err
}

// RestoreVolume puts the volume of a live insertion back on its original
// table (insert.Insertion.Restore), in the helper: the suspend waits for
// I/O that the server serves.
func (h *Helper) RestoreVolume(in insert.Insertion) error {
	_, err := h.call(request{Op: opRestore, Live: &in})
	return err
}

package frontfs

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/insert"
	"github.com/dbdublk/dbdublk/internal/linux"
	"github.com/dbdublk/dbdublk/internal/protocol"
)

// Serve is the helper: it answers the server's requests from in on out,
// one at a time, until in ends (the server closed it, or died), and then
// thaws every filesystem it froze and did not thaw.
func Serve(in io.Reader, out io.Writer) error {
	// The helper ends when its server does, not on a terminal's or a
	// service manager's signal that could leave a filesystem frozen.
	signal.Ignore(unix.SIGINT, unix.SIGTERM, unix.SIGHUP)
	h := &helper{frozen: map[string]int{}}
	defer h.thawAll()
	dec, enc := json.NewDecoder(in), json.NewEncoder(out)
	for {
		var req request
		if err := dec.Decode(&req); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("front filesystem helper: %w", err)
		}
		if err := enc.Encode(h.do(req)); err != nil {
			return fmt.Errorf("front filesystem helper: %w", err)
		}
	}
}

// helper is Serve's state: the filesystems it holds frozen, by mount
// point, with the descriptor it froze each through.
type helper struct {
	frozen map[string]int
}

func (h *helper) do(req request) response {
	var resp response
	var err error
	switch req.Op {
	case opFreeze:
		resp.Point, err = h.freeze(req.Points)
	case opThaw:
		err = h.thaw(req.Points)
	case opCheck:
		if req.Check == nil {
			err = errors.New("no path to check")
			break
		}
		resp.OnVolume, err = checkCowPath(*req.Check)
	case opCreate:
		if req.Options == nil {
			err = errors.New("no options for the COW file")
			break
		}
		resp.Extents, resp.Inode, err = cow.CreateOnVolume(req.Path, req.Device, *req.Options)
	case opTruncate:
		err = withPinned(req, func(fh *os.File) error { return cow.TruncatePinned(fh, req.Size) })
	case opUnpin:
		err = withPinned(req, unpin)
	case opRemove:
		err = remove(req)
	case opRestore:
		err = restoreVolume(req.Live)
	default:
		err = fmt.Errorf("unknown request %q", req.Op)
	}
	if err != nil {
		resp.Error, resp.Code = err.Error(), protocol.CodeOf(err)
	}
	return resp
}

// freeze freezes the filesystems mounted at points, in order; if one
// cannot be, those frozen by this request are thawed again and it is
// named.
func (h *helper) freeze(points []string) (failed string, err error) {
	var done []string
	for _, p := range points {
		if err := h.freezeOne(p); err != nil {
			h.thaw(done)
			return p, err
		}
		done = append(done, p)
	}
	return "", nil
}

func (h *helper) freezeOne(point string) error {
	if _, ok := h.frozen[point]; ok {
		return nil
	}
	fd, err := unix.Open(point, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	if err := linux.Freeze(fd); err != nil {
		unix.Close(fd)
		return err
	}
	h.frozen[point] = fd
	return nil
}

// thaw thaws the filesystems mounted at points, whether this helper froze
// them or another process did (a server that died); one that is not
// frozen is left as it is.
func (h *helper) thaw(points []string) error {
	var errs []error
	for _, p := range points {
		fd, ok := h.frozen[p]
		if !ok {
			var err error
			if fd, err = unix.Open(p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err != nil {
				errs = append(errs, fmt.Errorf("thaw %s: %w", p, err))
				continue
			}
		}
		if err := linux.Thaw(fd); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("thaw %s: %w", p, err))
		}
		unix.Close(fd)
		delete(h.frozen, p)
	}
	return errors.Join(errs...)
}

func (h *helper) thawAll() {
	for p := range h.frozen {
		if err := h.thaw([]string{p}); err != nil {
			fmt.Fprintln(os.Stderr, err)
		}
	}
}

// withPinned runs fn on the COW file on the volume that req names, opened
// through its filesystem and checked to be the file the server wrote.
func withPinned(req request, fn func(*os.File) error) error {
	fh, err := cow.OpenVerified(req.Path, req.FrontDev, req.Inode)
	if err != nil {
		return err
	}
	defer fh.Close()
	return fn(fh)
}

// unpin gives a COW file on the volume back to its filesystem: its cached
// pages are dropped (readers through the filesystem see what was written
// at its extents) and it is no longer immutable.
func unpin(fh *os.File) error {
	cow.DropCache(fh)
	return cow.SetImmutable(fh, false)
}

// remove removes a COW file on the volume, given back to its filesystem
// first (it is immutable); one already gone is not an error.
func remove(req request) error {
	if err := withPinned(req, unpin); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.Remove(req.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// restoreVolume puts a device-mapper volume back on its original table,
// taking the front device out from under it (insert.Restore: its suspend
// waits for the volume's I/O through the front device).
func restoreVolume(in *insert.Insertion) error {
	if in == nil {
		return errors.New("no volume to restore")
	}
	c, err := linux.OpenDMControl()
	if err != nil {
		return err
	}
	defer c.Close()
	return in.Restore(c)
}

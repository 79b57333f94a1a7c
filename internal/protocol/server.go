package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/gofrs/flock"
	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/internal/dattobd"
)

// Handler answers one minor's requests. Each method runs on its own
// connection's goroutine; the implementation serialises what must be.
type Handler interface {
	Info() DeviceInfo
	Detach(Detach) error
	SetupSnapshot(SetupSnapshot) error
	TransitionToIncremental() error
	TransitionToSnapshot(TransitionToSnapshot) error
	Destroy() error
	Reconfigure(Reconfigure) error
	ExpandCowFile(ExpandCowFile) error
	ReconfigureAutoExpand(AutoExpand) error
	// UpdateImage copies into files[1] the blocks files[0] (a COW file)
	// marks as changed, reporting progress as it goes; the files are the
	// request's descriptors, closed once it is answered.
	UpdateImage(a UpdateImage, files []*os.File, progress func(Progress)) (UpdateImageDone, error)
}

// maxFiles is how many descriptors a request may carry.
const maxFiles = 2

// requestTimeout bounds one connection: the longest request (a snapshot
// set up on a large device, a detach that writes back a big cache) fits.
const requestTimeout = 10 * time.Minute

// Server answers requests on one minor's control socket.
type Server struct {
	ln       *net.UnixListener
	path     string
	ino      uint64       // the socket file this server made
	lock     *flock.Flock // the minor's lock, held while the server lives
	h        Handler
	handlers sync.WaitGroup // connections being answered
}

// Listen claims minor's lock and control socket (root-only): one server per
// minor. A second server for the minor, even one racing this one, is
// refused; a stale socket left by a dead server is replaced.
func Listen(m dattobd.Minor, h Handler) (*Server, error) {
	if err := os.MkdirAll(RunDir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", RunDir, err)
	}
	lock := flock.New(LockPath(m))
	locked, err := lock.TryLock()
	if err != nil {
		return nil, fmt.Errorf("minor %d: lock %s: %w", m, LockPath(m), err)
	}
	if !locked {
		return nil, fmt.Errorf("minor %d is taken: another server holds %s", m, LockPath(m))
	}
	path := SocketPath(m)
	// Holding the lock, no live server of this minor can be listening: a
	// socket file is a dead one's.
	os.Remove(path)
	old := unix.Umask(0o077)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		lock.Unlock()
		return nil, fmt.Errorf("minor %d: %w", m, err)
	}
	ln.SetUnlinkOnClose(false) // Close unlinks the socket only if it is still this one
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		ln.Close()
		lock.Unlock()
		return nil, fmt.Errorf("minor %d: %w", m, err)
	}
	return &Server{ln: ln, path: path, ino: st.Ino, lock: lock, h: h}, nil
}

// Serve answers connections until Close.
func (s *Server) Serve() {
	for {
		conn, err := s.ln.AcceptUnix()
		if err != nil {
			return
		}
		s.handlers.Add(1)
		go func() {
			defer s.handlers.Done()
			s.answer(conn)
		}()
	}
}

// Close stops accepting, removes the socket if it is still the one this
// server made, and releases the minor's lock; answers in progress go on.
func (s *Server) Close() {
	if s.ln.Close() != nil {
		return // closed already
	}
	var st unix.Stat_t
	if unix.Stat(s.path, &st) == nil && st.Ino == s.ino {
		os.Remove(s.path)
	}
	s.lock.Unlock()
}

// Drain waits up to wait for the answers in progress (so a detach's answer
// reaches its client before the process ends).
func (s *Server) Drain(wait time.Duration) {
	done := make(chan struct{})
	go func() {
		s.handlers.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(wait):
	}
}

func (s *Server) answer(conn *net.UnixConn) {
	defer conn.Close()
	enc := json.NewEncoder(conn)
	if !peerIsRoot(conn) {
		enc.Encode(response{Error: "permission denied: dbdctl must run as root"})
		return
	}
	conn.SetDeadline(time.Now().Add(requestTimeout))
	// The request's first bytes come with its descriptors, if any.
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4*maxFiles))
	n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
	files := receivedFiles(oob[:oobn])
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	var req request
	if err != nil || json.NewDecoder(io.MultiReader(bytes.NewReader(buf[:n]), conn)).Decode(&req) != nil {
		enc.Encode(response{Error: "malformed request", Code: CodeOf(ErrInvalid)})
		return
	}
	// An answer that takes long (update-img) sends progress in between;
	// each one gives the connection another requestTimeout.
	progress := func(p Progress) {
		enc.Encode(response{Progress: &p})
		conn.SetDeadline(time.Now().Add(requestTimeout))
	}
	var resp response
	if err := s.dispatch(req, files, progress, &resp); err != nil {
		resp.Error, resp.Code = err.Error(), CodeOf(err)
	}
	enc.Encode(resp)
}

// receivedFiles are the descriptors an SCM_RIGHTS message carried.
func receivedFiles(oob []byte) []*os.File {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var files []*os.File
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			unix.CloseOnExec(fd)
			files = append(files, os.NewFile(uintptr(fd), fmt.Sprintf("descriptor %d", len(files))))
		}
	}
	return files
}

// dispatch decodes req's arguments and calls the handler.
func (s *Server) dispatch(req request, files []*os.File, progress func(Progress), resp *response) error {
	switch req.Op {
	case OpInfo:
		info := s.h.Info()
		resp.Device = &info
		return nil
	case OpDetach:
		return call(req, s.h.Detach)
	case OpSetupSnapshot:
		return call(req, s.h.SetupSnapshot)
	case OpTransitionToIncremental:
		return s.h.TransitionToIncremental()
	case OpTransitionToSnapshot:
		return call(req, s.h.TransitionToSnapshot)
	case OpDestroy:
		return s.h.Destroy()
	case OpReconfigure:
		return call(req, s.h.Reconfigure)
	case OpExpandCowFile:
		return call(req, s.h.ExpandCowFile)
	case OpReconfigureAutoExpand:
		return call(req, s.h.ReconfigureAutoExpand)
	case OpUpdateImage:
		if len(files) != 2 {
			return Errorf(ErrInvalid, "update-img takes 2 descriptors (COW file, image), got %d", len(files))
		}
		return call(req, func(a UpdateImage) error {
			done, err := s.h.UpdateImage(a, files, progress)
			if err == nil {
				resp.Copied = &done
			}
			return err
		})
	}
	return Errorf(ErrInvalid, unknownRequest+" %q", req.Op)
}

// call decodes req's arguments into an A and passes them to fn.
func call[A any](req request, fn func(A) error) error {
	var args A
	if len(req.Args) > 0 {
		if err := json.Unmarshal(req.Args, &args); err != nil {
			return Errorf(ErrInvalid, "malformed arguments of %s: %v", req.Op, err)
		}
	}
	return fn(args)
}

func peerIsRoot(conn *net.UnixConn) bool {
	raw, err := conn.SyscallConn()
	if err != nil {
		return false
	}
	ok := false
	raw.Control(func(fd uintptr) {
		cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		ok = err == nil && cred.Uid == 0
	})
	return ok
}

var errNoDevice = errors.New("server sent no device info")

// Package server serves one attached block device: it fronts the real
// device as /dev/ublkb<minor> through a ublk device and answers control
// requests on a root-only Unix socket. One server process runs per attached
// device, as the C reference server does, so a fault in one device's server
// never takes another device down.
package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/ublk"
	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// Config says what to serve and how.
type Config struct {
	BlockDevice string
	Minor       int
	Queues      int // 0 = ublk.DefaultQueues
	Depth       int // 0 = ublk.DefaultDepth
	MaxIOBytes  int // 0 = ublk.DefaultMaxIOBytes
	// Reload, when set, resumes tracking from a COW file before the front
	// device serves its first request (reload-snapshot, reload-incremental).
	Reload *Reload
	// CheckpointEvery is how often incremental tracking writes its index
	// back and trims its write-intent record; 0 = DefaultCheckpoint.
	CheckpointEvery time.Duration
}

// DefaultCheckpoint bounds how much a crash can over-mark: after it, only
// the regions written in the last interval are marked whole.
const DefaultCheckpoint = 30 * time.Second

// Server is a running attachment.
type Server struct {
	cfg  Config
	log  *log.Logger
	ctrl *ublk.Control
	bdev *BlockDevice
	trk  *tracker  // the front device's backend: bdev plus snapshot and change tracking
	snap *snapshot // nil while not tracking
	dev  *ublk.Device
	ln   *net.UnixListener
	// kernelFeatures is what GET_FEATURES reported (0 before Linux 6.5,
	// which lacks the command); it decides optional paths such as zero copy.
	kernelFeatures uint64

	// recoverFailed is set when a restarted server could not resume the
	// dead one's tracking: its state file is kept as it was.
	recoverFailed bool

	mu       sync.Mutex // serialises control requests
	detached chan struct{}
	handlers sync.WaitGroup // control connections being answered
}

// Start opens the device, creates and starts the front device and listens
// on the control socket. On error nothing is left behind.
func Start(cfg Config, logger *log.Logger) (s *Server, err error) {
	prev, recovering := Recoverable(cfg.BlockDevice, cfg.Minor)
	if recovering && cfg.Reload != nil {
		return nil, fmt.Errorf("minor %d is waiting for its server to come back; attach %s %d recovers it with its tracking", cfg.Minor, cfg.BlockDevice, cfg.Minor)
	}
	if !recovering {
		if err := CheckAttach(cfg.BlockDevice, cfg.Minor); err != nil {
			return nil, err
		}
	}
	s = &Server{cfg: cfg, log: logger, detached: make(chan struct{})}
	srv := s // the error returns below set s to nil
	defer func() {
		if err != nil {
			srv.release()
		}
	}()
	if s.bdev, err = OpenBlockDevice(cfg.BlockDevice); err != nil {
		return nil, err
	}
	if s.ctrl, err = ublk.OpenControl(); err != nil {
		return nil, err
	}
	if f, ferr := s.ctrl.Features(); ferr == nil {
		s.kernelFeatures = uint64(f)
	} else {
		s.log.Printf("GET_FEATURES unsupported (%v): assuming the Linux 6.0 feature set", ferr)
	}
	if err := os.MkdirAll(RunDir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", RunDir, err)
	}
	// Claim the socket before creating the device: it is the minor's lock.
	if s.ln, err = listen(SocketPath(cfg.Minor)); err != nil {
		return nil, fmt.Errorf("minor %d: %w", cfg.Minor, err)
	}
	spec := ublk.DeviceSpec{
		ID:                 cfg.Minor,
		Queues:             cfg.Queues,
		Depth:              cfg.Depth,
		MaxIOBytes:         cfg.MaxIOBytes,
		Size:               s.bdev.Size,
		LogicalBlockSize:   s.bdev.LogicalBlockSize,
		PhysicalBlockSize:  s.bdev.PhysicalBlockSize,
		DiscardGranularity: s.bdev.DiscardGranularity,
		WriteZeroes:        true,
		VolatileCache:      true,
		// A dead server's device waits for the next one, I/O held, and
		// requests it had taken are sent again (see recover.go).
		Flags: uapi.FeatUserRecovery | uapi.FeatUserRecoveryReissue,
	}
	s.trk = newTracker(s.bdev, s.log.Printf)
	if recovering {
		return s, s.startRecovered(prev)
	}
	if s.dev, err = ublk.Create(s.ctrl, spec, s.trk, s.log.Printf); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("minor %d is taken: ublk device %d already exists", cfg.Minor, cfg.Minor)
		}
		return nil, err
	}
	if cfg.Reload != nil {
		if err = s.reload(*cfg.Reload); err != nil {
			return nil, err
		}
	}
	if err = s.dev.Start(); err != nil {
		return nil, err
	}
	if s.mode() == ModeSnapshot {
		if err = s.startSnapshotDevice(); err != nil {
			return nil, err
		}
	}
	s.persist()
	go s.checkpointLoop()
	info := s.dev.Info()
	s.log.Printf("attached %s as %s: %d bytes, %d/%d-byte blocks, %d queues x %d tags, device flags %#x, kernel features %#x",
		cfg.BlockDevice, s.dev.BlockPath(), s.bdev.Size, s.bdev.LogicalBlockSize, s.bdev.PhysicalBlockSize,
		info.NrHWQueues, info.QueueDepth, uint64(info.Flags), s.kernelFeatures)
	return s, nil
}

// startRecovered takes over the front device of a server that died, with
// the tracking it had, then recreates its snapshot device.
func (s *Server) startRecovered(prev Persisted) error {
	s.log.Printf("ublk device %d is waiting for its server: recovering it (%s mode recorded)", s.cfg.Minor, prev.Mode)
	s.removeDeadSnapshotDevice()
	s.recoverTracking(prev)
	dev, err := ublk.Recover(s.ctrl, uint32(s.cfg.Minor), s.bdev.Size, s.trk, s.log.Printf)
	if err != nil {
		return err
	}
	s.dev = dev
	if err := s.dev.Start(); err != nil {
		return err
	}
	if s.mode() == ModeSnapshot {
		if err := s.startSnapshotDevice(); err != nil {
			s.log.Printf("recreate the snapshot device: %v", err)
		}
	}
	if !s.recoverFailed {
		s.persist()
	}
	go s.checkpointLoop()
	s.log.Printf("recovered %s as %s", s.cfg.BlockDevice, s.FrontPath())
	return nil
}

// listen binds a root-only Unix socket, replacing a stale one.
func listen(path string) (*net.UnixListener, error) {
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, errors.New("a server already listens on " + path)
	}
	os.Remove(path)
	old := unix.Umask(0o077)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		return nil, err
	}
	ln.SetUnlinkOnClose(true)
	return ln, nil
}

// FrontPath is /dev/ublkb<minor>.
func (s *Server) FrontPath() string { return fmt.Sprintf("/dev/ublkb%d", s.cfg.Minor) }

// finished is closed when the device's queues have all ended.
func (s *Server) finished() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dev == nil {
		return nil
	}
	return s.dev.Finished()
}

// Serve answers control requests until the device is detached, a signal
// asks for it, or ctx ends.
func (s *Server) Serve(ctx context.Context) error {
	go s.acceptLoop()
	// Let the answer to a detach reach its client before the process ends.
	defer s.waitHandlers(5 * time.Second)
	sigs := make(chan os.Signal, 1)
	signalNotify(sigs)
	for {
		select {
		case <-s.detached:
			return nil
		case sig := <-sigs:
			s.log.Printf("received %v: detaching", sig)
			if err := s.detach(false); err != nil {
				s.log.Printf("cannot detach on %v: %v; still serving", sig, err)
				continue
			}
			return nil
		case <-ctx.Done():
			return s.detach(false)
		case <-s.finished():
			// The queues ended without a detach: the device was stopped
			// or deleted from outside. Nothing is left to serve.
			s.mu.Lock()
			detached := s.dev == nil
			if !detached {
				s.release()
			}
			s.mu.Unlock()
			if detached {
				return nil
			}
			s.log.Printf("%s was stopped from outside; exiting", s.FrontPath())
			return fmt.Errorf("%s was stopped from outside", s.FrontPath())
		}
	}
}

func (s *Server) acceptLoop() {
	for {
		conn, err := s.ln.AcceptUnix()
		if err != nil {
			return
		}
		s.handlers.Add(1)
		go func() {
			defer s.handlers.Done()
			s.handle(conn)
		}()
	}
}

func (s *Server) waitHandlers(limit time.Duration) {
	done := make(chan struct{})
	go func() {
		s.handlers.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(limit):
	}
}

func (s *Server) handle(conn *net.UnixConn) {
	defer conn.Close()
	if !peerIsRoot(conn) {
		json.NewEncoder(conn).Encode(Response{Error: "permission denied: dbdctl must run as root"})
		return
	}
	conn.SetDeadline(time.Now().Add(10 * time.Minute))
	var req Request
	if err := json.NewDecoder(conn).Decode(&req); err != nil {
		json.NewEncoder(conn).Encode(Response{Error: "malformed request"})
		return
	}
	var resp Response
	var err error
	switch req.Op {
	case "info":
		info := s.Info()
		resp.Device = &info
	case "detach":
		err = s.detach(!req.Keep)
	default:
		err = s.tracking(req)
	}
	if err != nil {
		resp.Error = err.Error()
	}
	json.NewEncoder(conn).Encode(resp)
}

// tracking runs a snapshot or incremental command.
func (s *Server) tracking(req Request) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dev == nil {
		return fmt.Errorf("minor %d is detaching", s.cfg.Minor)
	}
	switch req.Op {
	case "setup-snapshot":
		return s.setupSnapshot(req)
	case "transition-to-incremental":
		return s.transitionToIncremental()
	case "transition-to-snapshot":
		return s.transitionToSnapshot(req)
	case "destroy":
		return s.destroy()
	case "reconfigure":
		return s.reconfigure(req)
	case "expand-cow-file":
		return s.expandCowFile(req)
	case "reconfigure-auto-expand":
		return s.reconfigureAutoExpand(req)
	}
	return fmt.Errorf("unknown request %q", req.Op)
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

// Info describes the attachment.
func (s *Server) Info() DeviceInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dev == nil {
		return DeviceInfo{Minor: s.cfg.Minor, BlockDevice: s.cfg.BlockDevice, State: StateAttached, Mode: "detaching"}
	}
	info := s.dev.Info()
	st := s.dev.Stats()
	spec := s.dev.Spec()
	d := DeviceInfo{
		Minor:       s.cfg.Minor,
		BlockDevice: s.cfg.BlockDevice,
		State:       StateAttached,
		Mode:        "passthrough",
		FrontDevice: s.dev.BlockPath(),
		ServerPID:   os.Getpid(),
		Size:        s.bdev.Size,
		LogicalBS:   s.bdev.LogicalBlockSize,
		PhysicalBS:  s.bdev.PhysicalBlockSize,
		Queues:      int(info.NrHWQueues),
		QueueDepth:  int(info.QueueDepth),
		MaxIOBytes:  spec.MaxIOBytes,
		Features:    fmt.Sprintf("%#x", uint64(info.Flags)),
		KernelFeat:  fmt.Sprintf("%#x", s.kernelFeatures),
		Log:         LogPath(s.cfg.Minor),
		Stats: IOCounters{
			Reads: st.Reads, Writes: st.Writes, Flushes: st.Flushes, Discards: st.Discards,
			WriteZeroes: st.WriteZeroes, Errors: st.Errors, BytesRead: st.BytesRead, BytesWritten: st.BytesWritten,
		},
	}
	s.fillTrackingInfo(&d)
	return d
}

// detach removes the front device once nobody uses it: the kernel flushes
// and drains it through the still-running queues, then the real device is
// flushed and released. A front device in use (mounted, or open) is refused.
// A tracking device becomes dormant: its COW file is closed clean and its
// state file kept, so reload-snapshot or reload-incremental resumes it.
// An explicit detach of an untracked device forgets it; one on a signal
// (shutdown) keeps it for the boot unit.
func (s *Server) detach(explicit bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.detached:
		return nil
	default:
	}
	if err := s.snapshotDeviceIdle(); err != nil {
		return err
	}
	// Holding the front device exclusively keeps anyone from mounting it
	// between this check and the stop.
	front, err := unix.Open(s.FrontPath(), unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("%s is in use (mounted or open); unmount or close it before detaching", s.FrontPath())
		}
		return fmt.Errorf("open %s: %w", s.FrontPath(), err)
	}
	stopErr := s.dev.Stop()
	unix.Close(front)
	if stopErr != nil {
		return fmt.Errorf("stop %s: %w", s.FrontPath(), stopErr)
	}
	st := s.dev.Stats()
	if err := s.dev.Delete(); err != nil {
		s.log.Printf("delete ublk device %d: %v", s.dev.ID(), err)
	}
	s.dev = nil
	if ts := s.trk.current(); ts.mode != ModePassthrough {
		s.stopSnapshotDevice()
		if err := ts.cow.Close(true); err != nil {
			s.log.Printf("close %s: %v; reload will have to recover it", s.snap.cowPath, err)
		} else {
			s.log.Printf("%s mode is dormant: %s closed clean; resume with dbdctl reload-%s", ts.mode, s.snap.cowPath, ts.mode)
		}
		s.snap = nil
	} else if explicit {
		s.forget()
	}
	if err := s.bdev.Close(); err != nil {
		s.log.Printf("flush %s: %v", s.cfg.BlockDevice, err)
	}
	s.bdev = nil
	s.log.Printf("detached %s: served %d reads, %d writes, %d flushes, %d errors",
		s.cfg.BlockDevice, st.Reads, st.Writes, st.Flushes, st.Errors)
	s.release()
	close(s.detached)
	return nil
}

// checkpointLoop periodically writes an incremental index back, so a
// crash over-marks only what was written recently.
func (s *Server) checkpointLoop() {
	every := s.cfg.CheckpointEvery
	if every <= 0 {
		every = DefaultCheckpoint
		if d, err := time.ParseDuration(os.Getenv("DBDCTL_CHECKPOINT")); err == nil && d > 0 {
			every = d // tests exercise checkpoints with a short interval
		}
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-s.detached:
			return
		case <-tick.C:
		}
		st := s.trk.current()
		if st.mode != ModeIncremental {
			continue
		}
		if err := st.cow.Checkpoint(); err != nil && !errors.Is(err, os.ErrClosed) {
			s.trk.fail(syscall.EIO, fmt.Errorf("checkpoint %s: %w", st.cow.Path(), err))
		}
	}
}

// release frees whatever is still held, in reverse order of acquisition.
// A COW file is closed after the front device has stopped, clean unless
// tracking failed: every write admitted so far was tracked, so the file is
// exact and a reload can resume it.
func (s *Server) release() {
	s.stopSnapshotDevice()
	if s.dev != nil {
		s.dev.Stop()
		s.dev.Delete()
		s.dev = nil
	}
	if s.snap != nil {
		if c := s.trk.current().cow; c != nil {
			c.Close(s.trk.Failed() == 0)
		}
		s.snap = nil
	}
	if s.ln != nil {
		s.ln.Close()
		s.ln = nil
	}
	if s.ctrl != nil {
		s.ctrl.Close()
		s.ctrl = nil
	}
	if s.bdev != nil {
		s.bdev.Close()
		s.bdev = nil
	}
}

func signalNotify(c chan<- os.Signal) {
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
}

// Package daemon is the server of one attached minor: it opens the real
// device, fronts it as /dev/ublkb<minor> with a tracking engine as the
// ublk backend, answers the control protocol, keeps the minor's state file,
// takes over a front device whose server died, and runs the supervisor
// that restarts a dead server. One server process runs per attached
// device, as the C reference server does, so a fault in one device's
// server never takes another device down.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/internal/blockdev"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/frontfs"
	"github.com/dbdublk/dbdublk/internal/insert"
	"github.com/dbdublk/dbdublk/internal/linux"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/internal/state"
	"github.com/dbdublk/dbdublk/internal/track"
	"github.com/dbdublk/dbdublk/ublk"
	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// Config says what to serve and how.
type Config struct {
	BlockDevice string
	Minor       dattobd.Minor
	Queues      int // 0 = ublk.DefaultQueues
	Depth       int // 0: ublk.DefaultDepth, ublk.CopyDepth in copy mode
	MaxIOBytes  int // 0: ublk.DefaultMaxIOBytes, ublk.CopyMaxIOBytes in copy mode
	// Copy serves the front device in ublk's copy mode even where the
	// kernel offers zero copy.
	Copy bool
	// Force attaches untracked a minor whose state file says it was left
	// tracking (its changed-block history is dropped).
	Force bool
	// KeepFailure attaches untracked a minor whose recorded tracking
	// failed, keeping the failure (info shows it) until destroy.
	KeepFailure bool
	// Reload, when set, resumes tracking from a COW file before the front
	// device serves its first request (reload-snapshot, reload-incremental).
	Reload *Reload
	// Boot runs the server of the root volume from the initramfs (boot.go).
	Boot bool
	// CheckpointEvery is how often incremental tracking writes its index
	// back and trims its write-intent record; 0 = DefaultCheckpoint.
	CheckpointEvery time.Duration
}

// DefaultCheckpoint bounds how much a crash can over-mark: after it, only
// the regions written in the last interval are marked whole.
const DefaultCheckpoint = 30 * time.Second

// answerDrain is how long a server that is exiting waits for the answers
// in progress (a detach's answer must reach its client).
const answerDrain = 5 * time.Second

// Server is a running attachment.
type Server struct {
	cfg  Config
	log  *log.Logger
	ctrl *ublk.Control
	bdev *blockdev.Device
	trk  *track.Tracker // the front device's backend: the real device plus tracking
	snap *session       // nil while not tracking
	dev  *ublk.Device
	ctl  *protocol.Server
	// kernelFeatures is what GET_FEATURES reported (0 before Linux 6.5,
	// which lacks the command); it decides optional paths such as zero copy.
	kernelFeatures uint64

	mu       sync.Mutex  // serialises control requests
	op       protocol.Op // the command being answered (under mu), for failpoints
	detached chan struct{}

	// recMu guards the minor's state record and its failure: the tracker
	// records a failure from whatever goroutine meets it, with or without
	// mu held.
	recMu      sync.Mutex
	lastRecord state.Record // as last written
	// failure is why tracking failed, once it has: persisted in the state
	// file, shown by info, refusing every tracking command until destroy.
	failure *state.Failure
	// failedMode and failedCow are the tracking that failed when the
	// server no longer tracks (its COW file could not be resumed, or
	// reload-all attached a failed minor untracked).
	failedMode dattobd.Mode
	failedCow  string
	failedIno  uint64
	// frozen are the filesystems this server has frozen, recorded so that
	// the server taking over after its death thaws them.
	frozen []string

	// fsMu guards fs, the helper process that does the server's work on
	// the filesystems of its own front device (see frontfs).
	fsMu sync.Mutex
	fs   *frontfs.Helper

	// A live insertion under a device-mapper volume in use (live.go):
	// the insertion, the control device, and whether the volume's table
	// maps the front device now.
	live       *insert.Insertion
	dm         *linux.DMControl
	redirected bool

	// The root volume served from boot (boot.go): where its boot record
	// is, whether it has ended in place, and (under recMu) whether its
	// state file lags behind the boot record.
	boot       *state.Boot
	sealed     bool
	fileBehind bool
}

var _ protocol.Handler = (*Server)(nil)

// Start opens the device, creates (or takes over) and starts the front
// device and listens on the control socket. On error nothing is left
// behind.
func Start(cfg Config, logger *log.Logger) (s *Server, err error) {
	prev, recovering, err := preflight(cfg)
	if err != nil {
		return nil, err
	}
	s = &Server{cfg: cfg, log: logger, detached: make(chan struct{})}
	srv := s // the error returns below set s to nil
	defer func() {
		if err != nil {
			srv.release()
		}
	}()
	if err := s.acquire(recovering, prev); err != nil {
		return nil, err
	}
	if recovering {
		return s, s.startRecovered(prev)
	}
	if err := s.startNew(); err != nil {
		return nil, err
	}
	return s, nil
}

// preflight refuses a start that cannot work, before anything changes. A
// front device whose server died (waiting in the kernel, recorded in the
// state file) is to be recovered, not created.
func preflight(cfg Config) (prev state.Record, recovering bool, err error) {
	prev, recovering = Recoverable(cfg.BlockDevice, cfg.Minor)
	if recovering {
		if cfg.Reload != nil {
			return prev, true, fmt.Errorf("minor %d is waiting for its server to come back; attach %s %d recovers it with its tracking",
				cfg.Minor, cfg.BlockDevice, cfg.Minor)
		}
		return prev, true, nil
	}
	if err := CheckAttach(cfg.BlockDevice, cfg.Minor); err != nil {
		return prev, false, err
	}
	r, recorded := state.Find(cfg.Minor)
	switch {
	case !recorded || cfg.Force || cfg.KeepFailure:
	case cfg.Reload != nil && r.Failure != nil:
		stampFailure(r, func(string, ...any) {}) // the refusal is the one line to say
		return prev, false, protocol.Errorf(protocol.ErrFailed, "the tracking recorded for minor %d failed: %s (errno %d); its COW file cannot be trusted, a full backup is required (attach --force drops it)",
			cfg.Minor, r.Failure.Reason, r.Failure.Errno)
	case cfg.Reload == nil:
		if err := checkNotDormant(r); err != nil {
			return prev, false, err
		}
	}
	return prev, false, nil
}

// checkNotDormant refuses a plain attach of a minor whose state file says
// it was left tracking: writes through an untracked front device would be
// missing from the next incremental.
func checkNotDormant(r state.Record) error {
	if r.Failure != nil {
		return fmt.Errorf("minor %d's tracking into %s failed (%s); a full backup is required: attach --force drops it, reload-all attaches it untracked keeping the failure",
			r.Minor, r.CowFile, r.Failure.Reason)
	}
	if !r.Mode.Tracking() {
		return nil
	}
	return fmt.Errorf("minor %d was left in %s mode (COW file %s); resume it with dbdctl reload-%s %s %s %d, or attach --force to drop its tracking",
		r.Minor, r.Mode, r.CowFile, r.Mode, r.BlockDevice, r.CowFile, r.Minor)
}

// acquire takes what every server holds: the minor's lock and control
// socket, the real device (or, under a volume in use, the hidden device
// of a live insertion), the ublk control device.
func (s *Server) acquire(recovering bool, prev state.Record) error {
	var err error
	// The minor's lock and socket first: of two servers racing for a
	// minor, the loser touches nothing.
	if s.ctl, err = protocol.Listen(s.cfg.Minor, s); err != nil {
		return err
	}
	if !recovering {
		if r, ok := state.Find(s.cfg.Minor); ok && blockdev.Same(r.BlockDevice, s.cfg.BlockDevice) {
			prev = r
		}
	}
	s.boot = prev.Boot
	live, err := liveRoute(s.cfg.BlockDevice, &prev, recovering)
	switch {
	case err != nil:
	case live:
		s.bdev, err = s.openLive(recovering, prev)
	case recovering:
		s.bdev, err = s.openAfterDeath(s.cfg.BlockDevice)
	default:
		s.bdev, err = blockdev.Open(s.cfg.BlockDevice)
	}
	if err != nil {
		return err
	}
	if err := ensureUblk(); err != nil {
		return err
	}
	if s.ctrl, err = ublk.OpenControl(); err != nil {
		return err
	}
	if f, ferr := s.ctrl.Features(); ferr == nil {
		s.kernelFeatures = uint64(f)
	} else {
		s.log.Printf("GET_FEATURES unsupported (%v): assuming the Linux 6.0 feature set", ferr)
	}
	s.trk = track.New(s.bdev, s.log.Printf)
	s.trk.OnFailure(s.recordFailure)
	s.lastRecord = state.Record{Minor: s.cfg.Minor, BlockDevice: s.cfg.BlockDevice}
	if s.cfg.KeepFailure {
		if r, ok := state.Find(s.cfg.Minor); ok && r.Failure != nil {
			s.failure, s.failedMode, s.failedCow, s.failedIno = r.Failure, r.Mode, r.CowFile, r.CowInode
			s.log.Printf("attached untracked: the tracking into %s failed (%s); a full backup is required, destroy %d clears it",
				r.CowFile, r.Failure.Reason, s.cfg.Minor)
			stampFailure(r, s.log.Printf)
		}
	}
	return nil
}

// dataPathFlags ask for zero copy where the kernel offers it and the
// server was not told to copy (attach --copy).
func (s *Server) dataPathFlags() uapi.Feature {
	if !s.cfg.Copy && ublk.ZeroCopyOffered(uapi.Feature(s.kernelFeatures)) {
		return ublk.ZeroCopyFlags
	}
	return 0
}

// queueDepth is the front device's queue depth: the user's, or the
// default of the data path (copy mode's smaller one bounds the server's
// buffers).
func (s *Server) queueDepth() int {
	if s.cfg.Depth == 0 && s.dataPathFlags() == 0 {
		return ublk.CopyDepth
	}
	return s.cfg.Depth // 0: ublk's default
}

// maxIO is the largest request of the front and snapshot devices: the
// user's, or the default of the data path.
func (s *Server) maxIO() int {
	if s.cfg.MaxIOBytes == 0 && s.dataPathFlags() == 0 {
		return ublk.CopyMaxIOBytes
	}
	return s.cfg.MaxIOBytes // 0: ublk's default
}

// frontSpec describes the front device of the real device.
func (s *Server) frontSpec() ublk.DeviceSpec {
	// A dead server's device waits for the next one, I/O held, and
	// requests it had taken are sent again (see recover.go).
	flags := uapi.FeatUserRecovery | uapi.FeatUserRecoveryReissue | s.dataPathFlags()
	return ublk.DeviceSpec{
		ID:                 int(s.cfg.Minor.FrontID()),
		Queues:             s.cfg.Queues,
		Depth:              s.queueDepth(),
		MaxIOBytes:         s.maxIO(),
		Size:               s.bdev.Size(),
		LogicalBlockSize:   s.bdev.LogicalBlockSize,
		PhysicalBlockSize:  s.bdev.PhysicalBlockSize,
		DiscardGranularity: s.bdev.DiscardGranularity,
		DMAAlignment:       s.bdev.DMAAlignment,
		WriteZeroes:        true,
		VolatileCache:      true,
		Flags:              flags,
	}
}

// startNew creates the front device, resumes tracking if asked (before the
// first request), starts it and records the minor.
func (s *Server) startNew() error {
	var err error
	if s.dev, err = ublk.Create(s.ctrl, s.frontSpec(), s.trk, s.log.Printf); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("minor %d is taken: ublk device %d already exists", s.cfg.Minor, s.cfg.Minor.FrontID())
		}
		return err
	}
	if s.cfg.Reload != nil {
		if err := s.reload(*s.cfg.Reload); err != nil {
			return err
		}
	}
	if err := s.dev.Start(); err != nil {
		return err
	}
	if s.mode() == dattobd.Snapshot {
		if err := s.startSnapshotDevice(); err != nil {
			return err
		}
	}
	var before state.Record
	var recorded bool
	if s.live != nil {
		before, recorded = state.Find(s.cfg.Minor) // put back if the insertion fails
	}
	if err := s.persist(); err != nil {
		return err
	}
	if s.live != nil {
		if err := s.redirectLive(); err != nil {
			// Nothing was inserted: the record goes back to what it was.
			if recorded {
				err = errors.Join(err, state.Write(before))
			} else {
				err = errors.Join(err, state.Remove(s.cfg.Minor))
			}
			return err
		}
	}
	go s.checkpointLoop()
	s.startBoot()
	info := s.dev.Info()
	s.log.Printf("attached %s as %s: %d bytes, %d/%d-byte blocks, %d queues x %d tags, device flags %#x, kernel features %#x",
		s.cfg.BlockDevice, s.dev.BlockPath(), s.bdev.Size(), s.bdev.LogicalBlockSize, s.bdev.PhysicalBlockSize,
		info.NrHWQueues, info.QueueDepth, uint64(info.Flags), s.kernelFeatures)
	return nil
}

// FrontPath is /dev/ublkb<minor>.
func (s *Server) FrontPath() string { return s.cfg.Minor.FrontPath() }

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
	go s.ctl.Serve()
	// Let the answer to a detach reach its client before the process ends.
	defer s.ctl.Drain(answerDrain)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, shutdownSignals...)
	defer signal.Stop(sigs)
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
			return s.stoppedOutside()
		}
	}
}

// shutdownSignals make a server detach (a service manager stopping it).
var shutdownSignals = []os.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP}

// stoppedOutside ends a server whose queues ended without a detach: the
// device was stopped or deleted from outside. Nothing is left to serve.
func (s *Server) stoppedOutside() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dev == nil {
		return nil // a detach got there first
	}
	s.release()
	s.log.Printf("%s was stopped from outside; exiting", s.FrontPath())
	return fmt.Errorf("%s was stopped from outside", s.FrontPath())
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
	if err := s.checkLiveDetach(); err != nil {
		return err
	}
	if err := s.restoreLive(); err != nil {
		return err
	}
	st, err := s.stopFront()
	if err != nil {
		return err
	}
	if cur := s.trk.Current(); cur.Mode.Tracking() {
		s.stopSnapshotDevice()
		if f := s.failed(); f != nil {
			// Again, if the storage failed when tracking did.
			if err := cur.Cow.RecordFailure(syscall.Errno(f.Errno), f.Reason); err != nil {
				s.log.Printf("record the failure in %s: %v; the state file keeps it", s.snap.cowPath, err)
			}
		}
		s.closeDormant(cur, "reload will have to recover it", fmt.Sprintf("%s mode is dormant: %%s closed clean; resume with dbdctl reload-%s", cur.Mode, cur.Mode))
	} else if explicit && s.failed() == nil {
		s.forget()
	}
	if err := s.bdev.Close(); err != nil {
		s.log.Printf("flush %s: %v", s.cfg.BlockDevice, err)
	}
	s.bdev = nil
	s.endLive()
	s.log.Printf("detached %s: served %d reads, %d writes, %d flushes, %d errors",
		s.cfg.BlockDevice, st.Reads, st.Writes, st.Flushes, st.Errors)
	s.release()
	close(s.detached)
	return nil
}

// closeDormant closes the COW file of st, the tracking that just ended,
// clean unless tracking failed, and says so: dormant (cleanLog, with the
// file's path) or, if the close failed, what will recover it. Caller
// holds s.mu; s.snap is cleared.
func (s *Server) closeDormant(st *track.State, recovery, cleanLog string) {
	switch err := st.Cow.Close(s.trk.Failed() == 0); {
	case s.trk.Failed() != 0:
		s.log.Printf("%s: tracking failed; the file is left failed, a full backup is required", s.snap.cowPath)
	case err != nil:
		s.log.Printf("close %s: %v; %s", s.snap.cowPath, err, recovery)
	default:
		s.log.Printf(cleanLog, s.snap.cowPath)
	}
	s.snap = nil
}

// stopFront stops and deletes the front device unless it is in use, and
// returns what it served.
func (s *Server) stopFront() (ublk.QueueStats, error) {
	// Holding the front device exclusively keeps anyone from mounting it
	// between this check and the stop.
	front, err := unix.Open(s.FrontPath(), unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return ublk.QueueStats{}, protocol.Errorf(protocol.ErrInUse,
				"%s is in use (mounted or open); unmount or close it before detaching", s.FrontPath())
		}
		return ublk.QueueStats{}, fmt.Errorf("open %s: %w", s.FrontPath(), err)
	}
	stopErr := s.dev.Stop()
	unix.Close(front)
	if stopErr != nil {
		return ublk.QueueStats{}, fmt.Errorf("stop %s: %w", s.FrontPath(), stopErr)
	}
	st := s.dev.Stats()
	if err := s.dev.Delete(); err != nil {
		s.log.Printf("delete ublk device %d: %v", s.dev.ID(), err)
	}
	s.dev = nil
	return st, nil
}

// checkpointEvery is the configured checkpoint interval (tests shorten it
// with DBDCTL_CHECKPOINT).
func (s *Server) checkpointEvery() time.Duration {
	if s.cfg.CheckpointEvery > 0 {
		return s.cfg.CheckpointEvery
	}
	if d, err := time.ParseDuration(os.Getenv("DBDCTL_CHECKPOINT")); err == nil && d > 0 {
		return d
	}
	return DefaultCheckpoint
}

// checkpointLoop periodically writes an incremental index back, so a
// crash over-marks only what was written recently.
func (s *Server) checkpointLoop() {
	s.every(s.checkpointEvery(), func() bool {
		st := s.trk.Current()
		if st.Mode != dattobd.Incremental {
			return true
		}
		if err := st.Cow.Checkpoint(); err != nil && !errors.Is(err, os.ErrClosed) {
			s.trk.Fail(syscall.EIO, fmt.Errorf("checkpoint %s: %w", st.Cow.Path(), err))
		}
		return true
	})
}

// every calls fn every d until the server detaches or fn returns false.
func (s *Server) every(d time.Duration, fn func() bool) {
	tick := time.NewTicker(d)
	defer tick.Stop()
	for {
		select {
		case <-s.detached:
			return
		case <-tick.C:
		}
		if !fn() {
			return
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
	if s.trk != nil {
		s.trk.Close()
	}
	if s.snap != nil {
		if c := s.trk.Current().Cow; c != nil {
			c.Close(s.trk.Failed() == 0)
		}
		s.snap = nil
	}
	if s.ctl != nil {
		s.ctl.Close()
	}
	if s.ctrl != nil {
		s.ctrl.Close()
		s.ctrl = nil
	}
	if s.bdev != nil {
		s.bdev.Close()
		s.bdev = nil
	}
	s.endLive()
	s.closeFrontFS()
}

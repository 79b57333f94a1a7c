package daemon

import (
	"errors"
	"fmt"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"time"

	"github.com/gofrs/flock"

	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/insert"
	"github.com/dbdublk/dbdublk/internal/linux"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/internal/state"
	"github.com/dbdublk/dbdublk/ublk"
	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// Supervision: attach starts `serve --supervise`, which runs the real
// server as its child and starts it again when it dies (killed, crashed).
// The new server finds the front device waiting in the kernel and takes it
// over with its tracking (recover.go), so the filesystem on it sees a
// pause, not an error. The supervisor holds nothing of the device: no
// ublk descriptor, no COW file.
//
// A device is never left held with nobody to serve it: if no new server
// can take it over (restarts keep failing for restartFor, or servers keep
// dying at once), the supervisor fails the held I/O (it stops the device,
// so the filesystem on it gets errors instead of hanging for good) and
// records that tracking failed: the next backup must be a full one.

const (
	// maxQuickDeaths servers in a row dying by themselves within
	// quickDeath of starting mean a server cannot run: restarting would
	// loop. Servers killed from outside do not count.
	maxQuickDeaths = 5
	quickDeath     = 2 * time.Second
	// childReady bounds how long a (re)started server may take to serve.
	childReady = 90 * time.Second
	// quiesceWait bounds how long the kernel may take to quiesce a dead
	// server's device once the process is gone (its io_uring is torn down
	// asynchronously, which takes a while on a busy machine).
	quiesceWait = 2 * time.Minute
	// restartFor bounds how long restarts that fail are tried again,
	// pausing from restartFirstPause up to restartMaxPause in between.
	restartFor        = 5 * time.Minute
	restartFirstPause = time.Second
	restartMaxPause   = 15 * time.Second
)

// errGone: the device no longer waits for a server (detached or removed
// by someone else): there is nothing to recover.
var errGone = errors.New("the device no longer waits for a server")

// supervise runs the server as a child until it exits by itself.
func supervise(o protocol.ServeOptions, logger *log.Logger, report func(protocol.Ready)) error {
	logger.SetPrefix(logger.Prefix() + "supervisor: ")
	if err := os.MkdirAll(protocol.RunDir, 0o700); err != nil {
		report(protocol.Ready{Error: err.Error()})
		return err
	}
	lock := flock.New(protocol.SupervisorLockPath(o.Minor))
	if ok, err := lock.TryLock(); err != nil || !ok {
		if err == nil {
			err = fmt.Errorf("minor %d already has a supervisor (%s is locked)", o.Minor, protocol.SupervisorLockPath(o.Minor))
		} else {
			err = fmt.Errorf("lock %s: %w", protocol.SupervisorLockPath(o.Minor), err)
		}
		report(protocol.Ready{Error: err.Error()})
		return err
	}
	defer lock.Unlock()
	exe, err := os.Executable()
	if err != nil {
		report(protocol.Ready{Error: "find own executable: " + err.Error()})
		return err
	}
	if o.Boot {
		// Restarts run the running system's dbdctl, in its root.
		go followSwitchRoot(logger.Printf, nil, nil)
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, shutdownSignals...)
	defer signal.Stop(sigs)
	child := o
	child.Supervise = false
	cmd, front, err := protocol.Launch(exe, child, os.Stderr, false, childReady)
	if err != nil {
		report(protocol.Ready{Error: err.Error()})
		return err
	}
	report(protocol.Ready{Front: front})
	// A restart recovers the tracking from the state file.
	child.Reload, child.CowFile, child.Force, child.KeepFailure = 0, "", false, false
	quick := 0 // consecutive deaths soon after start
	for {
		started := time.Now()
		werr := waitForwardingSignals(cmd, sigs)
		if werr == nil {
			return nil // detached
		}
		logger.Printf("server pid %d died (%v)", cmd.Process.Pid, werr)
		if err := awaitQuiesce(o.Minor, quiesceWait); err != nil {
			if errors.Is(err, errGone) {
				logger.Printf("%s is gone; nothing to recover", o.Minor.FrontPath())
				return werr
			}
			return abandon(o, logger, err)
		}
		switch {
		case killed(werr):
			// Killed from outside (an operator, the OOM killer): not a
			// server that cannot run, however often it happens.
			quick = 0
		case time.Since(started) < quickDeath:
			quick++
		default:
			quick = 0
		}
		if quick >= maxQuickDeaths {
			return abandon(o, logger, fmt.Errorf("servers died %d times in a row within %v of starting", quick, quickDeath))
		}
		logger.Printf("starting a new server to recover %s", o.Minor.FrontPath())
		if cmd, err = restart(exe, child, logger); err != nil {
			if errors.Is(err, errGone) {
				logger.Printf("%s is gone; nothing to recover", o.Minor.FrontPath())
				return err
			}
			return abandon(o, logger, err)
		}
	}
}

// killed reports whether a server's exit was a SIGKILL, which a Go
// program never sends itself on a crash (a panic or fatal error exits 2).
func killed(werr error) bool {
	var ee *exec.ExitError
	if !errors.As(werr, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL
}

// restart starts a server for a device that waits for one, trying again
// with growing pauses while the device still waits, for up to restartFor.
func restart(exe string, child protocol.ServeOptions, logger *log.Logger) (*exec.Cmd, error) {
	deadline := time.Now().Add(restartFor)
	pause := restartFirstPause
	for try := 1; ; try++ {
		cmd, _, err := protocol.Launch(exe, child, os.Stderr, false, childReady)
		if err == nil {
			return cmd, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no server could take the device over in %v: %w", restartFor, err)
		}
		logger.Printf("restart %d failed: %v; trying again in %v", try, err, pause)
		time.Sleep(pause)
		pause = min(2*pause, restartMaxPause)
		if err := awaitQuiesce(child.Minor, quiesceWait); err != nil {
			return nil, err
		}
	}
}

// awaitQuiesce waits until minor's front device waits for a new server
// (QUIESCED). It returns errGone when the device is gone or dead, and an
// error when it is neither quiesced nor gone after timeout.
func awaitQuiesce(m dattobd.Minor, timeout time.Duration) error {
	ctrl, err := ublk.OpenControl()
	if err != nil {
		return err
	}
	defer ctrl.Close()
	for deadline := time.Now().Add(timeout); ; time.Sleep(quiescePoll) {
		info, err := ctrl.DevInfo(m.FrontID())
		switch {
		case err != nil || info.State == uapi.DevDead:
			return errGone
		case info.State == uapi.DevQuiesced:
			return nil
		case time.Now().After(deadline):
			return fmt.Errorf("%s was not quiesced %v after its server died (state %v)", m.FrontPath(), timeout, info.State)
		}
	}
}

// abandon gives up on a device no server can take over: it fails the I/O
// held for it (stopping the device: its users get errors, not a hang),
// and records that its tracking failed, in the state file and in the COW
// file, so no reload resumes it. It returns why.
func abandon(o protocol.ServeOptions, logger *log.Logger, why error) error {
	err := fmt.Errorf("%s cannot be served again: %w; its I/O is failed (stopped) instead of held, and its tracking is failed: the next backup must be full",
		o.Minor.FrontPath(), why)
	logger.Printf("%v", err)
	if ctrl, cerr := ublk.OpenControl(); cerr == nil {
		if serr := ctrl.Stop(o.Minor.FrontID()); serr != nil {
			logger.Printf("stop %s: %v", o.Minor.FrontPath(), serr)
		}
		ctrl.Close()
	}
	r, _ := state.Find(o.Minor)
	if r.Live != nil {
		// A volume in use goes back on its own devices, untracked: its
		// filesystem saw the held I/O fail, not every later one.
		abandonLive(r.Live, logger)
	}
	failRecord(o.Minor, o.BlockDevice, err, logger)
	if r.Live != nil {
		if c, cerr := linux.OpenDMControl(); cerr == nil {
			if rerr := r.Live.RemoveHidden(c); rerr != nil {
				logger.Printf("remove %s: %v", r.Live.Hidden, rerr)
			}
			c.Close()
		}
	}
	return err
}

// abandonLive puts a live-inserted volume whose front device is gone back
// on its original table (kept by the hidden device).
func abandonLive(in *insert.Insertion, logger *log.Logger) {
	c, err := linux.OpenDMControl()
	if err != nil {
		logger.Printf("put %s back on its own devices: %v", in.Volume, err)
		return
	}
	defer c.Close()
	if err := in.Abandon(c); err != nil {
		logger.Printf("put %s back on its own devices: %v", in.Volume, err)
		return
	}
	logger.Printf("%s is back on its own devices, untracked", in.Volume)
}

// failRecord records that minor's tracking failed, from outside its server
// (none runs): in its state record and in its COW file.
func failRecord(m dattobd.Minor, blockDevice string, why error, logger *log.Logger) {
	r, ok := state.Find(m)
	if !ok || !r.Mode.Tracking() || r.Failure != nil {
		return
	}
	r.Failure = &state.Failure{Errno: int(syscall.EIO), Reason: why.Error()}
	if err := state.Write(r); err != nil {
		logger.Printf("record the failure in %s: %v", state.Path(m), err)
	}
	if err := markCowFile(blockDevice, r.CowFile, r.CowExtents, *r.Failure); err != nil {
		logger.Printf("mark %s failed: %v", r.CowFile, err)
	}
}

// waitForwardingSignals waits for cmd to exit, passing shutdown signals on
// to it (the server detaches and exits).
func waitForwardingSignals(cmd *exec.Cmd, sigs <-chan os.Signal) error {
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	for {
		select {
		case sig := <-sigs:
			cmd.Process.Signal(sig)
		case err := <-done:
			return err
		}
	}
}

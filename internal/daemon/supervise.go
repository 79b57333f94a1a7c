package daemon

import (
	"log"
	"os"
	"os/exec"
	"os/signal"
	"time"

	"github.com/dbdublk/dbdublk/internal/protocol"
)

// Supervision: attach starts `serve --supervise`, which runs the real
// server as its child and starts it again when it dies (killed, crashed).
// The new server finds the front device waiting in the kernel and takes it
// over with its tracking (recover.go), so the filesystem on it sees a
// pause, not an error. The supervisor holds nothing of the device: no
// ublk descriptor, no COW file.

const (
	// A server that keeps dying right after it started is left dead (its
	// device stays held until `dbdctl detach` removes it) rather than
	// restarted in a loop; one that served for a while before it died is
	// always restarted.
	maxQuickDeaths = 5
	quickDeath     = 2 * time.Second
	// childReady bounds how long a (re)started server may take to serve.
	childReady = 90 * time.Second
	// quiesceWait bounds how long the kernel may take to quiesce a dead
	// server's device once the process has let go of it (a busy machine).
	quiesceWait = time.Minute
)

// supervise runs the server as a child until it exits by itself.
func supervise(o protocol.ServeOptions, logger *log.Logger, report func(protocol.Ready)) error {
	logger.SetPrefix(logger.Prefix() + "supervisor: ")
	exe, err := os.Executable()
	if err != nil {
		report(protocol.Ready{Error: "find own executable: " + err.Error()})
		return err
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, shutdownSignals...)
	defer signal.Stop(sigs)
	child := o
	child.Supervise = false
	quick := 0 // consecutive deaths soon after start
	for first := true; ; first = false {
		cmd, front, err := protocol.Launch(exe, child, os.Stderr, false, childReady)
		if first {
			if err != nil {
				report(protocol.Ready{Error: err.Error()})
				return err
			}
			report(protocol.Ready{Front: front})
			// A restart recovers the tracking from the state file.
			child.Reload, child.CowFile = 0, ""
		} else if err != nil {
			logger.Printf("the restarted server failed: %v; not restarting again", err)
			return err
		}
		started := time.Now()
		werr := waitForwardingSignals(cmd, sigs)
		if werr == nil {
			return nil // detached
		}
		if !WaitRecoverable(o.BlockDevice, o.Minor, quiesceWait) {
			logger.Printf("server pid %d ended (%v); its device is gone, nothing to recover", cmd.Process.Pid, werr)
			return werr
		}
		if time.Since(started) < quickDeath {
			quick++
		} else {
			quick = 0
		}
		if quick >= maxQuickDeaths {
			logger.Printf("server died %d times in a row within %v of starting; leaving %s held (dbdctl detach %d removes it)",
				quick, quickDeath, o.Minor.FrontPath(), o.Minor)
			return werr
		}
		logger.Printf("server pid %d died (%v); starting a new one to recover %s", cmd.Process.Pid, werr, o.Minor.FrontPath())
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

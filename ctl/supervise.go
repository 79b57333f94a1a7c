package ctl

import (
	"encoding/json"
	"errors"

	"io"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/dbdublk/dbdublk/server"
)

// Supervision: attach starts `serve --supervise`, which runs the real
// server as its child and starts it again when it dies (killed, crashed).
// The new server finds the front device waiting in the kernel and takes it
// over with its tracking (server/recover.go), so the filesystem on it sees
// a pause, not an error. The supervisor holds nothing of the device: no
// ublk descriptor, no COW file.

// Restart limit: a server that keeps dying right after it started is
// left dead (its device stays held until `dbdctl detach` removes it)
// rather than restarted in a loop. One that served for a while before it
// died is always restarted.
const (
	maxQuickDeaths = 5
	quickDeath     = 2 * time.Second
)

func (c *ServeCmd) childArgs(first bool) []string {
	args := []string{"serve", "--ready-fd=3",
		"--queues=" + strconv.Itoa(c.Queues), "--depth=" + strconv.Itoa(c.Depth), "--max-io=" + strconv.Itoa(c.MaxIO)}
	if first && c.Reload != "" {
		// A restart recovers from the state file instead.
		args = append(args, "--reload="+c.Reload, "--cow-file="+c.CowFile,
			"--cache="+strconv.FormatInt(c.Cache, 10), "--falloc="+strconv.FormatInt(c.Falloc, 10))
	}
	if c.Checkpoint > 0 {
		args = append(args, "--checkpoint="+c.Checkpoint.String())
	}
	return append(args, "--", c.BlockDevice, c.Minor)
}

// supervise runs the server as a child until it exits by itself.
func (c *ServeCmd) supervise(minor int, logger *log.Logger, report func(readyStatus)) error {
	exe, err := os.Executable()
	if err != nil {
		report(readyStatus{Error: "find own executable: " + err.Error()})
		return err
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	quick := 0 // consecutive deaths soon after start
	for first := true; ; first = false {
		r, w, err := os.Pipe()
		if err != nil {
			report(readyStatus{Error: err.Error()})
			return err
		}
		cmd := exec.Command(exe, c.childArgs(first)...)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		cmd.ExtraFiles = []*os.File{w}
		if err := cmd.Start(); err != nil {
			w.Close()
			r.Close()
			report(readyStatus{Error: "start server: " + err.Error()})
			return err
		}
		w.Close()
		st := readReady(r, 90*time.Second)
		r.Close()
		if first {
			report(st)
		}
		if st.Error != "" {
			cmd.Wait()
			if first {
				return errors.New(st.Error)
			}
			logger.Printf("the restarted server failed: %s; not restarting again", st.Error)
			return errors.New(st.Error)
		}
		started := time.Now()
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		var werr error
	wait:
		for {
			select {
			case sig := <-sigs:
				cmd.Process.Signal(sig) // the server detaches and exits
			case werr = <-done:
				break wait
			}
		}
		if werr == nil {
			return nil // detached
		}
		// The kernel quiesces the device once the dead process has let go
		// of it, which can take a while when the machine is busy.
		if !server.WaitRecoverable(c.BlockDevice, minor, time.Minute) {
			logger.Printf("server pid %d ended (%v); its device is gone, nothing to recover", cmd.Process.Pid, werr)
			return werr
		}
		if time.Since(started) < quickDeath {
			quick++
		} else {
			quick = 0
		}
		if quick >= maxQuickDeaths {
			logger.Printf("server died %d times in a row within %v of starting; leaving /dev/ublkb%d held (dbdctl detach %d removes it)", quick, quickDeath, minor, minor)
			return werr
		}
		logger.Printf("server pid %d died (%v); starting a new one to recover /dev/ublkb%d", cmd.Process.Pid, werr, minor)
	}
}

// readyReporter returns the function that writes the one readiness line
// to fd (once), or does nothing without one.
func readyReporter(fd int) func(readyStatus) {
	var ready io.WriteCloser
	if fd >= 0 {
		ready = os.NewFile(uintptr(fd), "ready")
	}
	return func(st readyStatus) {
		if ready != nil {
			json.NewEncoder(ready).Encode(st)
			ready.Close()
			ready = nil
		}
	}
}

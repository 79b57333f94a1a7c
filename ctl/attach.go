package ctl

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"os"
	"os/exec"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/dbdublk/dbdublk/server"
)

func version() string { return server.Version }

// ServerFlags tune the front device's queues.
type ServerFlags struct {
	Queues int `help:"Hardware queues (the kernel caps this at the CPU count)." default:"2"`
	Depth  int `help:"Requests in flight per queue." default:"128"`
	MaxIO  int `name:"max-io" help:"Largest request in bytes; also each request buffer's size." default:"1048576"`
}

func (f ServerFlags) config(bdev string, minor int) server.Config {
	return server.Config{BlockDevice: bdev, Minor: minor, Queues: f.Queues, Depth: f.Depth, MaxIOBytes: f.MaxIO}
}

// AttachCmd starts a server for a block device.
type AttachCmd struct {
	BlockDevice string `arg:"" name:"block-device" help:"The real block device, e.g. /dev/sdb1. It must not be mounted or in use."`
	Minor       string `arg:"" name:"minor" help:"Device number N of /dev/ublkbN (0-255)."`
	Foreground  bool   `help:"Serve in the foreground (for service managers) instead of starting a background server."`
	Force       bool   `help:"Attach untracked even though the minor was left tracking (dormant); its changed-block history is dropped and the next backup must be full."`
	ServerFlags
}

// Run attaches the device.
func (c *AttachCmd) Run(env *Env) error {
	minor, err := server.ParseMinor(c.Minor)
	if err != nil {
		return err
	}
	if err := requireRoot(); err != nil {
		return err
	}
	// A device whose server died waits in the kernel: attaching it again
	// recovers it, with the tracking it had.
	if _, recovering := server.Recoverable(c.BlockDevice, minor); !recovering {
		if err := server.CheckAttach(c.BlockDevice, minor); err != nil {
			return err
		}
		if err := checkNotDormant(minor, c.Force); err != nil {
			return err
		}
	}
	if c.Foreground {
		logger := log.New(env.Stderr, "", log.LstdFlags)
		return serve(c.ServerFlags.config(c.BlockDevice, minor), logger, func(front string) {
			fmt.Fprintf(env.Stdout, "attached %s as %s (minor %d)\n", c.BlockDevice, front, minor)
		})
	}
	return c.spawn(env, minor)
}

// spawn starts the server as its own process in its own session, logging to
// a file, and waits for it to report readiness. The server stays in the
// caller's mount namespace: it must see filesystems mounted after attach
// (the one on its own front device, to freeze it, and the one holding a COW
// file). A private namespace would also be torn down at the server's exit,
// taking any copied mount of its own device with it, a flush it could no
// longer serve.
func (c *AttachCmd) spawn(env *Env, minor int) error {
	return spawnServer(env, c.BlockDevice, minor, c.ServerFlags, nil)
}

// checkNotDormant refuses a plain attach of a minor whose state file says
// it was left tracking: writes through an untracked front device would be
// missing from the next incremental.
func checkNotDormant(minor int, force bool) error {
	states, _ := server.LoadStates()
	for _, p := range states {
		if p.Minor == minor && p.Mode != "passthrough" && !force {
			return fmt.Errorf("minor %d was left in %s mode (COW file %s); resume it with dbdctl reload-%s %s %s %d, or attach --force to drop its tracking",
				minor, p.Mode, p.CowFile, p.Mode, p.BlockDevice, p.CowFile, minor)
		}
	}
	return nil
}

// spawnServer starts a background server for bdev as minor; extra are
// further serve flags (a reload).
func spawnServer(env *Env, bdev string, minor int, flags ServerFlags, extra []string) error {
	if err := os.MkdirAll(server.LogDir, 0o755); err != nil {
		return fmt.Errorf("create log directory %s: %w", server.LogDir, err)
	}
	logf, err := os.OpenFile(server.LogPath(minor), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("open log %s: %w", server.LogPath(minor), err)
	}
	defer logf.Close()
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable: %w", err)
	}
	args := []string{"serve", "--supervise", "--ready-fd=3",
		"--queues=" + strconv.Itoa(flags.Queues), "--depth=" + strconv.Itoa(flags.Depth), "--max-io=" + strconv.Itoa(flags.MaxIO)}
	args = append(args, extra...)
	args = append(args, "--", bdev, strconv.Itoa(minor))
	cmd := exec.Command(exe, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{w}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return fmt.Errorf("start server: %w", err)
	}
	w.Close()
	status := readReady(r, 60*time.Second)
	if status.Error != "" {
		cmd.Wait()
		return errors.New(status.Error)
	}
	pid := cmd.Process.Pid
	cmd.Process.Release()
	fmt.Fprintf(env.Stdout, "attached %s as %s (minor %d, supervisor pid %d, log %s)\n",
		bdev, status.Front, minor, pid, server.LogPath(minor))
	return nil
}

// readyStatus is the one line a server writes on its ready pipe.
type readyStatus struct {
	Front string `json:"front,omitempty"`
	Error string `json:"error,omitempty"`
}

func readReady(r *os.File, timeout time.Duration) readyStatus {
	r.SetReadDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil && line == "" {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return readyStatus{Error: "server did not become ready in time; see its log"}
		}
		return readyStatus{Error: "server exited before it was ready; see its log"}
	}
	var st readyStatus
	if json.Unmarshal([]byte(strings.TrimSpace(line)), &st) != nil {
		return readyStatus{Error: "server sent a malformed ready line: " + strings.TrimSpace(line)}
	}
	return st
}

// ServeCmd is the server process that attach starts.
type ServeCmd struct {
	ReadyFD     int           `name:"ready-fd" help:"Write one JSON readiness line to this descriptor." default:"-1"`
	BlockDevice string        `arg:"" name:"block-device"`
	Minor       string        `arg:"" name:"minor"`
	Reload      string        `help:"Resume tracking: snapshot or incremental." enum:",snapshot,incremental" default:""`
	CowFile     string        `name:"cow-file" help:"The COW file to resume from."`
	Cache       int64         `help:"Index cache limit in bytes." default:"0"`
	Falloc      int64         `help:"COW file size, in MiB, that transition-to-snapshot reuses." default:"0"`
	Checkpoint  time.Duration `help:"How often incremental tracking writes its index back." default:"0"`
	Supervise   bool          `help:"Run the server as a child and restart it when it dies."`
	ServerFlags
}

// Run serves until detached.
func (c *ServeCmd) Run(env *Env) error {
	report := readyReporter(c.ReadyFD)
	minor, err := server.ParseMinor(c.Minor)
	if err != nil {
		report(readyStatus{Error: err.Error()})
		return err
	}
	logger := log.New(env.Stderr, fmt.Sprintf("ublk%d: ", minor), log.LstdFlags)
	if c.Supervise {
		logger.SetPrefix(fmt.Sprintf("ublk%d supervisor: ", minor))
		return c.supervise(minor, logger, report)
	}
	cfg := c.ServerFlags.config(c.BlockDevice, minor)
	cfg.CheckpointEvery = c.Checkpoint
	if c.Reload != "" {
		mode := server.ModeSnapshot
		if c.Reload == "incremental" {
			mode = server.ModeIncremental
		}
		cfg.Reload = &server.Reload{Mode: mode, CowFile: c.CowFile, CacheBytes: c.Cache, FallocMiB: c.Falloc}
	}
	err = serve(cfg, logger, func(front string) {
		report(readyStatus{Front: front})
	})
	if err != nil {
		report(readyStatus{Error: err.Error()})
		logger.Print(err)
	}
	return err
}

// serve runs a server in this process; onReady is called once the front
// device exists.
func serve(cfg server.Config, logger *log.Logger, onReady func(front string)) error {
	// DBDCTL_CPUPROFILE=file profiles the server until it exits (for
	// performance work; see bench/).
	if path := os.Getenv("DBDCTL_CPUPROFILE"); path != "" {
		if f, err := os.Create(path); err == nil {
			if pprof.StartCPUProfile(f) == nil {
				defer func() { pprof.StopCPUProfile(); f.Close() }()
			}
		}
	}
	s, err := server.Start(cfg, logger)
	if err != nil {
		return err
	}
	onReady(s.FrontPath())
	return s.Serve(context.Background())
}

package ctl

import (
	"errors"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/protocol"
)

// ServerFlags tune the front device's queues.
type ServerFlags struct {
	Queues int  `help:"Hardware queues (the kernel caps this at the CPU count)." default:"${queues}"`
	Depth  int  `help:"Requests in flight per queue (default ${depth} with zero copy, ${copydepth} in copy mode)."`
	MaxIO  int  `name:"max-io" help:"Largest request in bytes (default ${maxio} with zero copy, ${copymaxio} in copy mode, where it is also each request buffer's size)."`
	Copy   bool `help:"Serve in ublk's copy mode even where the kernel offers zero copy (Linux >= 6.16), where each request's data is copied through the server."`
}

// serveOptions is the server command line for bdev as minor.
func (f ServerFlags) serveOptions(bdev string, m dattobd.Minor) protocol.ServeOptions {
	return protocol.ServeOptions{BlockDevice: bdev, Minor: m, ReadyFD: -1, Queues: f.Queues, Depth: f.Depth, MaxIO: f.MaxIO, Copy: f.Copy}
}

// AttachCmd starts a server for a block device.
type AttachCmd struct {
	BlockDevice string        `arg:"" name:"block-device" help:"The real block device, e.g. /dev/sdb1, not mounted or in use; or a device-mapper volume (an LVM logical volume, a dm-crypt mapping), also while mounted: the front device then goes in under it and it stays in use as it is."`
	Minor       dattobd.Minor `arg:"" name:"minor" help:"Device number N of /dev/ublkbN (0-255)."`
	Foreground  bool          `help:"Serve in the foreground (for service managers) instead of starting a background server."`
	Force       bool          `help:"Attach untracked even though the minor was left tracking (dormant); its changed-block history is dropped and the next backup must be full."`
	AtBoot      bool          `name:"at-boot" help:"The root volume (mounted on /: a partition, a disk or a logical volume): attach it from the initramfs at every boot from the next one on (rebuilds the initramfs; needs the dbdctl package's hook)."`
	ServerFlags
}

// Run attaches the device. The server checks everything before it changes
// anything; a device whose server died is recovered with its tracking.
func (c *AttachCmd) Run(env *Env) error {
	if err := requireRoot(); err != nil {
		return err
	}
	if c.AtBoot {
		if c.Foreground || c.Force {
			return &exitError{2, errors.New("--at-boot takes neither --foreground nor --force")}
		}
		return attachAtBoot(env, c.BlockDevice, c.Minor)
	}
	o := c.ServerFlags.serveOptions(c.BlockDevice, c.Minor)
	o.Force = c.Force
	if c.Foreground {
		logger := log.New(env.Stderr, fmt.Sprintf("ublk%d: ", c.Minor), log.LstdFlags)
		return env.Host.Run(o, logger, func(front string) {
			fmt.Fprintf(env.Stdout, "attached %s as %s (minor %d)\n", c.BlockDevice, front, c.Minor)
		})
	}
	return spawn(env, o)
}

// serverReady bounds how long attach waits for a background server.
const serverReady = 60 * time.Second

// spawn checks o, then starts a supervised server as its own process in its own session,
// logging to its file, and waits for it to report readiness. The server
// stays in the caller's mount namespace: it must see filesystems mounted
// after attach (the one on its own front device, to freeze it, and the one
// holding a COW file). A private namespace would also be torn down at the
// server's exit, taking any copied mount of its own device with it, a flush
// it could no longer serve.
func spawn(env *Env, o protocol.ServeOptions) error {
	if err := env.Host.Check(o); err != nil {
		return err
	}
	if err := os.MkdirAll(protocol.LogDir, 0o755); err != nil {
		return fmt.Errorf("create log directory %s: %w", protocol.LogDir, err)
	}
	logPath := protocol.LogPath(o.Minor)
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("open log %s: %w", logPath, err)
	}
	defer logf.Close()
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable: %w", err)
	}
	o.Supervise = true
	cmd, front, err := protocol.Launch(exe, o, logf, true, serverReady)
	if err != nil {
		return err
	}
	pid := cmd.Process.Pid
	cmd.Process.Release()
	fmt.Fprintf(env.Stdout, "attached %s as %s (minor %d, supervisor pid %d, log %s)\n", o.BlockDevice, front, o.Minor, pid, logPath)
	return nil
}

// ServeCmd is the server process that attach starts.
type ServeCmd struct {
	protocol.ServeOptions
}

// Run serves until detached.
func (c *ServeCmd) Run(env *Env) error {
	logger := log.New(env.Stderr, fmt.Sprintf("ublk%d: ", c.Minor), log.LstdFlags)
	return env.Host.Run(c.ServeOptions, logger, nil)
}

// FrontFSHelperCmd is the helper process a server starts (see
// internal/frontfs).
type FrontFSHelperCmd struct{}

// Run answers the server's requests until it closes standard input.
func (c *FrontFSHelperCmd) Run(env *Env) error { return env.Host.FrontFSHelper() }

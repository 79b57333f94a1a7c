package ctl

import (
	"errors"
	"fmt"
	"os"

	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/internal/state"
)

// reloadArgs are reload-snapshot's and reload-incremental's arguments
// (dattobd's): the device, the COW file left by the previous attachment,
// the minor.
type reloadArgs struct {
	Cache       int64         `short:"c" name:"cache" help:"Index memory limit in bytes, its cache and filter together (default 24 MiB)." default:"0"`
	BlockDevice string        `arg:"" name:"block-device" help:"The real block device, not mounted and not attached."`
	CowFile     string        `arg:"" name:"cow-file" help:"The COW file the device was tracking into when it was detached, stopped or crashed."`
	Minor       dattobd.Minor `arg:"" name:"minor" help:"Minor of the device, as given to attach or setup-snapshot (0-255)."`
	ServerFlags
}

// ReloadSnapshotCmd resumes a snapshot after a detach or a restart.
type ReloadSnapshotCmd struct{ reloadArgs }

// ReloadIncrementalCmd resumes incremental tracking after a detach, a
// restart or a crash.
type ReloadIncrementalCmd struct{ reloadArgs }

// Run reloads the snapshot.
func (c *ReloadSnapshotCmd) Run(env *Env) error { return c.run(env, dattobd.Snapshot, 0) }

// Run reloads incremental tracking.
func (c *ReloadIncrementalCmd) Run(env *Env) error { return c.run(env, dattobd.Incremental, 0) }

func (c *reloadArgs) run(env *Env, mode dattobd.Mode, fallocMiB int64) error {
	if err := positive("cache size", c.Cache); err != nil {
		return err
	}
	if c.CowFile == "" {
		return errors.New("COW file path is empty")
	}
	if err := requireRoot(); err != nil {
		return err
	}
	if _, err := protocol.For(c.Minor).Info(); err == nil {
		return fmt.Errorf("minor %d is attached already; reload-%s attaches the device itself: detach it first", c.Minor, mode)
	} else if !errors.Is(err, protocol.ErrNotAttached) {
		return err
	}
	return c.spawnReload(env, c.ServerFlags.serveOptions(c.BlockDevice, c.Minor), mode, fallocMiB)
}

// spawnReload starts a server with o resuming mode from the COW file.
func (c *reloadArgs) spawnReload(env *Env, o protocol.ServeOptions, mode dattobd.Mode, fallocMiB int64) error {
	cowPath, err := c.cowPath()
	if err != nil {
		return err
	}
	o.Reload, o.CowFile, o.Cache, o.Falloc = mode, cowPath, c.Cache, fallocMiB
	if err := spawn(env, o); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "resumed %s mode on %s from %s\n", mode, c.BlockDevice, cowPath)
	return nil
}

// cowPath finds the COW file. One on the volume itself is found through the
// state file (by its path, or by its path relative to the volume's mount
// point, as dattobd takes it): its filesystem is not mounted yet. Any other
// must be a regular file.
func (c *reloadArgs) cowPath() (string, error) {
	if r, ok := state.OnVolume(c.Minor, c.CowFile); ok {
		return r.CowFile, nil
	}
	path, err := absCow(c.CowFile)
	if err != nil {
		return "", err
	}
	st, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return "", fmt.Errorf("COW file %s does not exist", path)
	case err != nil:
		return "", fmt.Errorf("COW file %s: %w", path, err)
	case !st.Mode().IsRegular():
		return "", fmt.Errorf("COW file %s is not a regular file", path)
	}
	return path, nil
}

// ReloadAllCmd brings back every device recorded in the state directory,
// as it was when it was detached, stopped or crashed: what the boot unit
// runs before filesystems are mounted.
type ReloadAllCmd struct {
	ServerFlags
}

// Run reloads every recorded device that is not attached yet.
func (c *ReloadAllCmd) Run(env *Env) error {
	if err := requireRoot(); err != nil {
		return err
	}
	records, problems := state.Load()
	for _, p := range problems {
		fmt.Fprintf(env.Stderr, "dbdctl: %s\n", oneLine(p.Error()))
	}
	failed := len(problems)
	for _, r := range records {
		if r.Boot != nil {
			// The initramfs brings it back before / is mounted.
			fmt.Fprintf(env.Stdout, "minor %d (%s) is attached at boot, by the initramfs\n", r.Minor, r.BlockDevice)
			continue
		}
		if _, err := protocol.For(r.Minor).Info(); err == nil {
			fmt.Fprintf(env.Stdout, "minor %d is attached already\n", r.Minor)
			continue
		}
		var err error
		switch {
		case r.Failure != nil:
			// The failed tracking is refused; the volume is attached
			// untracked all the same, so the machine boots, and the
			// failure stays on record (info) until destroy.
			fmt.Fprintf(env.Stderr, "dbdctl: minor %d (%s): the tracking into %s failed (%s); a full backup is required: attaching it untracked (destroy %d clears the failure)\n",
				r.Minor, r.BlockDevice, r.CowFile, oneLine(r.Failure.Reason), r.Minor)
			o := c.ServerFlags.serveOptions(r.BlockDevice, r.Minor)
			o.KeepFailure = true
			err = spawn(env, o)
		case r.Mode.Tracking():
			ra := reloadArgs{Cache: r.CacheBytes, BlockDevice: r.BlockDevice, CowFile: r.CowFile, Minor: r.Minor, ServerFlags: c.ServerFlags}
			err = ra.run(env, r.Mode, r.FallocMiB)
		default:
			err = spawn(env, c.ServerFlags.serveOptions(r.BlockDevice, r.Minor))
		}
		if err != nil {
			failed++
			fmt.Fprintf(env.Stderr, "dbdctl: minor %d (%s): %s\n", r.Minor, r.BlockDevice, oneLine(err.Error()))
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d recorded device(s) could not be brought back; see above", failed)
	}
	return nil
}

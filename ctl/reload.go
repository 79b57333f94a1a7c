package ctl

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/dbdublk/dbdublk/server"
)

// reloadArgs are reload-snapshot's and reload-incremental's arguments
// (dattobd's): the device, the COW file left by the previous attachment,
// the minor.
type reloadArgs struct {
	Cache       int64  `short:"c" name:"cache" help:"Index cache limit in bytes (default 300 MiB)." default:"0"`
	BlockDevice string `arg:"" name:"block-device" help:"The real block device, not mounted and not attached."`
	CowFile     string `arg:"" name:"cow-file" help:"The COW file the device was tracking into when it was detached, stopped or crashed."`
	Minor       string `arg:"" name:"minor"`
	ServerFlags
}

// ReloadSnapshotCmd resumes a snapshot after a detach or a restart.
type ReloadSnapshotCmd struct{ reloadArgs }

// ReloadIncrementalCmd resumes incremental tracking after a detach, a
// restart or a crash.
type ReloadIncrementalCmd struct{ reloadArgs }

// Run reloads the snapshot.
func (c *ReloadSnapshotCmd) Run(env *Env) error { return c.run(env, "snapshot", 0) }

// Run reloads incremental tracking.
func (c *ReloadIncrementalCmd) Run(env *Env) error { return c.run(env, "incremental", 0) }

func (c *reloadArgs) run(env *Env, mode string, fallocMiB int64) error {
	minor, err := server.ParseMinor(c.Minor)
	if err != nil {
		return err
	}
	if err := positive("cache size", c.Cache); err != nil {
		return err
	}
	if c.CowFile == "" {
		return errors.New("COW file path is empty")
	}
	if err := requireRoot(); err != nil {
		return err
	}
	// A COW file on the volume itself is found through the state file (by
	// its path, or by its path relative to the volume's mount point, as
	// dattobd takes it): its filesystem is not mounted yet.
	rec, onVolume := server.OnVolumeRecord(minor, c.CowFile)
	cowPath := c.CowFile
	if onVolume {
		cowPath = rec.CowFile
	} else if cowPath, err = absCow(c.CowFile); err != nil {
		return err
	}
	if _, err := server.Call(minor, server.Request{Op: "info"}, 5*time.Second); err == nil {
		return fmt.Errorf("minor %d is attached already; reload-%s attaches the device itself: detach it first", minor, mode)
	} else if !errors.Is(err, server.ErrNotAttached) {
		return err
	}
	st, err := os.Stat(cowPath)
	switch {
	case onVolume:
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("COW file %s does not exist", cowPath)
	case err != nil:
		return fmt.Errorf("COW file %s: %w", cowPath, err)
	case !st.Mode().IsRegular():
		return fmt.Errorf("COW file %s is not a regular file", cowPath)
	}
	if err := server.CheckAttach(c.BlockDevice, minor); err != nil {
		return err
	}
	extra := []string{"--reload=" + mode, "--cow-file=" + cowPath, "--cache=" + strconv.FormatInt(c.Cache, 10),
		"--falloc=" + strconv.FormatInt(fallocMiB, 10)}
	if err := spawnServer(env, c.BlockDevice, minor, c.ServerFlags, extra); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "resumed %s mode on %s from %s\n", mode, c.BlockDevice, cowPath)
	return nil
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
	states, problems := server.LoadStates()
	for _, p := range problems {
		fmt.Fprintf(env.Stderr, "dbdctl: %s\n", oneLine(p.Error()))
	}
	failed := len(problems)
	for _, p := range states {
		if _, err := server.Call(p.Minor, server.Request{Op: "info"}, 5*time.Second); err == nil {
			fmt.Fprintf(env.Stdout, "minor %d is attached already\n", p.Minor)
			continue
		}
		var err error
		switch p.Mode {
		case "passthrough":
			if err = server.CheckAttach(p.BlockDevice, p.Minor); err == nil {
				err = spawnServer(env, p.BlockDevice, p.Minor, c.ServerFlags, nil)
			}
		default:
			r := reloadArgs{Cache: p.CacheBytes, BlockDevice: p.BlockDevice, CowFile: p.CowFile,
				Minor: strconv.Itoa(p.Minor), ServerFlags: c.ServerFlags}
			err = r.run(env, p.Mode, p.FallocMiB)
		}
		if err != nil {
			failed++
			fmt.Fprintf(env.Stderr, "dbdctl: minor %d (%s): %s\n", p.Minor, p.BlockDevice, oneLine(err.Error()))
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d recorded device(s) could not be brought back; see above", failed)
	}
	return nil
}

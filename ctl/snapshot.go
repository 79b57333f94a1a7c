package ctl

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/backup"
	"github.com/dbdublk/dbdublk/server"
)

// call sends a tracking command to minor's server and prints ok on success.
func call(minor string, req server.Request) (int, error) {
	m, err := server.ParseMinor(minor)
	if err != nil {
		return 0, err
	}
	if err := requireRoot(); err != nil {
		return 0, err
	}
	_, err = server.Call(m, req, 10*time.Minute)
	return m, err
}

func absCow(path string) (string, error) {
	if path == "" {
		return "", errors.New("COW file path is empty")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", fmt.Errorf("COW file path %s: %w", path, err)
	}
	return abs, nil
}

func positive(name string, v int64) error {
	if v < 0 {
		return fmt.Errorf("%s must not be negative (got %d)", name, v)
	}
	return nil
}

// SetupSnapshotCmd starts a snapshot series on a device.
type SetupSnapshotCmd struct {
	Cache       int64  `short:"c" name:"cache" help:"Index cache limit in bytes (default 300 MiB)." default:"0"`
	Falloc      int64  `short:"f" name:"falloc" help:"COW file size to preallocate, in MiB (default 10% of the device)." default:"0"`
	BlockDevice string `arg:"" name:"block-device" help:"The attached device's original path (or its /dev/ublkbN); a device not yet attached is attached first."`
	CowFile     string `arg:"" name:"cow-file" help:"New COW file, on a filesystem other than the tracked device's."`
	Minor       string `arg:"" name:"minor"`
	ServerFlags
}

// Run sets up the snapshot.
func (c *SetupSnapshotCmd) Run(env *Env) error {
	minor, err := server.ParseMinor(c.Minor)
	if err != nil {
		return err
	}
	if err := positive("cache size", c.Cache); err != nil {
		return err
	}
	if err := positive("preallocation", c.Falloc); err != nil {
		return err
	}
	cowPath, err := absCow(c.CowFile)
	if err != nil {
		return err
	}
	if err := requireRoot(); err != nil {
		return err
	}
	resp, err := server.Call(minor, server.Request{Op: "info"}, 5*time.Second)
	switch {
	case errors.Is(err, server.ErrNotAttached):
		// Refuse a bad COW path before attaching anything.
		if err := checkCowDir(cowPath); err != nil {
			return err
		}
		a := &AttachCmd{BlockDevice: c.BlockDevice, Minor: c.Minor, ServerFlags: c.ServerFlags}
		if err := server.CheckAttach(c.BlockDevice, minor); err != nil {
			return err
		}
		if err := a.spawn(env, minor); err != nil {
			return err
		}
	case err != nil:
		return err
	default:
		if !sameDevice(c.BlockDevice, resp.Device.BlockDevice) && !sameDevice(c.BlockDevice, resp.Device.FrontDevice) {
			return fmt.Errorf("minor %d is attached to %s, not %s", minor, resp.Device.BlockDevice, c.BlockDevice)
		}
	}
	_, err = server.Call(minor, server.Request{Op: "setup-snapshot", CowFile: cowPath, CacheBytes: c.Cache, FallocMiB: c.Falloc}, 10*time.Minute)
	if err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "snapshot of %s is %s (COW file %s)\n", c.BlockDevice, server.DattoPath(minor), cowPath)
	return nil
}

func checkCowDir(path string) error {
	dir := filepath.Dir(path)
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("directory %s of the COW file does not exist", dir)
	}
	if !st.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("COW file %s already exists; give a new path", path)
	}
	return nil
}

func sameDevice(a, b string) bool {
	var sa, sb unix.Stat_t
	return unix.Stat(a, &sa) == nil && unix.Stat(b, &sb) == nil && sa.Rdev == sb.Rdev && sa.Rdev != 0
}

// TransitionToIncrementalCmd ends the snapshot and keeps tracking changes.
type TransitionToIncrementalCmd struct {
	Minor string `arg:"" name:"minor"`
}

// Run transitions.
func (c *TransitionToIncrementalCmd) Run(env *Env) error {
	m, err := call(c.Minor, server.Request{Op: "transition-to-incremental"})
	if err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "minor %d is now tracking changes incrementally\n", m)
	return nil
}

// TransitionToSnapshotCmd takes the next snapshot of the series.
type TransitionToSnapshotCmd struct {
	Falloc  int64  `short:"f" name:"falloc" help:"COW file size to preallocate, in MiB (default: as before)." default:"0"`
	CowFile string `arg:"" name:"cow-file" help:"New COW file; the current one becomes the changed-block list for update-img."`
	Minor   string `arg:"" name:"minor"`
}

// Run transitions.
func (c *TransitionToSnapshotCmd) Run(env *Env) error {
	if err := positive("preallocation", c.Falloc); err != nil {
		return err
	}
	cowPath, err := absCow(c.CowFile)
	if err != nil {
		return err
	}
	m, err := call(c.Minor, server.Request{Op: "transition-to-snapshot", CowFile: cowPath, FallocMiB: c.Falloc})
	if err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "new snapshot of minor %d is %s (COW file %s)\n", m, server.DattoPath(m), cowPath)
	return nil
}

// DestroyCmd stops tracking and removes the current COW file.
type DestroyCmd struct {
	Minor string `arg:"" name:"minor"`
}

// Run destroys.
func (c *DestroyCmd) Run(env *Env) error {
	m, err := call(c.Minor, server.Request{Op: "destroy"})
	if err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "minor %d no longer tracks changes (still attached)\n", m)
	return nil
}

// ReconfigureCmd changes the index cache limit.
type ReconfigureCmd struct {
	Cache int64  `short:"c" name:"cache" required:"" help:"Index cache limit in bytes."`
	Minor string `arg:"" name:"minor"`
}

// Run reconfigures.
func (c *ReconfigureCmd) Run(env *Env) error {
	if c.Cache <= 0 {
		return fmt.Errorf("cache size must be a positive number of bytes (got %d)", c.Cache)
	}
	_, err := call(c.Minor, server.Request{Op: "reconfigure", CacheBytes: c.Cache})
	return err
}

// ExpandCowFileCmd grows the COW store of an active snapshot.
type ExpandCowFileCmd struct {
	Size  int64  `arg:"" name:"size" help:"MiB to add."`
	Minor string `arg:"" name:"minor"`
}

// Run expands.
func (c *ExpandCowFileCmd) Run(env *Env) error {
	if c.Size <= 0 {
		return fmt.Errorf("expansion size must be a positive number of MiB (got %d)", c.Size)
	}
	_, err := call(c.Minor, server.Request{Op: "expand-cow-file", SizeMiB: c.Size})
	return err
}

// ReconfigureAutoExpandCmd makes a full COW store grow by itself.
type ReconfigureAutoExpandCmd struct {
	Reserved int64  `short:"r" name:"reserved" help:"MiB to always leave free on the COW file's filesystem." default:"0"`
	Step     int64  `arg:"" name:"step" help:"MiB to add each time the store fills (0 turns auto-expand off)."`
	Minor    string `arg:"" name:"minor"`
}

// Run reconfigures.
func (c *ReconfigureAutoExpandCmd) Run(env *Env) error {
	if err := positive("step", c.Step); err != nil {
		return err
	}
	if err := positive("reserved space", c.Reserved); err != nil {
		return err
	}
	_, err := call(c.Minor, server.Request{Op: "reconfigure-auto-expand", SizeMiB: c.Step, ReserveMiB: c.Reserved})
	return err
}

// UpdateImgCmd brings a backup image up to date.
type UpdateImgCmd struct {
	SnapshotDevice string `arg:"" name:"snapshot-device" help:"The current snapshot, e.g. /dev/datto0."`
	CowFile        string `arg:"" name:"cow-file" help:"The previous snapshot's COW file (its changed-block list)."`
	Image          string `arg:"" name:"image" help:"The image made from the previous snapshot."`
	Workers        int    `help:"Parallel copies." default:"4"`
}

var dattoName = regexp.MustCompile(`^/dev/datto(\d+)$`)
var ublkName = regexp.MustCompile(`^/dev/ublkb(\d+)$`)

// snapshotMinor maps a snapshot device path to its minor.
func snapshotMinor(path string) (int, error) {
	if m := dattoName.FindStringSubmatch(filepath.Clean(path)); m != nil {
		return server.ParseMinor(m[1])
	}
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return 0, fmt.Errorf("snapshot device %s does not exist", path)
	}
	if m := ublkName.FindStringSubmatch(real); m != nil {
		id, _ := strconv.Atoi(m[1])
		if id > server.MaxMinor && id-server.MaxMinor-1 <= server.MaxMinor {
			return id - server.MaxMinor - 1, nil
		}
	}
	return 0, fmt.Errorf("%s does not appear to be a snapshot device (expected /dev/datto<minor>)", path)
}

// Run updates the image.
func (c *UpdateImgCmd) Run(env *Env) error {
	if c.Workers < 1 || c.Workers > 64 {
		return fmt.Errorf("workers must be 1..64 (got %d)", c.Workers)
	}
	minor, err := snapshotMinor(c.SnapshotDevice)
	if err != nil {
		return err
	}
	if err := requireRoot(); err != nil {
		return err
	}
	resp, err := server.Call(minor, server.Request{Op: "info"}, 5*time.Second)
	if err != nil {
		return err
	}
	d := resp.Device
	if d == nil || d.Mode != "snapshot" || d.SnapshotDevice == "" {
		return fmt.Errorf("minor %d has no active snapshot", minor)
	}
	if d.Error != 0 {
		return fmt.Errorf("the snapshot of minor %d has failed (error %d); its data cannot be trusted", minor, d.Error)
	}
	var snap backup.Snapshot
	snap.Path, snap.SeqID, snap.Size = server.DattoPath(minor), d.SeqID, d.Size
	if b, err := hex.DecodeString(d.UUID); err != nil || len(b) != 16 {
		return fmt.Errorf("server reported a malformed uuid %q", d.UUID)
	} else {
		copy(snap.UUID[:], b)
	}
	bar := newProgress(env)
	sum, err := backup.UpdateImage(snap, c.CowFile, c.Image, backup.Options{Workers: c.Workers, Progress: bar.update})
	bar.finish()
	if err != nil {
		return err
	}
	mbps := 0.0
	if sum.Seconds > 0 {
		mbps = float64(sum.BytesCopied) / 1e6 / sum.Seconds
	}
	fmt.Fprintf(env.Stdout, "copying complete: %d blocks changed, %d bytes copied in %.2f s (%.1f MB/s)\n",
		sum.BlocksChanged, sum.BytesCopied, sum.Seconds, mbps)
	return nil
}

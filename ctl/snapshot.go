package ctl

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/dbdublk/dbdublk/backup"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/protocol"
)

// client returns the client of minor's server, after the root check.
func client(m dattobd.Minor) (protocol.Client, error) {
	if err := requireRoot(); err != nil {
		return protocol.Client{}, err
	}
	return protocol.For(m), nil
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
	Cache       int64         `short:"c" name:"cache" help:"Index memory limit in bytes, its cache and filter together (default 24 MiB)." default:"0"`
	Falloc      int64         `short:"f" name:"falloc" help:"COW file size to preallocate, in MiB (default 10% of the device)." default:"0"`
	NoFreeze    bool          `name:"no-freeze" help:"Do not freeze the filesystems on the device: take a crash-consistent snapshot even where a consistent one cannot be made."`
	BlockDevice string        `arg:"" name:"block-device" help:"The attached device's original path (or its /dev/ublkbN); a device not yet attached is attached first."`
	CowFile     string        `arg:"" name:"cow-file" help:"New COW file, on a filesystem other than the tracked device's."`
	Minor       dattobd.Minor `arg:"" name:"minor" help:"Minor of the device, as given to attach or setup-snapshot (0-255)."`
	ServerFlags
}

// Run sets up the snapshot.
func (c *SetupSnapshotCmd) Run(env *Env) error {
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
	cl, err := client(c.Minor)
	if err != nil {
		return err
	}
	d, err := cl.Info()
	switch {
	case errors.Is(err, protocol.ErrNotAttached):
		// Refuse a bad COW path before attaching anything.
		if err := checkCowDir(cowPath); err != nil {
			return err
		}
		if err := spawn(env, c.ServerFlags.serveOptions(c.BlockDevice, c.Minor)); err != nil {
			return err
		}
	case err != nil:
		return err
	default:
		if !sameDevice(c.BlockDevice, d.BlockDevice) && !sameDevice(c.BlockDevice, d.FrontDevice) {
			return fmt.Errorf("minor %d is attached to %s, not %s", c.Minor, d.BlockDevice, c.BlockDevice)
		}
	}
	if err := cl.SetupSnapshot(protocol.SetupSnapshot{CowFile: cowPath, CacheBytes: c.Cache, FallocMiB: c.Falloc, NoFreeze: c.NoFreeze}); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "snapshot of %s is %s (COW file %s)\n", c.BlockDevice, c.Minor.DattoPath(), cowPath)
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

// sameDevice reports whether paths a and b are the same device node.
func sameDevice(a, b string) bool {
	sa, err1 := os.Stat(a)
	sb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && sa.Mode()&os.ModeDevice != 0 && os.SameFile(sa, sb)
}

// TransitionToIncrementalCmd ends the snapshot and keeps tracking changes.
type TransitionToIncrementalCmd struct {
	Minor dattobd.Minor `arg:"" name:"minor" help:"Minor of the device, as given to attach or setup-snapshot (0-255)."`
}

// Run transitions.
func (c *TransitionToIncrementalCmd) Run(env *Env) error {
	cl, err := client(c.Minor)
	if err != nil {
		return err
	}
	if err := cl.TransitionToIncremental(); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "minor %d is now tracking changes incrementally\n", c.Minor)
	return nil
}

// TransitionToSnapshotCmd takes the next snapshot of the series.
type TransitionToSnapshotCmd struct {
	Falloc   int64         `short:"f" name:"falloc" help:"COW file size to preallocate, in MiB (default: as before)." default:"0"`
	NoFreeze bool          `name:"no-freeze" help:"Do not freeze the filesystems on the device: take a crash-consistent snapshot even where a consistent one cannot be made."`
	CowFile  string        `arg:"" name:"cow-file" help:"New COW file; the current one becomes the changed-block list for update-img."`
	Minor    dattobd.Minor `arg:"" name:"minor" help:"Minor of the device, as given to attach or setup-snapshot (0-255)."`
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
	cl, err := client(c.Minor)
	if err != nil {
		return err
	}
	if err := cl.TransitionToSnapshot(protocol.TransitionToSnapshot{CowFile: cowPath, FallocMiB: c.Falloc, NoFreeze: c.NoFreeze}); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "new snapshot of minor %d is %s (COW file %s)\n", c.Minor, c.Minor.DattoPath(), cowPath)
	return nil
}

// DestroyCmd stops tracking and removes the current COW file.
type DestroyCmd struct {
	Minor dattobd.Minor `arg:"" name:"minor" help:"Minor of the device, as given to attach or setup-snapshot (0-255)."`
}

// Run destroys.
func (c *DestroyCmd) Run(env *Env) error {
	cl, err := client(c.Minor)
	if err != nil {
		return err
	}
	if err := cl.Destroy(); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "minor %d no longer tracks changes (still attached)\n", c.Minor)
	return nil
}

// ReconfigureCmd changes the index cache limit.
type ReconfigureCmd struct {
	Cache int64         `short:"c" name:"cache" required:"" help:"Index memory limit in bytes, its cache and filter together."`
	Minor dattobd.Minor `arg:"" name:"minor" help:"Minor of the device, as given to attach or setup-snapshot (0-255)."`
}

// Run reconfigures.
func (c *ReconfigureCmd) Run(env *Env) error {
	if c.Cache <= 0 {
		return fmt.Errorf("cache size must be a positive number of bytes (got %d)", c.Cache)
	}
	cl, err := client(c.Minor)
	if err != nil {
		return err
	}
	return cl.Reconfigure(protocol.Reconfigure{CacheBytes: c.Cache})
}

// ExpandCowFileCmd grows the COW store of an active snapshot.
type ExpandCowFileCmd struct {
	Size  int64         `arg:"" name:"size" help:"MiB to add."`
	Minor dattobd.Minor `arg:"" name:"minor" help:"Minor of the device, as given to attach or setup-snapshot (0-255)."`
}

// Run expands.
func (c *ExpandCowFileCmd) Run(env *Env) error {
	if c.Size <= 0 {
		return fmt.Errorf("expansion size must be a positive number of MiB (got %d)", c.Size)
	}
	cl, err := client(c.Minor)
	if err != nil {
		return err
	}
	return cl.ExpandCowFile(protocol.ExpandCowFile{SizeMiB: c.Size})
}

// ReconfigureAutoExpandCmd makes a full COW store grow by itself.
type ReconfigureAutoExpandCmd struct {
	Reserved int64         `short:"r" name:"reserved" help:"MiB to always leave free on the COW file's filesystem." default:"0"`
	Step     int64         `arg:"" name:"step" help:"MiB to add each time the store fills (0 turns auto-expand off)."`
	Minor    dattobd.Minor `arg:"" name:"minor" help:"Minor of the device, as given to attach or setup-snapshot (0-255)."`
}

// Run reconfigures.
func (c *ReconfigureAutoExpandCmd) Run(env *Env) error {
	if err := positive("step", c.Step); err != nil {
		return err
	}
	if err := positive("reserved space", c.Reserved); err != nil {
		return err
	}
	cl, err := client(c.Minor)
	if err != nil {
		return err
	}
	return cl.ReconfigureAutoExpand(protocol.AutoExpand{StepMiB: c.Step, ReserveMiB: c.Reserved})
}

// UpdateImgCmd brings a backup image up to date.
type UpdateImgCmd struct {
	SnapshotDevice string `arg:"" name:"snapshot-device" help:"The current snapshot, e.g. /dev/datto0."`
	CowFile        string `arg:"" name:"cow-file" help:"The previous snapshot's COW file (its changed-block list)."`
	Image          string `arg:"" name:"image" help:"The image made from the previous snapshot."`
	Workers        int    `help:"Parallel copies." default:"${workers}"`
}

// maxWorkers bounds --workers.
const maxWorkers = 64

// snapshotMinor maps a snapshot device path (/dev/datto<minor>, or the
// ublk device it links to) to its minor.
func snapshotMinor(path string) (dattobd.Minor, error) {
	if m, ok := dattobd.SnapshotMinor(filepath.Clean(path)); ok {
		return m, nil
	}
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return 0, fmt.Errorf("snapshot device %s does not exist", path)
	}
	if m, ok := dattobd.SnapshotMinor(real); ok {
		return m, nil
	}
	return 0, fmt.Errorf("%s does not appear to be a snapshot device (expected /dev/datto<minor>)", path)
}

// updateImage checks the COW file and the image, then has the snapshot's
// server copy the changed blocks, reading the real device itself (no round
// trip through the snapshot device); a server that predates that request
// gets the copy through the snapshot device, as before.
func updateImage(cl protocol.Client, snap backup.Snapshot, cowPath, imagePath string, opt backup.Options) (backup.Summary, error) {
	ck, err := backup.Check(snap, cowPath, imagePath)
	if err != nil {
		return backup.Summary{}, err
	}
	defer ck.Close()
	if cowFile := ck.Cow.OSFile(); cowFile != nil {
		args := protocol.UpdateImage{UUID: hex.EncodeToString(snap.UUID[:]), SeqID: snap.SeqID, Workers: opt.Workers}
		done, err := cl.UpdateImage(args, cowFile, ck.Image, func(p protocol.Progress) {
			if opt.Progress != nil {
				opt.Progress(p.Done, p.Total)
			}
		})
		if !protocol.UnknownRequest(err) {
			return backup.Summary{BlocksChanged: done.BlocksChanged, BytesCopied: done.BytesCopied, Seconds: done.Seconds}, err
		}
	}
	return backup.CopyFromDevice(ck, snap, opt)
}

// Run updates the image.
func (c *UpdateImgCmd) Run(env *Env) error {
	if c.Workers < 1 || c.Workers > maxWorkers {
		return fmt.Errorf("workers must be 1..%d (got %d)", maxWorkers, c.Workers)
	}
	m, err := snapshotMinor(c.SnapshotDevice)
	if err != nil {
		return err
	}
	cl, err := client(m)
	if err != nil {
		return err
	}
	d, err := cl.Info()
	if err != nil {
		return err
	}
	if d.Mode != dattobd.Snapshot || d.SnapshotDevice == "" {
		return fmt.Errorf("minor %d has no active snapshot", m)
	}
	if d.Error != 0 {
		return fmt.Errorf("the snapshot of minor %d has failed (error %d); its data cannot be trusted", m, d.Error)
	}
	snap := backup.Snapshot{Path: m.DattoPath(), SeqID: d.SeqID, Size: d.Size}
	if b, err := hex.DecodeString(d.UUID); err != nil || len(b) != len(snap.UUID) {
		return fmt.Errorf("server reported a malformed uuid %q", d.UUID)
	} else {
		copy(snap.UUID[:], b)
	}
	bar := newProgress(env)
	sum, err := updateImage(cl, snap, c.CowFile, c.Image, backup.Options{Workers: c.Workers, Progress: bar.update})
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

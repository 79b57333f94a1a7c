package frontfs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/internal/blockdev"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/internal/safepath"
)

// CowPath is a new COW file's path and the devices it is judged against.
type CowPath struct {
	Path        string `json:"path"`
	BlockDevice string `json:"block_device"` // the real device, by the name the user gave
	DeviceRdev  uint64 `json:"device_rdev"`  // its device number
	FrontPath   string `json:"front_path"`   // /dev/ublkb<minor>
	// Inserted is the device-mapper volume the front device is inserted
	// under (0 if none): its filesystem is the volume's own, mapped one
	// to one onto the front device.
	Inserted uint64 `json:"inserted,omitempty"`
}

// checkCowPath refuses a COW path that cannot work, before anything
// changes. It reports whether the path is on the filesystem mounted from
// the front device itself (dattobd's default layout, see cow/mapped.go).
func checkCowPath(c CowPath) (onVolume bool, err error) {
	path := c.Path
	if path == "" {
		return false, protocol.Errorf(protocol.ErrInvalid, "COW file path is empty")
	}
	if !filepath.IsAbs(path) {
		return false, protocol.Errorf(protocol.ErrInvalid, "COW file path %s must be absolute", path)
	}
	dir := filepath.Dir(path)
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, protocol.Errorf(protocol.ErrInvalid, "directory %s of the COW file does not exist", dir)
		}
		return false, fmt.Errorf("COW file directory %s: %w", dir, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return false, protocol.Errorf(protocol.ErrInvalid, "%s is not a directory", dir)
	}
	if err := safepath.CheckDir(dir); err != nil {
		return false, protocol.Errorf(protocol.ErrInvalid, "COW file %s: %v", path, err)
	}
	if _, err := os.Lstat(path); err == nil {
		return false, protocol.Errorf(protocol.ErrInvalid, "COW file %s already exists; give a new path", path)
	}
	if c.Inserted != 0 && st.Dev == c.Inserted {
		return true, nil
	}
	if st.Dev == c.DeviceRdev {
		return false, protocol.Errorf(protocol.ErrInvalid, "COW file %s is on the tracked device %s itself", path, c.BlockDevice)
	}
	var front unix.Stat_t
	if err := unix.Stat(c.FrontPath, &front); err != nil {
		return false, fmt.Errorf("stat %s: %w", c.FrontPath, err)
	}
	if st.Dev == front.Rdev {
		return true, nil
	}
	if blockdev.IsPartitionOf(uint64(st.Dev), filepath.Base(c.FrontPath)) {
		return false, protocol.Errorf(protocol.ErrInvalid, "COW file %s is on a partition of %s; put it on the filesystem of the whole device or on another one",
			path, c.FrontPath)
	}
	// A filesystem stacked on the front device (device-mapper, md, btrfs)
	// would write the COW file back through the front device (tracked,
	// and deadlocking on itself), and its extents are not the front
	// device's: refused.
	fss, err := blockdev.FilesystemsOn(uint64(front.Rdev))
	if err != nil {
		return false, err
	}
	mnt, err := blockdev.MountOf(dir)
	if err != nil {
		return false, err
	}
	for _, m := range fss {
		if mnt.Dev == m.Dev {
			return false, protocol.Errorf(protocol.ErrInvalid, "COW file %s is on a filesystem (%s, mounted at %s) stacked on %s, which cannot hold its own COW file; put it on the filesystem of %s itself or on another device",
				path, m.FSType, m.Point, c.FrontPath, c.FrontPath)
		}
	}
	return false, nil
}

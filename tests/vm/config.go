package vm

import (
	"errors"
	"fmt"
	"path"
	"time"
)

// Disk is a raw image attached as a virtio-blk disk.
type Disk struct {
	Path   string // host image file; created sparse with Size if it does not exist
	Size   int64  // bytes; used only when creating the file
	Serial string // optional virtio serial, visible as /sys/block/vdX/serial (max 20 bytes)
}

// Config describes one VM run.
type Config struct {
	Kernel    string                           // kernel series; "" = $DBD_KERNEL or DefaultKernel
	CPUs      int                              // vCPUs; default 2
	MemoryMiB int                              // guest RAM; default 2048
	Disks     []Disk                           // virtio-blk disks, in order /dev/vda, /dev/vdb, ...
	Files     map[string]string                // guest path -> host file or directory; modes kept, shared libraries of ELF files added
	Programs  []string                         // host programs (PATH, then /usr/local/sbin, /usr/sbin, /sbin), added at the same path with their libraries
	Modules   []string                         // kernel modules to ship, with dependencies (load them with modprobe); virtio_pci and virtio_blk are always shipped and loaded
	Script    string                           // busybox ash script run as root once the guest is set up
	Timeout   time.Duration                    // limit for the whole run, all boots included; default 10 minutes
	PowerCut  bool                             // the script may stop the VM abruptly (echo b > /proc/sysrq-trigger: a power cut); Result.PoweredOff says so instead of an error
	Logf      func(format string, args ...any) // progress and boot-retry notes; may be nil
}

// Result is what a finished VM run produced.
type Result struct {
	Output   string        // the script's stdout and stderr, interleaved as written
	ExitCode int           // the script's exit status
	Console  string        // kernel console of the last boot (the init's own messages included)
	Boots    int           // boots used, retries after early kernel crashes included
	BootTime time.Duration // from starting qemu to the guest init's start marker, last boot
	// PoweredOff is set (with Config.PowerCut) when the guest stopped
	// after its script started but before it finished; ExitCode is then 0
	// and Output is what the script wrote until then.
	PoweredOff bool
}

const (
	defaultCPUs      = 2
	defaultMemoryMiB = 2048
	defaultTimeout   = 10 * time.Minute
	maxDisks         = 26
)

// withDefaults returns a copy of c with defaults filled in, or an error for
// settings that cannot work.
func (c Config) withDefaults() (Config, error) {
	if c.CPUs <= 0 {
		c.CPUs = defaultCPUs
	}
	if c.MemoryMiB <= 0 {
		c.MemoryMiB = defaultMemoryMiB
	}
	if c.Timeout <= 0 {
		c.Timeout = defaultTimeout
	}
	if c.Logf == nil {
		c.Logf = func(string, ...any) {}
	}
	c.Kernel = KernelSeries(c.Kernel)
	if len(c.Disks) > maxDisks {
		return c, fmt.Errorf("vm: at most %d disks", maxDisks)
	}
	for i, d := range c.Disks {
		if d.Path == "" {
			return c, fmt.Errorf("vm: disk %d has no Path", i)
		}
		if len(d.Serial) > 20 {
			return c, fmt.Errorf("vm: disk %d serial %q is longer than 20 bytes", i, d.Serial)
		}
	}
	for g := range c.Files {
		if !path.IsAbs(g) {
			return c, fmt.Errorf("vm: Files key %q must be an absolute guest path", g)
		}
	}
	if c.Script == "" {
		return c, errors.New("vm: empty Script")
	}
	return c, nil
}

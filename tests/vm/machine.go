package vm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Machine is a Debian guest with a disk of its own that survives its boots:
// what one boot installs, writes or breaks, the next one finds. Every boot
// starts the kernel and initramfs the disk's /boot holds at that moment,
// as a boot loader would. A Machine is not safe for concurrent Boots.
type Machine struct {
	Dir   string     // holds Disk and a directory per boot
	Disk  string     // the root disk, /dev/vda in the guest; root on /dev/vda1
	Image *RootImage // the image Disk was copied from
	// Root is the kernel's root= for every later boot, as a boot loader's
	// configuration would give it; NewMachine sets the image's
	// UUID=<FSUUID>. A test that moves / elsewhere (onto a logical
	// volume) changes it. The kernel and initramfs are still read from
	// the root disk's partition 1 (/boot there).
	Root  string
	boots int
}

// BootConfig describes one boot of a Machine.
type BootConfig struct {
	// Script runs as root under /bin/sh in /root, from dbd-step.service
	// once systemd has reached multi-user.target. It may end the boot
	// itself (systemctl reboot or poweroff; echo b > /proc/sysrq-trigger
	// with PowerCut); otherwise the machine is powered off when it returns.
	Script    string
	Files     map[string]string                // path under /mnt/files in the guest -> host file or directory
	Disks     []Disk                           // further virtio-blk disks: /dev/vdc, /dev/vdd, ...
	PowerCut  bool                             // the script may stop the machine abruptly; Result.PoweredOff says so instead of an error
	CPUs      int                              // vCPUs; default 2
	MemoryMiB int                              // guest RAM; default 2048
	Timeout   time.Duration                    // limit for the boot, retries included; default 10 minutes
	Logf      func(format string, args ...any) // progress and boot-retry notes; may be nil
}

// machineBootDeadline is how long a Machine boot may take to start the
// step service before it counts as hung. A healthy boot under TCG takes
// about 15 s.
const machineBootDeadline = 3 * time.Minute

// machineCmdline boots the root file system (root=), read-only first so
// that systemd checks it, as Debian's boot loaders do. quiet keeps the
// kernel at warnings and worse (loglevel=5 after it) and systemd at failed
// units and slow jobs. The rest is kernelCmdline's reasoning.
const machineCmdline = "root=%s ro console=ttyS0 panic=-1 quiet loglevel=5 nosoftlockup"

// NewMachine copies the cached root image whose initramfs k builds
// (building it first if needed) into dir, which is created if missing,
// and returns a Machine for it.
func NewMachine(ctx context.Context, dir string, k Initramfs) (*Machine, error) {
	img, err := EnsureRootImage(ctx, k)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	m := &Machine{Dir: dir, Disk: filepath.Join(dir, "disk.img"), Image: img, Root: "UUID=" + img.FSUUID}
	if _, err := os.Stat(m.Disk); err == nil {
		return nil, fmt.Errorf("vm: %s already exists", m.Disk)
	}
	// cp keeps the holes: the image is 3 GiB, a few hundred MiB of it used.
	if out, err := exec.CommandContext(ctx, "cp", "--sparse=always", img.Disk, m.Disk).CombinedOutput(); err != nil {
		os.Remove(m.Disk)
		return nil, fmt.Errorf("vm: copy the root image: %w\n%s", err, out)
	}
	return m, nil
}

// Boot starts the machine from its disk, runs cfg.Script and waits until
// the machine is off. The Result and error follow Run: a failing script
// is not an error, a guest that cannot boot, hangs or crashes is.
func (m *Machine) Boot(ctx context.Context, cfg BootConfig) (*Result, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	if _, err := exec.LookPath(qemuBinary); err != nil {
		return nil, fmt.Errorf("vm: %s not found (Debian package qemu-system-x86): %w", qemuBinary, err)
	}
	m.boots++
	dir := filepath.Join(m.Dir, "boot-"+strconv.Itoa(m.boots))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if os.Getenv("DBD_VM_KEEP") != "" {
		cfg.Logf("vm: keeping boot directory %s", dir)
	} else {
		defer os.RemoveAll(dir)
	}

	t0 := time.Now()
	vmlinuz := filepath.Join(dir, "vmlinuz")
	initrd := filepath.Join(dir, "initrd.img")
	for guest, host := range map[string]string{"/boot/vmlinuz-" + m.Image.Release: vmlinuz, "/boot/initrd.img-" + m.Image.Release: initrd} {
		if err := dumpDiskFile(ctx, m.Disk, guest, host); err != nil {
			return nil, err
		}
	}
	filesImg := filepath.Join(dir, "files.img")
	if err := writeFilesDisk(ctx, filesImg, filepath.Join(dir, "files"), cfg.Files, cfg.Script); err != nil {
		return nil, err
	}
	st, _ := os.Stat(initrd)
	cfg.Logf("vm: machine boot %d: kernel %s, initrd %.1f MiB from the disk, files disk ready in %v",
		m.boots, m.Image.Release, float64(st.Size())/(1<<20), time.Since(t0).Round(time.Millisecond))

	disks := append([]Disk{{Path: m.Disk}, {Path: filesImg}}, cfg.Disks...)
	backends, err := prepareDisks(disks)
	if err != nil {
		return nil, err
	}
	consoleLog := filepath.Join(dir, "console.log")
	resultsLog := filepath.Join(dir, "results.log")
	cmdline := fmt.Sprintf(machineCmdline, m.Root)
	return bootWithRetries(ctx, &bootPlan{
		args: func(b []diskBackend) []string {
			args := qemuBaseArgs(cfg.CPUs, cfg.MemoryMiB, vmlinuz, initrd, cmdline, consoleLog, resultsLog)
			for i, d := range disks {
				args = append(args, qemuDriveArgs(i, d, b[i], i == 1)...)
			}
			return args
		},
		backends:   backends,
		consoleLog: consoleLog,
		resultsLog: resultsLog,
		deadline:   machineBootDeadline,
		starter:    stepUnit,
		powerCut:   cfg.PowerCut,
		logf:       cfg.Logf,
	})
}

// ReadFile returns a file of the machine's root file system, read on the
// host while the machine is off.
func (m *Machine) ReadFile(ctx context.Context, guestPath string) ([]byte, error) {
	tmp, err := os.CreateTemp(m.Dir, "read-")
	if err != nil {
		return nil, err
	}
	tmp.Close()
	defer os.Remove(tmp.Name())
	if err := dumpDiskFile(ctx, m.Disk, guestPath, tmp.Name()); err != nil {
		return nil, err
	}
	return os.ReadFile(tmp.Name())
}

// dumpDiskFile copies guestPath out of the root file system of a disk image
// with debugfs, which opens partition 1 through an offset instead of a loop
// device. Like a boot loader it reads the file system as it is on disk,
// without replaying its journal: after a power cut it sees what GRUB would.
func dumpDiskFile(ctx context.Context, disk, guestPath, hostPath string) error {
	os.Remove(hostPath) // debugfs does not truncate
	src := fmt.Sprintf("%s?offset=%d", disk, rootPartOffset)
	out, err := exec.CommandContext(ctx, "debugfs", "-R", fmt.Sprintf("dump -p %q %q", guestPath, hostPath), src).CombinedOutput()
	if err != nil {
		return fmt.Errorf("vm: debugfs dump %s from %s: %w\n%s", guestPath, disk, err, out)
	}
	// debugfs reports a missing file on stderr but exits 0.
	if _, err := os.Stat(hostPath); err != nil {
		return fmt.Errorf("vm: debugfs dump %s from %s: %s", guestPath, disk, out)
	}
	return nil
}

// withDefaults returns a copy of c with defaults filled in, or an error for
// settings that cannot work.
func (c BootConfig) withDefaults() (BootConfig, error) {
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
	if c.Script == "" {
		return c, errors.New("vm: empty Script")
	}
	if len(c.Disks) > maxDisks-2 {
		return c, fmt.Errorf("vm: at most %d extra disks", maxDisks-2)
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
		if !path.IsAbs(g) || path.Clean(g) == "/" {
			return c, fmt.Errorf("vm: Files key %q must be an absolute guest path below /", g)
		}
		if top, _, _ := strings.Cut(path.Clean(g)[1:], "/"); top == stepScript || top == stepWrapper {
			return c, fmt.Errorf("vm: Files key %q is taken by the rig", g)
		}
	}
	return c, nil
}

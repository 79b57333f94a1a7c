package vm

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

const qemuBinary = "qemu-system-x86_64"

// kernelCmdline keeps the console quiet but shows warnings and worse
// (loglevel=5), so oopses and WARN_ONs end up in Result.Console. panic=-1
// with -no-reboot turns a panic into an immediate qemu exit. The soft-lockup
// detector is off: under TCG a busy host makes it fire spuriously.
const kernelCmdline = "console=ttyS0 panic=-1 quiet loglevel=5 nosoftlockup"

// diskBackend is how qemu opens one image on the host.
type diskBackend struct {
	cache string // "none" (O_DIRECT) or "writeback" where O_DIRECT is refused
	aio   string // "io_uring" or "threads" where io_uring is unusable
}

// prepareDisks creates missing images and picks a backend for each.
func prepareDisks(disks []Disk) ([]diskBackend, error) {
	aio := "threads"
	if hostHasIOUring() {
		aio = "io_uring"
	}
	var out []diskBackend
	for i, d := range disks {
		if err := createSparse(d); err != nil {
			return nil, fmt.Errorf("vm: disk %d: %w", i, err)
		}
		b := diskBackend{cache: "none", aio: aio}
		if !supportsODirect(d.Path) {
			b.cache = "writeback" // e.g. tmpfs
		}
		out = append(out, b)
	}
	return out, nil
}

// createSparse makes the image file if it does not exist yet.
func createSparse(d Disk) error {
	f, err := os.OpenFile(d.Path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if errors.Is(err, os.ErrExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	if d.Size <= 0 {
		os.Remove(d.Path)
		return fmt.Errorf("%s does not exist and Size is %d", d.Path, d.Size)
	}
	return f.Truncate(d.Size)
}

func supportsODirect(p string) bool {
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	unix.Close(fd)
	return true
}

var (
	ioUringOnce sync.Once
	ioUringOK   bool
)

// hostHasIOUring probes io_uring_setup: containers and hardened hosts often
// refuse it (seccomp, kernel.io_uring_disabled), and qemu would then fail.
func hostHasIOUring() bool {
	ioUringOnce.Do(func() {
		var params [120]byte // struct io_uring_params, zeroed
		fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, 1, uintptr(unsafe.Pointer(&params[0])), 0)
		if errno == 0 {
			unix.Close(int(fd))
			ioUringOK = true
		}
	})
	return ioUringOK
}

// qemuOpt escapes a value for qemu's comma-separated option syntax.
func qemuOpt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// qemuArgs builds the command line of one boot of Run.
func qemuArgs(k *Kernel, cfg *Config, initrd, consoleLog, resultsLog string, backends []diskBackend) []string {
	args := qemuBaseArgs(cfg.CPUs, cfg.MemoryMiB, k.Vmlinuz, initrd, kernelCmdline, consoleLog, resultsLog)
	for i, d := range cfg.Disks {
		args = append(args, qemuDriveArgs(i, d, backends[i], false)...)
	}
	return args
}

// qemuBaseArgs is the machine without disks: q35 under multi-threaded TCG,
// direct kernel boot, and -no-reboot so that any reboot ends qemu. Two
// serial ports write straight to host files: ttyS0 is the console, ttyS1
// the script's output.
func qemuBaseArgs(cpus, memoryMiB int, vmlinuz, initrd, cmdline, consoleLog, resultsLog string) []string {
	return []string{
		"-nodefaults", "-no-user-config",
		"-machine", "q35",
		"-accel", "tcg,thread=multi",
		"-cpu", "max",
		"-smp", strconv.Itoa(cpus),
		"-m", strconv.Itoa(memoryMiB),
		"-display", "none",
		"-monitor", "none",
		"-no-reboot",
		"-kernel", vmlinuz,
		"-initrd", initrd,
		"-append", cmdline,
		"-chardev", "file,id=console,path=" + qemuOpt(consoleLog),
		"-serial", "chardev:console",
		"-chardev", "file,id=results,path=" + qemuOpt(resultsLog),
		"-serial", "chardev:results",
	}
}

// qemuDriveArgs attaches d as the i-th virtio-blk disk (guest /dev/vd<a+i>:
// the guest enumerates them in command-line order).
func qemuDriveArgs(i int, d Disk, b diskBackend, readOnly bool) []string {
	id := fmt.Sprintf("d%d", i)
	drive := fmt.Sprintf("file=%s,if=none,id=%s,format=raw,cache=%s,aio=%s", qemuOpt(d.Path), id, b.cache, b.aio)
	if readOnly {
		drive += ",readonly=on"
	}
	dev := "virtio-blk-pci,drive=" + id
	if d.Serial != "" {
		dev += ",serial=" + qemuOpt(d.Serial)
	}
	return []string{"-drive", drive, "-device", dev}
}

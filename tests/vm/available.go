package vm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"
)

// fetchTimeout bounds the kernel download Available may trigger.
const fetchTimeout = 5 * time.Minute

var (
	availMu  sync.Mutex
	availErr = map[string]error{} // by kernel series; checked once per process
)

// Available reports whether VMs can run here: qemu-system-x86_64, a static
// /bin/busybox and the default kernel (fetched if not cached yet).
func Available() error {
	version := KernelSeries("")
	availMu.Lock()
	defer availMu.Unlock()
	if err, ok := availErr[version]; ok {
		return err
	}
	err := checkAvailable(version)
	availErr[version] = err
	return err
}

func checkAvailable(version string) error {
	if _, err := exec.LookPath(qemuBinary); err != nil {
		return fmt.Errorf("vm: %s not found (Debian package qemu-system-x86)", qemuBinary)
	}
	if _, err := os.Stat(hostBusybox); err != nil {
		return fmt.Errorf("vm: %s not found (Debian package busybox-static)", hostBusybox)
	}
	if interp, isELF := elfInterpreter(hostBusybox); !isELF || interp != "" {
		return fmt.Errorf("vm: %s is not a static ELF binary (install busybox-static)", hostBusybox)
	}
	ctx, cancel := context.WithTimeout(context.Background(), fetchTimeout)
	defer cancel()
	if _, err := EnsureKernel(ctx, version); err != nil {
		return err
	}
	return nil
}

// Require skips the test when VMs cannot run here, or fails it when the
// environment variable CI is "true": CI must never silently skip VM tests.
func Require(t testing.TB) {
	t.Helper()
	err := Available()
	if err == nil {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("VM tests cannot run in CI: %v", err)
	}
	t.Skipf("VM tests unavailable: %v", err)
}

// MachineAvailable reports whether Machines whose initramfs k builds can
// run here: qemu, debugfs and mke2fs, and the root image (built if not
// cached yet, which needs root, mmdebstrap and sfdisk).
func MachineAvailable(k Initramfs) error {
	machineMu.Lock()
	defer machineMu.Unlock()
	if err, done := machineErr[k]; done {
		return err // a failed build is not tried again by every test
	}
	err := machineAvailable(k)
	machineErr[k] = err
	return err
}

var (
	machineMu  sync.Mutex
	machineErr = map[Initramfs]error{}
)

func machineAvailable(k Initramfs) error {
	for _, tool := range []struct{ bin, pkg string }{{qemuBinary, "qemu-system-x86"}, {"debugfs", "e2fsprogs"}, {"mke2fs", "e2fsprogs"}} {
		if _, err := exec.LookPath(tool.bin); err != nil {
			return fmt.Errorf("vm: %s not found (Debian package %s)", tool.bin, tool.pkg)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), rootBuildTimeout)
	defer cancel()
	_, err := EnsureRootImage(ctx, k)
	return err
}

// RequireMachine is Require for tests that boot a Machine whose initramfs
// k builds.
func RequireMachine(t testing.TB, k Initramfs) {
	t.Helper()
	err := MachineAvailable(k)
	if err == nil {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("VM machine tests cannot run in CI: %v", err)
	}
	t.Skipf("VM machine tests unavailable: %v", err)
}

package daemon

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/kmod"
	"github.com/dbdublk/dbdublk/ublk"
)

// findBlockDevice returns a block device node under /dev, or "".
func findBlockDevice(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/xvda", "/dev/loop0"} {
		var st unix.Stat_t
		if unix.Stat(p, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK {
			return p
		}
	}
	entries, _ := os.ReadDir("/dev")
	for _, e := range entries {
		if e.Type()&os.ModeDevice != 0 && e.Type()&os.ModeCharDevice == 0 {
			return filepath.Join("/dev", e.Name())
		}
	}
	return ""
}

func TestCheckAttachHostOnly(t *testing.T) {
	tmp := t.TempDir()
	file := filepath.Join(tmp, "disk.img")
	if err := os.WriteFile(file, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(tmp, "no-such-device")
	tests := []struct {
		name  string
		path  string
		minor dattobd.Minor
		want  string
	}{
		{"missing", missing, 0, missing + " does not exist"},
		{"regular file", file, 0, file + " is not a block device"},
		{"directory", tmp, 0, tmp + " is not a block device"},
		{"char device", "/dev/null", 3, "/dev/null is not a block device"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckAttach(tt.path, tt.minor)
			if err == nil || err.Error() != tt.want {
				t.Fatalf("CheckAttach(%q, %d) = %v, want %q", tt.path, tt.minor, err, tt.want)
			}
		})
	}
}

func TestCheckAttachWithoutUblk(t *testing.T) {
	if _, err := os.Stat(ublk.ControlPath); err == nil {
		t.Skipf("%s exists: this host has ublk, so CheckAttach would go on to probe the device", ublk.ControlPath)
	}
	dev := findBlockDevice(t)
	if dev == "" {
		t.Skip("no block device on this host")
	}
	err := CheckAttach(dev, 0)
	if !errors.Is(err, ublk.ErrNoUblk) {
		t.Fatalf("CheckAttach(%q, 0) without %s = %v, want ErrNoUblk", dev, ublk.ControlPath, err)
	}
	if kmod.Shipped(filepath.Join(kmod.ModulesDir, kmod.Release()), "ublk_drv") {
		return
	}
	// A kernel without the driver (this host's): one line, naming the
	// kernel and the way out.
	msg := err.Error()
	for _, want := range []string{"has no ublk driver", kmod.Release(), "6.4", "backports"} {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q does not name %q", msg, want)
		}
	}
	if strings.Contains(msg, "\n") {
		t.Errorf("message is not one line: %q", msg)
	}
}

func TestProcessAlive(t *testing.T) {
	if !processAlive(os.Getpid()) {
		t.Errorf("processAlive(own pid %d) = false", os.Getpid())
	}
	cmd := exec.Command("sleep", "0")
	if err := cmd.Start(); err != nil {
		t.Skipf("cannot start a child: %v", err)
	}
	pid := cmd.Process.Pid
	// Unreaped, the exited child is a zombie: not alive.
	deadline := time.Now().Add(10 * time.Second)
	for processAlive(pid) {
		if time.Now().After(deadline) {
			cmd.Wait()
			t.Fatalf("processAlive(%d) still true for an exited, unreaped child", pid)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err != nil || !strings.Contains(string(data), ") Z ") {
		t.Errorf("child %d is not a zombie (%q, %v): the test did not check the zombie case", pid, data, err)
	}
	cmd.Wait()
	if processAlive(pid) {
		t.Errorf("processAlive(%d) = true for a reaped child", pid)
	}
}

func TestRemoveOrphanWithoutDevice(t *testing.T) {
	const minor dattobd.Minor = 251
	if _, err := os.Stat(minor.FrontCharPath()); err == nil {
		t.Skipf("/dev/ublkc%d exists on this host", minor)
	}
	removed, err := RemoveOrphan(minor)
	if removed || err != nil {
		t.Errorf("RemoveOrphan(%d) with no char device = %v, %v; want false, nil", minor, removed, err)
	}
}

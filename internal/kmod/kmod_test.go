package kmod

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func write(t *testing.T, path, text string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

// Shipped finds a module wherever a kernel may list it, and nowhere else:
// Debian 12's 6.1 lists nbd but no ublk_drv.
func TestShipped(t *testing.T) {
	dep := t.TempDir()
	write(t, filepath.Join(dep, "modules.dep"), "kernel/drivers/block/nbd.ko.xz:\nkernel/drivers/md/dm-log-writes.ko.xz: kernel/drivers/md/dm-mod.ko.xz\n")
	write(t, filepath.Join(dep, "modules.builtin"), "kernel/drivers/block/loop.ko\n")
	bare := t.TempDir() // no depmod lists: the rig's unpacked kernels
	write(t, filepath.Join(bare, "kernel/drivers/block/ublk_drv.ko"), "")
	for _, c := range []struct {
		dir, name string
		want      bool
	}{
		{dep, "nbd", true},
		{dep, "dm_log_writes", true},
		{dep, "dm-log-writes", true},
		{dep, "dm_mod", false}, // only a dependency on the line, not listed itself
		{dep, "loop", true},
		{dep, "ublk_drv", false},
		{dep, "nb", false},
		{bare, "ublk_drv", true},
		{bare, "nbd", false},
		{filepath.Join(dep, "missing"), "nbd", false},
	} {
		if got := Shipped(c.dir, c.name); got != c.want {
			t.Errorf("Shipped(%s, %q) = %v, want %v", filepath.Base(c.dir), c.name, got, c.want)
		}
	}
}

// Load refuses a module the running kernel does not have without running
// modprobe, so the caller can say what to do about it.
func TestLoadNotShipped(t *testing.T) {
	err := Load("no_such_module_dbdctl")
	if !errors.Is(err, ErrNotShipped) {
		t.Fatalf("Load(no_such_module) = %v, want ErrNotShipped", err)
	}
}

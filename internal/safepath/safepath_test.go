package safepath

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCheckDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (chown)")
	}
	base := t.TempDir() // under /tmp: world-writable with the sticky bit
	mk := func(name string, mode os.FileMode, uid, gid int) string {
		p := filepath.Join(base, name)
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, uid, gid); err != nil {
			t.Fatal(err)
		}
		return p
	}
	os.Chmod(base, 0o755)
	good := mk("root", 0o755, 0, 0)
	sticky := mk("sticky", os.ModeSticky|0o777, 0, 0)
	stickyUser := mk("stickyuser", os.ModeSticky|0o755, 1000, 1000)
	world := mk("world", 0o777, 0, 0)
	group := mk("group", 0o775, 0, 1000)
	user := mk("user", 0o755, 1000, 0)
	userRO := mk("userro", 0o555, 1000, 0)
	below := filepath.Join(world, "below")
	if err := os.Mkdir(below, 0o755); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(base, "link")
	os.Symlink(world, link)
	for dir, bad := range map[string]bool{
		good: false, sticky: false, stickyUser: true, userRO: false,
		world: true, group: true, user: true, below: true, link: true,
	} {
		err := CheckDir(dir)
		if bad != (err != nil) {
			t.Errorf("CheckDir(%s) = %v, want refused %v", dir, err, bad)
		}
		if err != nil && !strings.Contains(err.Error(), "writable by a user other than root") {
			t.Errorf("CheckDir(%s) = %v", dir, err)
		}
	}
	if err := CheckDir(filepath.Join(base, "missing")); err == nil {
		t.Error("a missing directory passed")
	}
	f := filepath.Join(good, "file")
	os.WriteFile(f, nil, 0o600)
	if err := CheckDir(f); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("CheckDir(file) = %v", err)
	}
}

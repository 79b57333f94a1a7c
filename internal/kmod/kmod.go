// Package kmod loads the kernel modules dbdctl needs (ublk_drv) when they
// are not loaded yet, by running modprobe as an administrator would, and
// tells a module the running kernel does not ship from one that failed to
// load.
package kmod

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrNotShipped means the running kernel has no such module: neither built
// in nor among its loadable modules.
var ErrNotShipped = errors.New("not shipped with this kernel")

// ModulesDir is where the kernels' modules are installed.
const ModulesDir = "/lib/modules"

// Release is the running kernel's release (uname -r).
func Release() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// Load loads module name and what it depends on with modprobe. A module
// the kernel does not ship is ErrNotShipped; another failure carries
// modprobe's own first line.
func Load(name string) error {
	release := Release()
	if !Shipped(filepath.Join(ModulesDir, release), name) {
		return fmt.Errorf("%s: %w (%s)", name, ErrNotShipped, release)
	}
	out, err := exec.Command(modprobe(), name).CombinedOutput()
	if err != nil {
		line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		if line == "" {
			line = err.Error()
		}
		return fmt.Errorf("modprobe %s: %s", name, line)
	}
	return nil
}

// modprobe finds modprobe where PATH or the usual places have it (a
// service's PATH may lack /sbin).
func modprobe() string {
	if p, err := exec.LookPath("modprobe"); err == nil {
		return p
	}
	for _, p := range []string{"/usr/sbin/modprobe", "/sbin/modprobe"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "modprobe"
}

// Shipped reports whether the kernel whose modules are in dir has module
// name, built in (modules.builtin) or loadable (modules.dep, or the module
// file itself where depmod has not run). '-' and '_' are the same in
// module names, as the kernel has them.
func Shipped(dir, name string) bool {
	want := normalize(name)
	for _, list := range []string{"modules.builtin", "modules.dep"} {
		if listed(filepath.Join(dir, list), want) {
			return true
		}
	}
	found := false
	filepath.WalkDir(filepath.Join(dir, "kernel"), func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && moduleName(p) == want {
			found = true
			return filepath.SkipAll
		}
		return nil
	})
	return found
}

// listed reports whether a depmod list names the module: each line starts
// with a module's path, up to a colon in modules.dep.
func listed(path, want string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		p, _, _ := strings.Cut(sc.Text(), ":")
		if moduleName(p) == want {
			return true
		}
	}
	return false
}

// moduleName is the module a path names: its file name up to ".ko"
// (whatever compression follows), normalized; "" for other files.
func moduleName(path string) string {
	base := filepath.Base(path)
	i := strings.Index(base, ".ko")
	if i <= 0 {
		return ""
	}
	return normalize(base[:i])
}

func normalize(name string) string { return strings.ReplaceAll(name, "-", "_") }

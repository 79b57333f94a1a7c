package vm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"sync"
)

// hostBusybox is the static busybox from Debian's busybox-static package; it
// supplies the guest's shell, mount, modprobe, stty and poweroff.
const hostBusybox = "/bin/busybox"

// guestPath is the PATH the guest init exports.
const guestPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// programDirs are searched after $PATH: sbin tools are often missing from a
// non-root user's PATH.
var programDirs = []string{"/usr/local/sbin", "/usr/sbin", "/sbin"}

// buildInitramfs lays out the guest's root file system.
func buildInitramfs(k *Kernel, cfg *Config) (*archive, error) {
	a := newArchive()
	for _, d := range []string{"/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin",
		"/lib", "/lib64", "/etc", "/proc", "/sys", "/dev", "/run", "/mnt", "/var", "/dbd"} {
		a.dir(d, 0o755)
	}
	a.dir("/tmp", 0o777|os.ModeSticky)
	a.dir("/var/tmp", 0o777|os.ModeSticky)
	a.dir("/root", 0o700)
	addEtc(a)

	applets, err := addBusybox(a)
	if err != nil {
		return nil, err
	}
	bootMods, err := addModules(a, k, cfg.Modules)
	if err != nil {
		return nil, err
	}
	var userPaths []string
	for _, name := range cfg.Programs {
		p, err := lookProgram(name)
		if err != nil {
			return nil, err
		}
		if err := addExecutable(a, p, p); err != nil {
			return nil, err
		}
		userPaths = append(userPaths, p)
	}
	for guest, host := range cfg.Files {
		added, err := addTree(a, guest, host)
		if err != nil {
			return nil, err
		}
		userPaths = append(userPaths, added...)
	}
	// A busybox applet elsewhere in PATH must not shadow a real tool the
	// caller asked for (e.g. busybox dd in /bin vs. coreutils dd).
	for _, p := range userPaths {
		for _, ap := range applets[path.Base(p)] {
			if ap != p {
				delete(a.entries, ap)
			}
		}
	}
	a.data("/init", []byte(initScript(cfg, bootMods)), 0o755)
	a.data("/dbd/script.sh", []byte(cfg.Script), 0o755)
	return a, nil
}

// addEtc adds the few /etc files tools expect: mkfs.xfs and others read
// /etc/mtab, and name lookups of root go through passwd/group.
func addEtc(a *archive) {
	a.symlink("/etc/mtab", "/proc/mounts")
	a.data("/etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644)
	a.data("/etc/group", []byte("root:x:0:\n"), 0o644)
	a.data("/etc/hostname", []byte("dbd-vm\n"), 0o644)
}

var (
	appletsOnce sync.Once
	appletList  []string
	appletErr   error
)

// busyboxApplets returns the host busybox's applets as guest paths
// ("/bin/sh", "/sbin/modprobe", ...), asking it once per process.
func busyboxApplets() ([]string, error) {
	appletsOnce.Do(func() {
		out, err := exec.Command(hostBusybox, "--list-full").Output()
		if err != nil {
			appletErr = fmt.Errorf("vm: %s --list-full: %w", hostBusybox, err)
			return
		}
		for _, l := range strings.Fields(string(out)) {
			appletList = append(appletList, "/"+strings.TrimPrefix(l, "/"))
		}
	})
	return appletList, appletErr
}

// addBusybox adds busybox and a symlink per applet; it returns the applet
// paths by base name so callers can drop the ones they replace.
func addBusybox(a *archive) (map[string][]string, error) {
	if err := addExecutable(a, "/bin/busybox", hostBusybox); err != nil {
		return nil, err
	}
	list, err := busyboxApplets()
	if err != nil {
		return nil, err
	}
	byName := map[string][]string{}
	for _, p := range list {
		if p == "/bin/busybox" {
			continue
		}
		a.symlink(p, "/bin/busybox")
		byName[path.Base(p)] = append(byName[path.Base(p)], p)
	}
	return byName, nil
}

// bootModules are what the guest needs to see its disks. Whether they are
// modules or built in differs between kernels (6.1 builds virtio_pci as a
// module, 6.12 builds it in), so each is shipped and loaded only if it is a
// module.
var bootModules = []string{"virtio_pci", "virtio_blk"}

// addModules copies the wanted modules, the boot modules and all their
// dependencies, with a modules.dep and modules.alias covering exactly them.
// It returns the boot modules the guest init must load.
func addModules(a *archive, k *Kernel, want []string) ([]string, error) {
	ix, err := loadModuleIndex(k.ModulesDir)
	if err != nil {
		return nil, fmt.Errorf("vm: module index of %s: %w", k.Release, err)
	}
	var load []string
	for _, m := range bootModules {
		if _, ok := ix.path[m]; ok {
			load = append(load, m)
		} else if !ix.builtin[m] {
			return nil, fmt.Errorf("vm: kernel %s has no %s, needed for virtio disks", k.Release, m)
		}
	}
	names, err := ix.closure(append(load, want...))
	if err != nil {
		return nil, fmt.Errorf("%w (kernel %s)", err, k.Release)
	}
	guestDir := "/lib/modules/" + k.Release
	a.dir(guestDir, 0o755)
	for _, n := range names {
		rel := ix.path[n]
		if err := a.file(guestDir+"/"+rel, filepath.Join(k.ModulesDir, filepath.FromSlash(rel))); err != nil {
			return nil, err
		}
	}
	var dep, alias strings.Builder
	if err := ix.writeDep(&dep, names); err != nil {
		return nil, err
	}
	if err := ix.writeAlias(&alias, names); err != nil {
		return nil, err
	}
	a.data(guestDir+"/modules.dep", []byte(dep.String()), 0o644)
	a.data(guestDir+"/modules.alias", []byte(alias.String()), 0o644)
	if b, err := os.ReadFile(filepath.Join(k.ModulesDir, "modules.builtin")); err == nil {
		a.data(guestDir+"/modules.builtin", b, 0o644)
	}
	return load, nil
}

// lookProgram finds a host program by name in $PATH and then programDirs.
func lookProgram(name string) (string, error) {
	if strings.Contains(name, "/") {
		return filepath.Abs(name)
	}
	if p, err := exec.LookPath(name); err == nil {
		return filepath.Abs(p)
	}
	for _, d := range programDirs {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("vm: program %q not found on the host (PATH and %s)", name, strings.Join(programDirs, ", "))
}

// addExecutable adds host file src at guest path p together with the shared
// libraries and interpreter it needs, at their host paths.
func addExecutable(a *archive, p, src string) error {
	if err := a.file(p, src); err != nil {
		return err
	}
	libs, err := sharedLibs(src)
	if err != nil {
		return err
	}
	for _, l := range libs {
		if !a.has(l) {
			if err := a.file(l, l); err != nil {
				return err
			}
		}
	}
	return nil
}

// addTree adds a host file or directory tree at guest path and returns the
// guest paths of the files it added.
func addTree(a *archive, guest, host string) ([]string, error) {
	if !path.IsAbs(guest) {
		return nil, fmt.Errorf("vm: guest path %q must be absolute", guest)
	}
	st, err := os.Stat(host)
	if err != nil {
		return nil, err
	}
	if !st.IsDir() {
		return []string{path.Clean(guest)}, addExecutable(a, guest, host)
	}
	var added []string
	err = filepath.WalkDir(host, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(host, p)
		g := path.Join(guest, filepath.ToSlash(rel))
		info, err := os.Stat(p)
		if errors.Is(err, fs.ErrNotExist) {
			return nil // dangling symlink
		} else if err != nil {
			return err
		}
		switch {
		case info.IsDir():
			a.dir(g, info.Mode())
		case info.Mode().IsRegular():
			added = append(added, g)
			return addExecutable(a, g, p)
		}
		return nil
	})
	return added, err
}

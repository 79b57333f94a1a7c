package vm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
)

// DefaultKernel is the kernel series used when neither Config.Kernel nor
// $DBD_KERNEL names one.
const DefaultKernel = "6.12"

// Kernel is a Debian cloud kernel unpacked in the cache, ready to boot.
type Kernel struct {
	Version    string // series asked for, e.g. "6.12"
	Release    string // uname -r, e.g. "6.12.117+deb13-cloud-amd64"
	Vmlinuz    string // bzImage to pass to qemu -kernel
	ModulesDir string // lib/modules/<Release>: plain .ko files plus modules.dep and modules.alias for all of them
}

// kernelSource says where a kernel series comes from. The cloud flavour is
// used because it is small and has virtio and ublk as modules.
type kernelSource struct {
	suite string // Debian suite, on the host's own mirror
	pkg   string // meta package whose dependencies name the real image
}

var kernelSources = map[string]kernelSource{
	"6.12": {"trixie", "linux-image-cloud-amd64"},
	"7.3":  {"trixie-backports", "linux-image-cloud-amd64"},
	"6.1":  {"bookworm", "linux-image-cloud-amd64"},
}

// kernelPackagePrefixes are the dependencies worth following from the meta
// package: newer kernels split the image into binary, modules and base
// packages, the last holding modules.builtin. The plain "linux-base" package
// (maintainer scripts) does not match.
var kernelPackagePrefixes = []string{"linux-image-", "linux-binary-", "linux-modules-", "linux-base-"}

// KernelSeries is the kernel series a machine boots for v: v itself, then
// $DBD_KERNEL, then DefaultKernel.
func KernelSeries(v string) string {
	if v != "" {
		return v
	}
	if e := os.Getenv("DBD_KERNEL"); e != "" {
		return e
	}
	return DefaultKernel
}

// kernelMu serialises fetches inside one process; other processes are
// handled by publishing the result with an atomic rename.
var kernelMu sync.Mutex

// EnsureKernel returns the cached kernel of the given series ("" for the
// default), downloading and unpacking it on first use.
func EnsureKernel(ctx context.Context, version string) (*Kernel, error) {
	version = KernelSeries(version)
	src, ok := kernelSources[version]
	if !ok {
		known := make([]string, 0, len(kernelSources))
		for v := range kernelSources {
			known = append(known, v)
		}
		sort.Strings(known)
		return nil, fmt.Errorf("vm: unknown kernel %q (known: %s)", version, strings.Join(known, ", "))
	}
	cache, err := CacheDir()
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(cache, "kernel-"+version)

	kernelMu.Lock()
	defer kernelMu.Unlock()
	if k, err := loadKernel(dir, version); err == nil {
		return k, nil
	}
	staging, err := newStagingDir(dir)
	if err != nil {
		return nil, err
	}
	if err := fetchKernel(ctx, staging, version, src); err != nil {
		os.RemoveAll(staging)
		return nil, err
	}
	if err := publishDir(staging, dir); err != nil {
		return nil, err
	}
	return loadKernel(dir, version)
}

// loadKernel reads a published cache entry. The entry is complete by
// construction (it was renamed into place only when finished).
func loadKernel(dir, version string) (*Kernel, error) {
	rel, err := os.ReadFile(filepath.Join(dir, "release"))
	if err != nil {
		return nil, err
	}
	k := &Kernel{
		Version: version,
		Release: strings.TrimSpace(string(rel)),
		Vmlinuz: filepath.Join(dir, "vmlinuz"),
	}
	k.ModulesDir = filepath.Join(dir, "lib", "modules", k.Release)
	for _, p := range []string{k.Vmlinuz, filepath.Join(k.ModulesDir, "modules.dep")} {
		if _, err := os.Stat(p); err != nil {
			return nil, err
		}
	}
	return k, nil
}

// fetchKernel downloads and unpacks a kernel into dir, laid out as
// loadKernel expects.
func fetchKernel(ctx context.Context, dir, version string, src kernelSource) error {
	work := filepath.Join(dir, "work")
	defer os.RemoveAll(work)
	apt, err := newAptRepo(ctx, filepath.Join(work, "apt"), src.suite)
	if err != nil {
		return err
	}
	pkgs, err := resolveKernelPackages(ctx, apt, src.pkg)
	if err != nil {
		return err
	}
	debs := filepath.Join(work, "debs")
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return err
	}
	if err := apt.download(ctx, debs, pkgs...); err != nil {
		return err
	}
	root := filepath.Join(work, "root")
	files, _ := filepath.Glob(filepath.Join(debs, "*.deb"))
	if len(files) == 0 {
		return fmt.Errorf("vm: apt-get download of %v produced no .deb", pkgs)
	}
	for _, deb := range files {
		if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", deb, root).CombinedOutput(); err != nil {
			return fmt.Errorf("vm: dpkg-deb -x %s: %v\n%s", filepath.Base(deb), err, out)
		}
	}

	vmlinuz, release, err := findVmlinuz(root)
	if err != nil {
		return err
	}
	if !strings.HasPrefix(release, version+".") && !strings.HasPrefix(release, version+"-") {
		return fmt.Errorf("vm: kernel %s asked for, but %s %s now ships %s; update kernelSources", version, src.suite, src.pkg, release)
	}
	modSrc := ""
	for _, p := range []string{"usr/lib/modules", "lib/modules"} {
		if st, err := os.Stat(filepath.Join(root, p, release, "kernel")); err == nil && st.IsDir() {
			modSrc = filepath.Join(root, p, release)
		}
	}
	if modSrc == "" {
		return fmt.Errorf("vm: no modules for %s in %v", release, pkgs)
	}
	// Move the image first: newer packages keep it inside the modules dir.
	if err := os.Rename(vmlinuz, filepath.Join(dir, "vmlinuz")); err != nil {
		return err
	}
	modDir := filepath.Join(dir, "lib", "modules", release)
	if err := os.MkdirAll(filepath.Dir(modDir), 0o755); err != nil {
		return err
	}
	if err := os.Rename(modSrc, modDir); err != nil {
		return err
	}
	if err := decompressModules(ctx, modDir); err != nil {
		return err
	}
	idx, err := scanModules(modDir)
	if err != nil {
		return err
	}
	if err := idx.writeFiles(modDir, idx.names()); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "release"), []byte(release+"\n"), 0o644)
}

// resolveKernelPackages follows the meta package's dependencies to every
// package that carries part of the kernel.
func resolveKernelPackages(ctx context.Context, apt *aptRepo, meta string) ([]string, error) {
	seen := map[string]bool{meta: true}
	queue := []string{meta}
	for len(queue) > 0 {
		pkg := queue[0]
		queue = queue[1:]
		deps, err := apt.depends(ctx, pkg)
		if err != nil {
			return nil, err
		}
		for _, d := range deps {
			if seen[d] || !slices.ContainsFunc(kernelPackagePrefixes, func(p string) bool { return strings.HasPrefix(d, p) }) {
				continue
			}
			seen[d] = true
			queue = append(queue, d)
		}
	}
	if len(seen) == 1 {
		return nil, fmt.Errorf("vm: %s depends on no kernel package", meta)
	}
	pkgs := make([]string, 0, len(seen))
	for p := range seen {
		pkgs = append(pkgs, p)
	}
	sort.Strings(pkgs)
	return pkgs, nil
}

// findVmlinuz locates the kernel image: /boot/vmlinuz-<release> in older
// packages, /usr/lib/modules/<release>/vmlinuz in newer ones.
func findVmlinuz(root string) (path, release string, err error) {
	if m, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*")); len(m) == 1 {
		return m[0], strings.TrimPrefix(filepath.Base(m[0]), "vmlinuz-"), nil
	}
	for _, p := range []string{"usr/lib/modules/*/vmlinuz", "lib/modules/*/vmlinuz"} {
		if m, _ := filepath.Glob(filepath.Join(root, p)); len(m) == 1 {
			return m[0], filepath.Base(filepath.Dir(m[0])), nil
		}
	}
	return "", "", fmt.Errorf("vm: no single vmlinuz in the kernel packages")
}

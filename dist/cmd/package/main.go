// Command package builds dbdctl's .deb and .rpm packages with nfpm:
// the static binary in /usr/sbin, the systemd unit, a modules-load.d
// entry for ublk_drv, the initramfs-tools hook and dracut module that
// attach the root volume at boot, the system-shutdown hook that ends it,
// and the dbdctl(8) manual page generated from the
// command tree. `just package` runs it; the packages land in dist/out.
//
// Usage: go run ./dist/cmd/package [-out DIR] [-formats deb,rpm]
package main

import (
	"compress/gzip"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/goreleaser/nfpm/v2"
	_ "github.com/goreleaser/nfpm/v2/deb" // registers the deb packager
	"github.com/goreleaser/nfpm/v2/files"
	_ "github.com/goreleaser/nfpm/v2/rpm" // registers the rpm packager

	"github.com/dbdublk/dbdublk/ctl"
	"github.com/dbdublk/dbdublk/internal/protocol"
)

// Where the packages put each file.
const (
	binaryPath  = "/usr/sbin/dbdctl"
	unitPath    = "/usr/lib/systemd/system/dbdctl.service"
	modulesPath = "/usr/lib/modules-load.d/dbdctl.conf"
	manPagePath = "/usr/share/man/man8/dbdctl.8.gz"
	readmePath  = "/usr/share/doc/dbdctl/README.md"
	// The root volume, attached from boot (dbdctl attach --at-boot).
	initramfsHookPath   = "/usr/share/initramfs-tools/hooks/dbdctl"
	initramfsScriptPath = "/usr/share/initramfs-tools/scripts/local-premount/dbdctl"
	dracutSetupPath     = "/usr/lib/dracut/modules.d/90dbdctl/module-setup.sh"
	dracutHookPath      = "/usr/lib/dracut/modules.d/90dbdctl/dbdctl-root.sh"
	shutdownHookPath    = "/usr/lib/systemd/system-shutdown/dbdctl.shutdown"
	udevRulesPath       = "/usr/lib/udev/rules.d/60-dbdctl.rules"
	defaultOut          = "dist/out"
	defaultForms        = "deb,rpm"
)

func main() {
	out := flag.String("out", defaultOut, "directory the packages are written to")
	formats := flag.String("formats", defaultForms, "package formats, comma-separated (deb, rpm)")
	flag.Parse()
	paths, err := build(*out, strings.Split(*formats, ","))
	if err != nil {
		fmt.Fprintln(os.Stderr, "package:", err)
		os.Exit(1)
	}
	for _, p := range paths {
		fmt.Println(p)
	}
}

// build writes one package per format into out and returns their paths.
// It runs from the module's root (where go run starts it).
func build(out string, formats []string) ([]string, error) {
	if _, err := os.Stat("go.mod"); err != nil {
		return nil, errors.New("run from the repository's root (go run ./dist/cmd/package)")
	}
	stage, err := os.MkdirTemp("", "dbdctl-package-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(stage)
	binary := filepath.Join(stage, "dbdctl")
	if err := buildBinary(binary); err != nil {
		return nil, err
	}
	manPage := filepath.Join(stage, "dbdctl.8.gz")
	if err := writeManPage(manPage); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return nil, err
	}
	var paths []string
	for _, format := range formats {
		p, err := writePackage(format, out, binary, manPage)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", format, err)
		}
		paths = append(paths, p)
	}
	return paths, nil
}

// buildBinary builds the static dbdctl the packages carry.
func buildBinary(path string) error {
	cmd := exec.Command("go", "build", "-trimpath", "-o", path, "./ctl/dbdctl")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v: %s", err, b)
	}
	return nil
}

// writeManPage writes dbdctl(8), gzipped as man-db and the distributions
// keep pages.
func writeManPage(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	zw, _ := gzip.NewWriterLevel(f, gzip.BestCompression)
	if err := ctl.ManPage(zw); err != nil {
		f.Close()
		return err
	}
	if err := zw.Close(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// writePackage writes the package of one format and returns its path.
func writePackage(format, out, binary, manPage string) (string, error) {
	packager, err := nfpm.Get(format)
	if err != nil {
		return "", err
	}
	info := nfpm.WithDefaults(packageInfo(binary, manPage))
	if err := nfpm.PrepareForPackager(info, format); err != nil {
		return "", err
	}
	path := filepath.Join(out, packager.ConventionalFileName(info))
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	if err := packager.Package(info, f); err != nil {
		f.Close()
		os.Remove(path)
		return "", err
	}
	return path, f.Close()
}

// packageInfo describes the package: the same contents and scripts for
// every format.
func packageInfo(binary, manPage string) *nfpm.Info {
	file := func(src, dst string, mode os.FileMode) *files.Content {
		return &files.Content{Source: src, Destination: dst, FileInfo: &files.ContentFileInfo{Mode: mode}}
	}
	return &nfpm.Info{
		Name:        "dbdctl",
		Arch:        runtime.GOARCH,
		Version:     protocol.Version,
		Release:     "1",
		Section:     "admin",
		Priority:    "optional",
		Maintainer:  "dbdctl maintainers <maintainers@users.noreply.r-seed-a3e8a36c.example>",
		Description: "Live snapshots and incremental backups of block devices through ublk\n dattobd's snapshot and incremental-backup commands, served from userspace\n through the kernel's ublk driver: no out-of-tree module.",
		Homepage:    "https://github.com/dbdublk/dbdublk",
		Overridables: nfpm.Overridables{
			Recommends: []string{"kmod"},
			Contents: files.Contents{
				file(binary, binaryPath, 0o755),
				file("dist/dbdctl.service", unitPath, 0o644),
				file("dist/modules-load.d/dbdctl.conf", modulesPath, 0o644),
				file(manPage, manPagePath, 0o644),
				file("README.md", readmePath, 0o644),
				file("dist/initramfs-tools/hooks/dbdctl", initramfsHookPath, 0o755),
				file("dist/initramfs-tools/scripts/local-premount/dbdctl", initramfsScriptPath, 0o755),
				file("dist/dracut/90dbdctl/module-setup.sh", dracutSetupPath, 0o755),
				file("dist/dracut/90dbdctl/dbdctl-root.sh", dracutHookPath, 0o755),
				file("dist/system-shutdown/dbdctl.shutdown", shutdownHookPath, 0o755),
				file("dist/udev/60-dbdctl.rules", udevRulesPath, 0o644),
			},
			Scripts: nfpm.Scripts{
				PostInstall: "dist/scripts/postinstall.sh",
				PreRemove:   "dist/scripts/preremove.sh",
			},
		},
	}
}

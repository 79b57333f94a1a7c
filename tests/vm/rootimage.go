package vm

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// RootImage is a cached Debian system on a partitioned disk image, booted
// by a Machine with the kernel and initramfs found in its own /boot.
type RootImage struct {
	Initramfs Initramfs // the tool the system builds its initramfs with
	Disk      string    // raw GPT disk image; never booted itself, Machines boot copies
	Release   string    // uname -r of the installed kernel, e.g. "6.12.117+deb13-cloud-amd64"
	FSUUID    string    // UUID of the ext4 root file system on partition 1 (/dev/vda1)
}

const (
	// rootSuite is the Debian release installed on the root image.
	rootSuite = "trixie"
	// rootImageSize leaves room for packages tests install and a rebuilt
	// initramfs, and no more: tests copy and compare whole snapshots of it.
	// The image is sparse, so only the used blocks (about 300 MiB) take
	// space.
	rootImageSize = 1280 << 20
	// rootPartOffset is where partition 1, and so the file system, starts.
	// debugfs and mke2fs reach the file system through it without a loop
	// device.
	rootPartOffset = 1 << 20
	// rootFSUUID is fixed so that the kernel command line, /etc/fstab and
	// the cache metadata agree by construction.
	rootFSUUID = "6f0c5f4e-2d1b-4b8e-9a37-0db0dbd0b001"
	// rootHostname is the guest's /etc/hostname.
	rootHostname = "dbd-vm"
	// rootImageMeta records the release and UUID next to disk.img.
	rootImageMeta = "rootimage.json"
	// rootBuildTimeout bounds an image build (about a minute on a good
	// mirror) started by MachineAvailable.
	rootBuildTimeout = 15 * time.Minute
)

// Initramfs names the tool a root image builds its initramfs with: the
// two families dbdctl ships a boot hook for.
type Initramfs string

const (
	// InitramfsTools is Debian's and Ubuntu's own.
	InitramfsTools Initramfs = "initramfs-tools"
	// Dracut is the RHEL, Fedora and SUSE family's, packaged by Debian
	// too (it replaces initramfs-tools there), with systemd in the
	// initramfs as on those systems.
	Dracut Initramfs = "dracut"
)

// Valid reports whether k is one of the kinds a root image can be built with.
func (k Initramfs) Valid() bool { return k == InitramfsTools || k == Dracut }

// dracutConf makes dracut build a host-only initramfs, as Fedora and RHEL
// do by default (Debian's dracut builds generic ones): only what this
// machine boots with, so a rebuild in the guest is smaller and quicker
// (about two minutes under TCG). The image's first initramfs is built
// generic all the same, in mmdebstrap's chroot, whose host is not the
// guest.
const dracutConf = "# Written by github.com/dbdublk/dbdublk/tests/vm: the default of Fedora and RHEL.\nhostonly=\"yes\"\n"

// rootPackages are installed on top of mmdebstrap's minbase variant: what
// boots a Debian system the usual way (kernel, the initramfs builder,
// systemd, udev) and what tests run there (mkfs, mount, ps), with LVM
// (the initramfs then activates a root logical volume) for the tests that
// move / onto one.
func rootPackages(k Initramfs) []string {
	return append([]string{string(k)}, rootBasePackages...)
}

// rootImageName is the cache entry of the image k builds: suite, packages
// and size are in it, so a cached image of another content or layout is
// not taken for this one.
func rootImageName(k Initramfs) string {
	sum := sha256.Sum256([]byte(strings.Join(rootPackages(k), ",")))
	return fmt.Sprintf("rootfs-%s-%s-%dm-%x", rootSuite, k, rootImageSize>>20, sum[:4])
}

var rootBasePackages = []string{
	"systemd-sysv", "udev", "e2fsprogs", "kmod", "lvm2",
	"util-linux", "procps", "linux-image-cloud-amd64",
	// Debian systems have a system bus; without it systemctl reboot and
	// poweroff complain that they cannot reach logind.
	"dbus",
	// initramfs-tools recommends it and compresses with it by default;
	// without it update-initramfs warns and falls back to gzip.
	"zstd",
}

// rootMaskedUnits are units that would only slow a boot under TCG or wait
// for hardware and network the guest does not have. Masking (a link to
// /dev/null) is what an administrator would do.
var rootMaskedUnits = []string{
	"apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
	"e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer", "man-db.timer",
	// Nobody can log in: the console is a file. agetty would also fill
	// it with terminal queries.
	"getty.target", "getty-static.service", "serial-getty@.service",
	"systemd-firstboot.service",
	"systemd-networkd-wait-online.service", "systemd-timesyncd.service",
}

// rootImageMu serialises builds inside one process; other processes are
// handled by publishing the result with an atomic rename.
var rootImageMu sync.Mutex

// EnsureRootImage returns the cached root image whose initramfs is built
// by k, building it on first use (about a minute; needs root, mmdebstrap,
// sfdisk and mke2fs). Delete <CacheDir()>/rootfs-trixie-* to pick up newer
// Debian packages.
func EnsureRootImage(ctx context.Context, k Initramfs) (*RootImage, error) {
	if !k.Valid() {
		return nil, fmt.Errorf("vm: no root image is built with %q: want %s or %s", k, InitramfsTools, Dracut)
	}
	cache, err := CacheDir()
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(cache, rootImageName(k))

	rootImageMu.Lock()
	defer rootImageMu.Unlock()
	if img, err := loadRootImage(dir); err == nil {
		return img, nil
	}
	staging, err := newStagingDir(dir)
	if err != nil {
		return nil, err
	}
	if err := buildRootImage(ctx, staging, k); err != nil {
		os.RemoveAll(staging)
		return nil, err
	}
	if err := publishDir(staging, dir); err != nil {
		return nil, err
	}
	return loadRootImage(dir)
}

// rootImageInfo is the metadata file's content.
type rootImageInfo struct {
	Suite     string    `json:"suite"`
	Initramfs Initramfs `json:"initramfs,omitempty"` // empty in images made before dracut ones: initramfs-tools
	Release   string    `json:"release"`
	FSUUID    string    `json:"fsuuid"`
}

// loadRootImage reads a published cache entry.
func loadRootImage(dir string) (*RootImage, error) {
	b, err := os.ReadFile(filepath.Join(dir, rootImageMeta))
	if err != nil {
		return nil, err
	}
	var info rootImageInfo
	if err := json.Unmarshal(b, &info); err != nil {
		return nil, fmt.Errorf("vm: %s: %w", filepath.Join(dir, rootImageMeta), err)
	}
	if info.Initramfs == "" {
		info.Initramfs = InitramfsTools
	}
	img := &RootImage{Initramfs: info.Initramfs, Disk: filepath.Join(dir, "disk.img"), Release: info.Release, FSUUID: info.FSUUID}
	if _, err := os.Stat(img.Disk); err != nil {
		return nil, err
	}
	return img, nil
}

// buildRootImage installs Debian into a directory tree, adapts it for the
// rig and turns it into dir/disk.img, laid out as loadRootImage expects.
func buildRootImage(ctx context.Context, dir string, k Initramfs) error {
	if os.Geteuid() != 0 {
		return errors.New("vm: building the root image needs root (mmdebstrap --mode=root)")
	}
	for _, tool := range []struct{ bin, pkg string }{{"mmdebstrap", "mmdebstrap"}, {"sfdisk", "fdisk"}, {"mke2fs", "e2fsprogs"}} {
		if _, err := exec.LookPath(tool.bin); err != nil {
			return fmt.Errorf("vm: building the root image needs %s (Debian package %s)", tool.bin, tool.pkg)
		}
	}
	mirror, err := debianMirror()
	if err != nil {
		return err
	}
	tree := filepath.Join(dir, "tree")
	defer os.RemoveAll(tree)
	cmd := exec.CommandContext(ctx, "mmdebstrap", "--mode=root", "--variant=minbase",
		"--include="+strings.Join(rootPackages(k), ","), rootSuite, tree, mirror)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("vm: mmdebstrap %s from %s: %w\n%s", rootSuite, mirror, err, tail(string(out), 3000))
	}
	m, _ := filepath.Glob(filepath.Join(tree, "boot", "vmlinuz-*"))
	if len(m) != 1 {
		return fmt.Errorf("vm: root image has %d kernels in /boot, want 1", len(m))
	}
	release := strings.TrimPrefix(filepath.Base(m[0]), "vmlinuz-")
	if _, err := os.Stat(filepath.Join(tree, "boot", "initrd.img-"+release)); err != nil {
		return fmt.Errorf("vm: root image has no initramfs for %s: %w", release, err)
	}
	if err := customizeRootTree(tree, k); err != nil {
		return err
	}
	if err := makeRootDisk(ctx, filepath.Join(dir, "disk.img"), tree); err != nil {
		return err
	}
	b, err := json.MarshalIndent(rootImageInfo{Suite: rootSuite, Initramfs: k, Release: release, FSUUID: rootFSUUID}, "", "\t")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, rootImageMeta), append(b, '\n'), 0o644)
}

// customizeRootTree makes the installed tree a bootable, quiet guest: file
// system table, names, a root login without password on the serial
// console, the step service, and no units that wait for what is absent.
func customizeRootTree(tree string, k Initramfs) error {
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return err
	}
	files := map[string]string{
		"etc/hostname": rootHostname + "\n",
		"etc/hosts":    "127.0.0.1\tlocalhost\n127.0.1.1\t" + rootHostname + "\n::1\tlocalhost ip6-localhost ip6-loopback\n",
		"etc/fstab":    fmt.Sprintf("# Written by github.com/dbdublk/dbdublk/tests/vm.\nUUID=%s / ext4 errors=remount-ro 0 1\n", rootFSUUID),
		// A set machine-id keeps systemd out of first-boot mode, which
		// would run preset-all and prompt on the console.
		"etc/machine-id":                 hex.EncodeToString(id) + "\n",
		"etc/systemd/system/" + stepUnit: stepUnitText(),
	}
	if k == Dracut {
		files["etc/dracut.conf.d/50-hostonly.conf"] = dracutConf
	}
	for p, content := range files {
		if err := os.WriteFile(filepath.Join(tree, p), []byte(content), 0o644); err != nil {
			return fmt.Errorf("vm: root image: %w", err)
		}
	}
	shadow := filepath.Join(tree, "etc", "shadow")
	b, err := os.ReadFile(shadow)
	if err != nil {
		return fmt.Errorf("vm: root image: %w", err)
	}
	lines := strings.Split(string(b), "\n")
	found := false
	for i, l := range lines {
		if rest, ok := strings.CutPrefix(l, "root:"); ok {
			_, rest, _ = strings.Cut(rest, ":")
			lines[i], found = "root::"+rest, true
		}
	}
	if !found {
		return fmt.Errorf("vm: root image: no root entry in /etc/shadow")
	}
	if err := os.WriteFile(shadow, []byte(strings.Join(lines, "\n")), 0o640); err != nil {
		return fmt.Errorf("vm: root image: %w", err)
	}
	units := filepath.Join(tree, "etc", "systemd", "system")
	if err := os.MkdirAll(filepath.Join(units, "multi-user.target.wants"), 0o755); err != nil {
		return err
	}
	if err := os.Symlink("../"+stepUnit, filepath.Join(units, "multi-user.target.wants", stepUnit)); err != nil {
		return fmt.Errorf("vm: root image: enable %s: %w", stepUnit, err)
	}
	for _, u := range rootMaskedUnits {
		// Drop the enablement links too, so no target asks for a masked unit.
		links, _ := filepath.Glob(filepath.Join(units, "*.wants", u))
		for _, l := range links {
			os.Remove(l)
		}
		if err := os.Symlink("/dev/null", filepath.Join(units, u)); err != nil {
			return fmt.Errorf("vm: root image: mask %s: %w", u, err)
		}
	}
	return markUpdated(tree)
}

// markUpdated writes the stamps systemd-update-done leaves after a first
// boot, so that every Machine's first boot does not rebuild the journal
// catalog and ld.so cache (ConditionNeedsUpdate compares them with /usr).
func markUpdated(tree string) error {
	usr, err := os.Stat(filepath.Join(tree, "usr"))
	if err != nil {
		return err
	}
	stamp := fmt.Sprintf("# Written by github.com/dbdublk/dbdublk/tests/vm in place of systemd-update-done.\nTIMESTAMP_NSEC=%d\n", usr.ModTime().UnixNano())
	for _, d := range []string{"etc", "var"} {
		p := filepath.Join(tree, d, ".updated")
		if err := os.WriteFile(p, []byte(stamp), 0o644); err != nil {
			return err
		}
		if err := os.Chtimes(p, usr.ModTime(), usr.ModTime()); err != nil {
			return err
		}
	}
	return nil
}

// makeRootDisk writes a sparse GPT disk image with one Linux partition from
// rootPartOffset to the end, holding an ext4 file system made from tree.
// mke2fs writes into the partition through its offset, so no loop device
// (and no privilege beyond reading tree) is needed.
func makeRootDisk(ctx context.Context, img, tree string) error {
	f, err := os.Create(img)
	if err != nil {
		return err
	}
	err = f.Truncate(rootImageSize)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	table := fmt.Sprintf("label: gpt\nstart=%d, type=linux\n", rootPartOffset/512)
	sf := exec.CommandContext(ctx, "sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", img)
	sf.Stdin = strings.NewReader(table)
	if out, err := sf.CombinedOutput(); err != nil {
		return fmt.Errorf("vm: sfdisk %s: %w\n%s", img, err, out)
	}
	start, sectors, err := firstPartition(ctx, img)
	if err != nil {
		return err
	}
	if start*512 != rootPartOffset {
		return fmt.Errorf("vm: sfdisk put partition 1 at sector %d, want %d", start, rootPartOffset/512)
	}
	sizeK := sectors * 512 / 1024
	mk := exec.CommandContext(ctx, "mke2fs", "-q", "-F", "-t", "ext4", "-U", rootFSUUID, "-L", "dbd-root",
		"-d", tree, "-E", fmt.Sprintf("offset=%d", rootPartOffset), img, fmt.Sprintf("%dk", sizeK))
	if out, err := mk.CombinedOutput(); err != nil {
		return fmt.Errorf("vm: mke2fs of the root file system: %w\n%s", err, tail(string(out), 3000))
	}
	return nil
}

// firstPartition reads partition 1's start and size, in 512-byte sectors,
// back from the image: sfdisk rounds the end to its alignment.
func firstPartition(ctx context.Context, img string) (start, size int64, err error) {
	out, err := exec.CommandContext(ctx, "sfdisk", "--json", img).Output()
	if err != nil {
		return 0, 0, fmt.Errorf("vm: sfdisk --json %s: %w", img, err)
	}
	var t struct {
		PartitionTable struct {
			SectorSize int64 `json:"sectorsize"`
			Partitions []struct {
				Start int64 `json:"start"`
				Size  int64 `json:"size"`
			} `json:"partitions"`
		} `json:"partitiontable"`
	}
	if err := json.Unmarshal(out, &t); err != nil {
		return 0, 0, fmt.Errorf("vm: sfdisk --json %s: %w", img, err)
	}
	pt := t.PartitionTable
	if len(pt.Partitions) != 1 || (pt.SectorSize != 0 && pt.SectorSize != 512) {
		return 0, 0, fmt.Errorf("vm: %s: unexpected partition table %s", img, out)
	}
	return pt.Partitions[0].Start, pt.Partitions[0].Size, nil
}

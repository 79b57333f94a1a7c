package tests

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dbdublk/dbdublk/tests/vm"
)

// rootCommon is sourced by every boot of TestRootVolume: checks that
// print what they checked, or stop the boot with a failure.
const rootCommon = `
set -eu
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ok() { echo "@@OK $(date +%T) $*"; }
fail() { echo "@@FAIL $*"; exit 1; }
# The backup image the walkthrough keeps up to date: a file on the third
# disk, as a backup server would keep it.
img=/backup/root.img
mkdir -p /backup
blkid /dev/vdc >/dev/null 2>&1 || mkfs.ext4 -q /dev/vdc
mountpoint -q /backup || mount /dev/vdc /backup
size() { blockdev --getsize64 "$1"; }
# same: the image equals the snapshot, byte for byte.
same() { cmp -n "$(size /dev/datto0)" /dev/datto0 "$img" || fail "the image differs from the snapshot: $1"; ok "image equals snapshot: $1"; }
# served: / is mounted from the front device, its server runs as @dbdctl
# (it survived the switch to the real root), the unit is healthy.
served() {
	[ "$(findmnt -n -o SOURCE /)" = /dev/ublkb0 ] || fail "/ is mounted from $(findmnt -n -o SOURCE /), not /dev/ublkb0"
	grep -qas '^@dbdctl.serve' /proc/[0-9]*/cmdline || fail "no @dbdctl server runs"
	systemctl is-active dbdctl.service >/dev/null || fail "dbdctl.service is $(systemctl is-active dbdctl.service)"
	dbdctl info 0 | grep -q '"attached_at_boot": true' || fail "info does not say minor 0 is attached at boot"
	ok "/ served through /dev/ublkb0 by @dbdctl; dbdctl.service active"
}
# work writes changes that the next incremental must carry.
work() {
	dd if=/dev/urandom of="/root/$1" bs=64k count=64 conv=fsync 2>/dev/null
	dd if=/dev/urandom of=/root/grow bs=4k count=16 seek=$(($(od -An -N2 -tu2 /dev/urandom) % 512)) conv=notrunc,fsync 2>/dev/null
	rm -f /root/gone; cp /usr/sbin/dbdctl /root/gone; sync
}
log=/run/dbdctl/log/ublk0.log
# initrd_has: the running kernel's initramfs holds this path, whichever
# tool built it.
# The whole listing is read first: grep -q stopping early breaks the pipe.
initrd_has() {
	if command -v lsinitramfs >/dev/null; then set -- "$1" lsinitramfs; else set -- "$1" lsinitrd; fi
	listing=$($2 /boot/initrd.img-$(uname -r))
	echo "$listing" | grep -qE "(^| )$1\$"
}
`

// rootResumedClean checks, after a clean reboot, that the boot resumed
// incremental tracking from a clean COW file: no full backup, nothing
// recovered.
const rootResumedClean = `
served
dbdctl info 0 | grep -q '"mode": "incremental"' || fail "not incremental after a clean reboot: $(dbdctl info 0)"
grep -q 'reloaded incremental mode' $log || fail "the boot did not reload the tracking: $(cat $log)"
if grep -q 'not closed cleanly' $log; then fail "the clean shutdown left the COW file dirty: $(cat $log)"; fi
ok "clean reboot: incremental resumed from a clean COW file"
`

// rootExactIncremental writes, takes the next snapshot, brings the image
// to it with update-img, checks it byte for byte and fsck clean, and
// powers off.
const rootExactIncremental = `
work b
dbdctl transition-to-snapshot /.datto1 0
dbdctl update-img /dev/datto0 /.datto $img
same "first incremental after a clean reboot"
e2fsck -fn $img >/dev/null || fail "the image is not a clean filesystem"
ok "image fsck clean"
systemctl poweroff
`

// TestRootVolume installs the .deb into a real Debian root filesystem
// booted with systemd, attaches its root partition from boot and runs
// dattobd's walkthrough on / (setup-snapshot /dev/vda1 /.datto 0, dd,
// transition-to-incremental, transition-to-snapshot /.datto1, update-img,
// rm /.datto, again), then checks that a clean reboot resumes incremental
// tracking with a clean COW file (no full backup, nothing recovered) and
// that a power cut resumes it from the write-intent record, exactly: each
// incremental brings the image to the new snapshot byte for byte.
func TestRootVolume(t *testing.T) {
	_, boot := newRootMachine(t, vm.InitramfsTools)

	// 1: installed as a user would; the root volume refused live, with
	// the way out named; attached from boot from the next boot on.
	boot("install", `
dpkg -i /mnt/files/dbdctl.deb
systemctl is-enabled dbdctl.service >/dev/null || fail "dbdctl.service not enabled by the package"
if out=$(dbdctl attach /dev/vda1 0 2>&1); then fail "attach of the mounted root partition worked"; fi
echo "$out" | grep -q -- "--at-boot" || fail "attach of / does not name the way: $out"
[ "$(echo "$out" | wc -l)" = 1 ] || fail "attach of / said more than one line: $out"
ok "attach of mounted / refused: $out"
dbdctl attach --at-boot /dev/vda1 0
initrd_has usr/sbin/dbdctl || fail "the initramfs lacks dbdctl"
ok "attached at boot"
systemctl reboot
`, false)

	// 2: served from boot; dattobd's walkthrough on /; a clean reboot.
	walk := boot("walkthrough", `
served
dbdctl setup-snapshot /dev/vda1 /.datto 0
ok "snapshot taken"
dd if=/dev/datto0 of=$img bs=1M conv=sparse 2>/dev/null
ok "first full backup"
dbdctl transition-to-incremental 0
work a
dbdctl transition-to-snapshot /.datto1 0
dbdctl update-img /dev/datto0 /.datto $img
same "update-img from /.datto"
rm /.datto
dbdctl transition-to-incremental 0
work b
dbdctl transition-to-snapshot /.datto 0
dbdctl img-merge /dev/datto0 /.datto1 $img
same "img-merge from /.datto1"
rm /.datto1
dbdctl transition-to-incremental 0
work c
ok "walkthrough done; rebooting cleanly"
systemctl reboot
`, false)
	checkEndedInPlace(t, walk)

	// 3: the clean reboot resumed the tracking from a clean COW file;
	// the incremental is exact. Then a power cut under writes.
	boot("after clean reboot", rootResumedClean+`
work d
dbdctl transition-to-snapshot /.datto1 0
dbdctl update-img /dev/datto0 /.datto $img
same "first incremental after a clean reboot"
rm /.datto
dbdctl transition-to-incremental 0
work e
dd if=/dev/urandom of=/root/cut bs=4k count=4096 oflag=direct 2>/dev/null &
sleep 3
echo "@@OK power cut under writes"
echo b >/proc/sysrq-trigger
`, true)

	// 4: the power cut is recovered from the write-intent record; the
	// incremental is still exact and the image a clean filesystem.
	boot("after power cut", `
served
dbdctl info 0 | grep -q '"mode": "incremental"' || fail "not incremental after a power cut: $(dbdctl info 0)"
if dbdctl info 0 | grep -q '"error": -'; then fail "tracking failed after a power cut: $(dbdctl info 0)"; fi
grep -q 'replayed its write-intent record' $log || fail "the power cut was not recovered from the write-intent record: $(cat $log)"
ok "power cut: incremental resumed from the write-intent record"
dbdctl transition-to-snapshot /.datto 0
dbdctl update-img /dev/datto0 /.datto1 $img
same "first incremental after a power cut"
e2fsck -fn $img >/dev/null || fail "the image is not a clean filesystem"
ok "image fsck clean"
systemctl poweroff
`, false)
}

// TestRootVolumeDracut is TestRootVolume's route on a dracut system (the
// RHEL, Fedora and SUSE family's initramfs, with systemd in it): the .deb
// installed, / attached at boot through the dracut module, a snapshot and
// the first incremental's tracking, a clean reboot through systemd's
// shutdown (and dracut's return to the initramfs, when it does), and the
// tracking resumed from a clean COW file with an exact incremental. Power
// cuts take the same server path on either initramfs; TestRootVolume cuts
// the power.
func TestRootVolumeDracut(t *testing.T) {
	requireRootMatrix(t)
	_, boot := newRootMachine(t, vm.Dracut)

	boot("install", `
dpkg -i /mnt/files/dbdctl.deb
dbdctl attach --at-boot /dev/vda1 0 | grep -q 'dracut' || fail "attach --at-boot did not rebuild the initramfs with dracut"
initrd_has usr/sbin/dbdctl || fail "the initramfs lacks dbdctl"
lsinitrd /boot/initrd.img-$(uname -r) | grep -q 'pre-mount/10-dbdctl-root.sh$' || fail "the initramfs lacks dbdctl's pre-mount hook"
ok "attached at boot; dracut's initramfs carries dbdctl and its hook"
systemctl reboot
`, false)

	walk := boot("snapshot and tracking", `
served
dbdctl setup-snapshot /dev/vda1 /.datto 0
dd if=/dev/datto0 of=$img bs=1M conv=sparse 2>/dev/null
ok "first full backup"
dbdctl transition-to-incremental 0
work a
ok "tracking; rebooting cleanly"
systemctl reboot
`, false)
	checkEndedInPlace(t, walk)

	boot("after clean reboot", rootResumedClean+rootExactIncremental, false)
}

// TestRootVolumeLVM runs testRootVolumeLVM with dracut's initramfs in
// just test, and with initramfs-tools' too in the root matrix: with
// TestRootVolume (initramfs-tools, a partition) every initramfs and
// layout is booted in just test, and every pair of them in the matrix.
func TestRootVolumeLVM(t *testing.T) {
	kinds := []vm.Initramfs{vm.Dracut}
	if rootMatrix() {
		kinds = append(kinds, vm.InitramfsTools)
	}
	for _, k := range kinds {
		t.Run(string(k), func(t *testing.T) { testRootVolumeLVM(t, k) })
	}
}

// rootMatrix reports whether the root matrix's further boots run:
// DBD_ROOT_MATRIX=1 (just soak sets it). A systemd boot takes 30-40 s
// under TCG and an initramfs rebuild two minutes, so just test boots each
// initramfs and each layout once, not every pair.
func rootMatrix() bool { return os.Getenv("DBD_ROOT_MATRIX") != "" }

func requireRootMatrix(t *testing.T) {
	t.Helper()
	if !rootMatrix() {
		t.Skip("the root matrix's dracut-on-a-partition boots: set DBD_ROOT_MATRIX=1 (just soak does); TestRootVolumeLVM boots dracut in just test")
	}
}

// testRootVolumeLVM moves / onto a logical volume (an LVM volume group on
// a second disk, /boot left on the first disk's partition and bound into
// the new root, where the boot loader finds it), then takes the boot route
// as a user whose root is on LVM would: live insertion under / refused
// with the way out named, the root LV attached at boot by its LVM path
// (the initramfs attaches it once LVM has activated it), a snapshot of it
// by that path, tracking, a clean reboot resuming the tracking from a
// clean COW file, and an exact incremental.
func testRootVolumeLVM(t *testing.T, k vm.Initramfs) {
	m, boot := newRootMachine(t, k, vm.Disk{Path: "pv.img", Size: 2 << 30})

	boot("move / onto LVM", `
pvcreate -q /dev/vdd
vgcreate -q dbdvg /dev/vdd
lvcreate -q -y -n root -l 100%FREE dbdvg
mkfs.ext4 -q -L lvroot /dev/dbdvg/root
mkdir -p /new
mount /dev/dbdvg/root /new
cp -ax / /new
rm -rf /new/boot/*
mkdir -p /new/oldroot
cat >/new/etc/fstab <<FSTAB
/dev/mapper/dbdvg-root / ext4 errors=remount-ro 0 1
UUID=$(findmnt -n -o UUID /) /oldroot ext4 defaults 0 2
/oldroot/boot /boot none bind 0 0
FSTAB
umount /new
ok "/ copied onto /dev/dbdvg/root"
systemctl poweroff
`, false)
	m.Root = "/dev/mapper/dbdvg-root"

	boot("install", `
[ "$(findmnt -n -o SOURCE /)" = /dev/mapper/dbdvg-root ] || fail "/ is $(findmnt -n -o SOURCE /), not the logical volume"
mountpoint -q /boot || fail "/boot is not mounted"
dpkg -i /mnt/files/dbdctl.deb
if out=$(dbdctl attach /dev/dbdvg/root 0 2>&1); then fail "live insertion under / worked"; fi
echo "$out" | grep -q -- "--at-boot" || fail "attach of / on LVM does not name the way: $out"
ok "live insertion under / refused: $out"
dbdctl attach --at-boot /dev/dbdvg/root 0
initrd_has usr/sbin/dbdctl || fail "the initramfs lacks dbdctl"
initrd_has usr/sbin/lvm || fail "the initramfs lacks lvm"
ok "the root LV attached at boot"
systemctl reboot
`, false)

	walk := boot("snapshot and tracking", `
served
dbdctl info 0 | grep -q '"block_device": "/dev/dbdvg/root"' || fail "minor 0 does not name the logical volume as attach --at-boot did: $(dbdctl info 0)"
dbdctl setup-snapshot /dev/dbdvg/root /.datto 0
dd if=/dev/datto0 of=$img bs=1M conv=sparse 2>/dev/null
ok "snapshot of the root LV by its LVM path; first full backup"
dbdctl transition-to-incremental 0
work a
ok "tracking; rebooting cleanly"
systemctl reboot
`, false)
	checkEndedInPlace(t, walk)

	boot("after clean reboot", rootResumedClean+rootExactIncremental, false)
}

// rootBoot boots a root machine once: name labels its output, script runs
// after rootCommon, powerCut says the script ends the boot with one.
type rootBoot func(name, script string, powerCut bool) *vm.Result

// newRootMachine returns the boot function of a fresh Debian machine whose
// initramfs k builds, with the .deb on its files disk and a backup disk
// (/dev/vdc) that keeps the image across boots; disks follow from
// /dev/vdd (a relative Path is in the machine's work directory). A boot
// whose script fails
// or that ends otherwise than powerCut says fails the test.
func newRootMachine(t *testing.T, k vm.Initramfs, disks ...vm.Disk) (*vm.Machine, rootBoot) {
	t.Helper()
	vm.RequireMachine(t, k)
	if testing.Short() {
		t.Skip("boots a Debian root filesystem several times")
	}
	ctx := context.Background()
	work := t.TempDir()
	if os.Getenv("DBD_VM_KEEP") != "" {
		// The machine's disk and every boot's console stay for a look.
		var err error
		if work, err = os.MkdirTemp("", "dbd-machine-"); err != nil {
			t.Fatal(err)
		}
		t.Logf("keeping the machine in %s", work)
	}
	deb := buildDeb(t, work)
	m, err := vm.NewMachine(ctx, filepath.Join(work, "machine"), k)
	if err != nil {
		t.Fatal(err)
	}
	image := vm.Disk{Path: filepath.Join(work, "image.img"), Size: 4 << 30}
	for i := range disks {
		if !filepath.IsAbs(disks[i].Path) {
			disks[i].Path = filepath.Join(work, disks[i].Path)
		}
	}
	disks = append([]vm.Disk{image}, disks...)
	return m, func(name, script string, powerCut bool) *vm.Result {
		t.Helper()
		res, err := m.Boot(ctx, vm.BootConfig{
			Script:   rootCommon + script,
			Files:    map[string]string{"/dbdctl.deb": deb},
			Disks:    disks,
			PowerCut: powerCut,
			Timeout:  12 * time.Minute,
			Logf:     t.Logf,
		})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		for _, line := range strings.Split(res.Output, "\n") {
			if strings.HasPrefix(line, "@@") {
				t.Logf("%s: %s", name, line)
			}
		}
		if res.ExitCode != 0 || strings.Contains(res.Output, "@@FAIL") {
			t.Fatalf("%s failed (exit %d):\n%s\nconsole:\n%s", name, res.ExitCode, res.Output, tailLines(res.Console, 60))
		}
		if powerCut != res.PoweredOff {
			t.Fatalf("%s: powered off %v, want %v:\n%s", name, res.PoweredOff, powerCut, res.Output)
		}
		t.Logf("%s: booted in %v", name, res.BootTime.Round(time.Second))
		return res
	}
}

// checkEndedInPlace fails the test unless the system-shutdown hook ended
// the root volume's tracking in place during the boot res ended with.
func checkEndedInPlace(t *testing.T, res *vm.Result) {
	t.Helper()
	if strings.Contains(res.Console, "dbdctl.shutdown failed") || !strings.Contains(res.Console, "ended in place") {
		t.Fatalf("the system-shutdown hook did not end the root volume in place:\n%s", tailLines(res.Console, 30))
	}
	// systemd warns on the console of every boot about a unit it
	// deprecates: the boot server's must not be one.
	if i := strings.Index(res.Console, "dbdctl-boot.service"); i >= 0 && strings.Contains(res.Console, "Support for KillMode=none is deprecated") {
		t.Fatalf("systemd warns about the boot server's unit:\n%s", res.Console[i:min(len(res.Console), i+400)])
	}
}

// buildDeb builds the .deb as `just package` does.
func buildDeb(t *testing.T, work string) string {
	t.Helper()
	out := filepath.Join(work, "pkg")
	cmd := exec.Command("go", "run", "./dist/cmd/package", "-out", out, "-formats", "deb")
	cmd.Dir = ".."
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the .deb: %v\n%s", err, b)
	}
	debs, _ := filepath.Glob(filepath.Join(out, "*.deb"))
	if len(debs) != 1 {
		t.Fatalf("built %v, want one .deb", debs)
	}
	if _, err := os.Stat(debs[0]); err != nil {
		t.Fatal(err)
	}
	return debs[0]
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

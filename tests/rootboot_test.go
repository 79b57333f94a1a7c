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
	vm.RequireMachine(t)
	if testing.Short() {
		t.Skip("boots a Debian root filesystem four times")
	}
	ctx := context.Background()
	work := t.TempDir()
	deb := buildDeb(t, work)
	m, err := vm.NewMachine(ctx, filepath.Join(work, "machine"))
	if err != nil {
		t.Fatal(err)
	}
	image := vm.Disk{Path: filepath.Join(work, "image.img"), Size: 4 << 30}
	boot := func(name, script string, powerCut bool) *vm.Result {
		t.Helper()
		res, err := m.Boot(ctx, vm.BootConfig{
			Script:   rootCommon + script,
			Files:    map[string]string{"/dbdctl.deb": deb},
			Disks:    []vm.Disk{image},
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
lsinitramfs /boot/initrd.img-$(uname -r) | grep -q '^usr/sbin/dbdctl$' || fail "the initramfs lacks dbdctl"
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
	if strings.Contains(walk.Console, "dbdctl.shutdown failed") || !strings.Contains(walk.Console, "ended in place") {
		t.Fatalf("the system-shutdown hook did not end the root volume in place:\n%s", tailLines(walk.Console, 30))
	}

	// 3: the clean reboot resumed the tracking from a clean COW file;
	// the incremental is exact. Then a power cut under writes.
	boot("after clean reboot", `
served
dbdctl info 0 | grep -q '"mode": "incremental"' || fail "not incremental after a clean reboot: $(dbdctl info 0)"
grep -q 'reloaded incremental mode' $log || fail "the boot did not reload the tracking: $(cat $log)"
if grep -q 'not closed cleanly' $log; then fail "the clean shutdown left the COW file dirty: $(cat $log)"; fi
ok "clean reboot: incremental resumed from a clean COW file"
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

// Package tests runs the project's integration tests: it builds dbdctl and
// the guest test binary, boots a real Linux kernel with ublk_drv under qemu
// (tests/vm) and reports every guest test as a subtest here.
package tests

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dbdublk/dbdublk/tests/vm"
)

// guestPrograms are the real clients the guest tests drive.
var guestPrograms = []string{
	"mkfs.ext4", "mke2fs", "e2fsck", "fio", "/usr/sbin/blkdiscard", "blockdev",
	"mkfs.xfs", "xfs_repair", "qemu-img", "/usr/bin/cmp", "mountpoint",
	"dmsetup", "mkfs.btrfs", "btrfs", "losetup", "lvm",
}

// guestResult is one guest test's verdict.
var guestResult = regexp.MustCompile(`^\s*--- (PASS|FAIL|SKIP): (\S+) \(([0-9.]+)s\)`)

// TestGuest boots the VM once and runs every guest test against the real
// ublk driver of the rig's default kernel (6.12: copy mode). Set
// DBD_GUEST_RUN to a -test.run pattern to run a subset.
func TestGuest(t *testing.T) {
	run := os.Getenv("DBD_GUEST_RUN")
	if run == "" {
		run = "."
	}
	runGuest(t, "", run)
}

// zeroCopyTests are the guest tests TestGuestZeroCopy runs on 7.3: the
// front device's data path end to end (filesystems, fio's verify, discard,
// flush), the driver loading, the memory bound while tracking, a server killed and recovered mid-I/O, and
// snapshots and update-img over it, with the COW file on the volume too
// (its blocks read as zeros: the patch reads of the snapshot device).
// Live insertion and the ext4+xfs backup loop serve the same devices and
// stay with TestGuest (about 5 minutes each under TCG).
const zeroCopyTests = "^(TestNoUblkDriver|TestDataPath|TestUnalignedDirectIO|TestExt4OnFrontDevice|TestFioVerify|TestDiscardAndWriteZeroes|TestInfo|TestServerMemoryWhileTracking|TestServerKilled|TestKillUnderLoad|TestSnapshotSemantics|TestCowOnVolume)$"

// TestGuestZeroCopy is the kernel matrix's second column: Debian's 7.3
// kernel, whose ublk serves the front device zero copy (AUTO_BUF_REG), on
// the tests of the data path. DBD_GUEST_RUN narrows it too.
func TestGuestZeroCopy(t *testing.T) {
	run := zeroCopyTests
	if r := os.Getenv("DBD_GUEST_RUN"); r != "" {
		run = r
	}
	runGuest(t, "7.3", run)
}

// runGuest boots kernel series kernel ("" = the rig's default) once and
// runs the guest tests matching run in it.
func runGuest(t *testing.T, kernel, run string) {
	vm.Require(t)
	work := t.TempDir()
	dbdctl, guest := buildGuest(t, work)

	cfg := vm.Config{
		Kernel:    kernel,
		MemoryMiB: 2048,
		Disks: []vm.Disk{
			{Path: filepath.Join(work, "ext4.img"), Size: 512 << 20},
			{Path: filepath.Join(work, "fio.img"), Size: 512 << 20},
			{Path: filepath.Join(work, "spare.img"), Size: 64 << 20},
			{Path: filepath.Join(work, "scratch.img"), Size: 4 << 30},
			{Path: filepath.Join(work, "crash.img"), Size: 128 << 20},
			{Path: filepath.Join(work, "fault.img"), Size: 128 << 20},
			{Path: filepath.Join(work, "aux.img"), Size: 64 << 20},
			{Path: filepath.Join(work, "logged.img"), Size: 64 << 20},
			{Path: filepath.Join(work, "log.img"), Size: 1 << 30},
			{Path: filepath.Join(work, "lvm.img"), Size: 1 << 30},
			{Path: filepath.Join(work, "big.img"), Size: 64 << 30},
		},
		Files: map[string]string{
			"/usr/local/bin/dbdctl":     dbdctl,
			"/usr/local/bin/guest.test": guest,
		},
		Programs: guestPrograms,
		Modules:  []string{"ublk_drv", "xfs", "loop", "dm-mod", "dm-log-writes", "dm-thin-pool", "btrfs"},
		Script: fmt.Sprintf(`
export DBD_GUEST=1 DBD_CRASH_ITERS=%d %s
mkdir -p /mnt /var/log
if [ "%s" = 1 ]; then
	# DBD_GUEST_MONITOR=1: every 15 s, processes, the kernel stacks of
	# every thread blocked (D) or exiting (Z), and server logs to the
	# console (console.log of a DBD_VM_KEEP=1 run), to see a hang live.
	(while sleep 15; do
		echo "=== monitor"; ps -o pid,ppid,stat,args
		for t in /proc/[0-9]*/task/[0-9]*; do
			case "$(cut -d' ' -f3 $t/stat 2>/dev/null)" in D|Z)
				echo "--- $t $(cat $t/comm 2>/dev/null) $(cut -d' ' -f3 $t/stat 2>/dev/null)"; cat $t/stack 2>/dev/null;;
			esac
		done
		tail -n 5 /var/log/dbdctl/*.log
	done) >/dev/console 2>&1 &
fi
cd /tmp
/usr/local/bin/guest.test -test.v -test.count=1 -test.timeout=40m -test.run '%s'
`, crashIters(), passEnv("DBD_STORM_KILLS", "DBD_STORM_SEED", "DBD_REPLAY_POINTS"), os.Getenv("DBD_GUEST_MONITOR"), run),
		Timeout: 45 * time.Minute,
		Logf:    t.Logf,
	}
	res, err := vm.Run(context.Background(), cfg)
	if err != nil {
		t.Fatalf("VM run failed: %v", err)
	}
	t.Logf("guest booted in %v (%d boot(s))", res.BootTime, res.Boots)
	reportGuest(t, res)
}

// buildGuest builds dbdctl and the guest test binary into work.
func buildGuest(t *testing.T, work string) (dbdctl, guest string) {
	t.Helper()
	dbdctl = filepath.Join(work, "dbdctl")
	guest = filepath.Join(work, "guest.test")
	for _, args := range [][]string{
		{"build", "-o", dbdctl, "./ctl/dbdctl"},
		{"test", "-c", "-o", guest, "./tests/guest"},
	} {
		if err := vm.GoBuild(args...); err != nil {
			t.Fatal(err)
		}
	}
	return dbdctl, guest
}

// passEnv is the shell assignments of those of names that are set here,
// for the guest's tests.
func passEnv(names ...string) string {
	var out []string
	for _, n := range names {
		if v, ok := os.LookupEnv(n); ok {
			out = append(out, n+"="+strconv.Quote(v))
		}
	}
	return strings.Join(out, " ")
}

// crashIters is how many times the crash tests kill a server:
// $DBD_CRASH_ITERS, 7 by default (`just soak` runs 50).
func crashIters() int {
	var n int
	if _, err := fmt.Sscan(os.Getenv("DBD_CRASH_ITERS"), &n); err != nil || n <= 0 {
		return 7
	}
	return n
}

// reportGuest turns the guest's `go test -v` output into subtests, so each
// guest test passes or fails on its own line here.
func reportGuest(t *testing.T, res *vm.Result) {
	lines := strings.Split(res.Output, "\n")
	seen := 0
	var block []string
	for _, line := range lines {
		block = append(block, line)
		m := guestResult.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		seen++
		verdict, name := m[1], m[2]
		out := strings.Join(block, "\n")
		block = nil
		t.Run(name, func(t *testing.T) {
			switch verdict {
			case "FAIL":
				t.Errorf("guest test failed:\n%s", out)
			case "SKIP":
				t.Skipf("skipped in guest:\n%s", out)
			}
		})
	}
	if seen == 0 || res.ExitCode != 0 {
		t.Errorf("guest test binary exited %d after %d results\noutput:\n%s\nconsole tail:\n%s",
			res.ExitCode, seen, res.Output, tail(res.Console, 60))
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

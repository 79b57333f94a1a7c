package tests

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/dbdublk/dbdublk/tests/vm"
)

var powercutFigure = regexp.MustCompile(`@@POWERCUT (.*)`)

// TestPowerCut boots the VM again and again on the same disks: each boot
// checks the incremental the previous one left (reload-all at "boot", an
// incremental round compared byte for byte and block by block with the
// new snapshot, e2fsck of the image), then writes under fio load and ends
// with a power cut (sysrq b: memory and page cache lost; what the guest
// had written to its disks stays) or, every fifth boot, a clean shutdown
// (detach --all). $DBD_CRASH_ITERS power cuts and clean reboots in all.
func TestPowerCut(t *testing.T) {
	vm.Require(t)
	work := t.TempDir()
	dbdctl, guest := buildGuest(t, work)
	disks := []vm.Disk{
		{Path: filepath.Join(work, "data.img"), Size: 128 << 20},
		{Path: filepath.Join(work, "scratch.img"), Size: 1 << 30},
	}
	n := crashIters()
	cuts, cleans := 0, 0
	for boot := 0; boot <= n; boot++ {
		phase, end := "next", "cut"
		switch {
		case boot == 0:
			phase = "first"
		case boot == n:
			phase = "last"
		}
		if boot%5 == 4 {
			end = "clean"
		}
		res, err := vm.Run(context.Background(), vm.Config{
			Disks: disks,
			Files: map[string]string{
				"/usr/local/bin/dbdctl":     dbdctl,
				"/usr/local/bin/guest.test": guest,
			},
			Programs: guestPrograms,
			Modules:  []string{"ublk_drv"},
			PowerCut: true,
			Script: fmt.Sprintf(`
export DBD_GUEST=1 DBD_POWERCUT_PHASE=%s DBD_POWERCUT_END=%s
export DBDCTL_STATE_DIR=/scratch/pc/state DBDCTL_LOG_DIR=/scratch/pc/log
mkdir -p /mnt /var/log
cd /tmp
/usr/local/bin/guest.test -test.v -test.count=1 -test.timeout=5m -test.run '^TestPowerCutRound$'
`, phase, end),
			Timeout: 8 * time.Minute,
		})
		if err != nil {
			t.Fatalf("boot %d: VM run failed: %v", boot, err)
		}
		switch {
		case phase != "last" && end == "cut":
			// The guest's last lines may not reach the host before the
			// reset; the boot's own record of the cut (on the scratch disk)
			// is counted at the last boot.
			if !res.PoweredOff || strings.Contains(res.Output, "--- FAIL") {
				t.Fatalf("boot %d should have ended with a power cut (powered off %v, exit %d):\n%s",
					boot, res.PoweredOff, res.ExitCode, res.Output)
			}
			cuts++
		default:
			if res.PoweredOff || res.ExitCode != 0 || !strings.Contains(res.Output, "--- PASS: TestPowerCutRound") {
				t.Fatalf("boot %d (%s, %s) failed (exit %d, powered off %v):\n%s", boot, phase, end, res.ExitCode, res.PoweredOff, res.Output)
			}
			if phase != "last" {
				cleans++
			}
		}
		if phase == "last" {
			recorded := 0
			for _, m := range powercutFigure.FindAllStringSubmatch(res.Output, -1) {
				t.Logf("@@POWERCUT %s", m[1])
				if strings.Contains(m[1], "power cut") {
					recorded++
				}
			}
			if recorded != cuts {
				t.Fatalf("%d power cuts recorded by the guest, %d boots ended powered off", recorded, cuts)
			}
		}
	}
	t.Logf("%d power cuts and %d clean reboots, each followed by a checked incremental round", cuts, cleans)
}

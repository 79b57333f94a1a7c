package guest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Disks of the fault tests (see tests/integration_test.go).
const (
	diskFault = "/dev/vdf" // 128 MiB: failure, rollback and path tests
	diskAux   = "/dev/vdg" // 64 MiB: a filesystem under device-mapper's control
)

// dbdEnv runs dbdctl with env added to its environment (the servers it
// starts inherit it).
func dbdEnv(t *testing.T, env []string, args ...string) result {
	t.Helper()
	cmd := exec.Command(dbdctl, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("dbdctl %v: %v", args, err)
	}
	return r
}

// mustEnv is dbdEnv for a command that has to succeed.
func mustEnv(t *testing.T, env []string, args ...string) string {
	t.Helper()
	r := dbdEnv(t, env, args...)
	if r.code != 0 {
		t.Fatalf("dbdctl %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// privateState gives the test a state directory of its own (servers and
// reload-all see only the test's records) and returns the environment
// that selects it.
func privateState(t *testing.T) []string {
	t.Helper()
	dir := t.TempDir()
	return []string{"DBDCTL_STATE_DIR=" + dir}
}

// infoEnv is info under env.
func infoEnv(t *testing.T, env []string, minor string) infoDevice {
	t.Helper()
	doc := parseInfo(t, mustEnv(t, env, "info", minor))
	if len(doc.Devices) != 1 {
		t.Fatalf("info %s lists %d devices", minor, len(doc.Devices))
	}
	return doc.Devices[0]
}

func exists(path string) bool { _, err := os.Stat(path); return err == nil }

// frontWorks writes and reads back a file on the filesystem at dir.
func frontWorks(t *testing.T, dir string) {
	t.Helper()
	sh(t, fmt.Sprintf(`dd if=/dev/urandom of=/tmp/probe bs=64k count=4 2>/dev/null
		cp /tmp/probe %[1]s/probe && sync && cmp /tmp/probe %[1]s/probe && rm %[1]s/probe`, dir))
}

// TestFailurePersists: a tracker failure is durable and refused everywhere
// after it — a full COW store (EFBIG) and an I/O error on the change
// list (EIO, through device-mapper's error target under the COW file's
// filesystem): info shows dattobd's negative errno after detach and
// after a reload-all, every reload refuses the file with "a full backup
// is required", reload-all attaches the device untracked keeping the
// failure, and only destroy clears it.
func TestFailurePersists(t *testing.T) {
	ensureUblk(t)
	ensureScratch(t)
	env := privateState(t)
	const m = "12"
	dir := "/scratch/fail"
	must(t, "rm", "-rf", dir)
	must(t, "mkdir", "-p", dir)
	dumpLogOnFailure(t, 12)
	t.Cleanup(func() {
		exec.Command("umount", "/mnt12").Run()
		dbdEnv(t, env, "destroy", m)
		dbdEnv(t, env, "detach", m)
	})

	// A full store: a 1 MiB COW file for a 64 MiB device holds a few
	// dozen blocks; 8 MiB of overwrites fill it.
	mustEnv(t, env, "attach", diskFault, m)
	front := "/dev/ublkb" + m
	mountFront(t, front, "/mnt12")
	sh(t, "dd if=/dev/urandom of=/mnt12/a bs=1M count=8 conv=fsync 2>/dev/null")
	mustEnv(t, env, "setup-snapshot", "-f", "1", front, dir+"/cow1", m)
	sh(t, "dd if=/dev/urandom of=/mnt12/a bs=1M count=8 conv=notrunc,fsync 2>/dev/null")
	if d := infoEnv(t, env, m); d.Error == nil || *d.Error != -27 {
		t.Fatalf("after filling the store: error %v, want -27 (EFBIG)", d.Error)
	}
	frontWorks(t, "/mnt12")
	must(t, "umount", "/mnt12")
	mustEnv(t, env, "detach", m)

	for _, cmd := range [][]string{
		{"reload-snapshot", diskFault, dir + "/cow1", m},
		{"reload-incremental", diskFault, dir + "/cow1", m},
		{"attach", diskFault, m},
	} {
		r := dbdEnv(t, env, cmd...)
		checkOneLineError(t, r, "full backup")
		if exists(front) {
			t.Fatalf("%s attached a failed minor", cmd[0])
		}
	}
	if d := infoEnv(t, env, m); d.Error == nil || *d.Error != -27 || d.State == nil || *d.State != 1 {
		t.Fatalf("dormant failed minor: state %v error %v, want dormant snapshot (1) with -27", d.State, d.Error)
	}
	r := dbdEnv(t, env, "reload-all")
	if r.code != 0 || !strings.Contains(r.stderr, "a full backup is required") {
		t.Fatalf("reload-all of a failed minor: exit %d, stderr %q", r.code, r.stderr)
	}
	if d := infoEnv(t, env, m); d.Error == nil || *d.Error != -27 || d.Mode != "passthrough" {
		t.Fatalf("after reload-all: mode %s error %v, want passthrough with -27", d.Mode, d.Error)
	}
	must(t, "mount", front, "/mnt12")
	frontWorks(t, "/mnt12")
	mustEnv(t, env, "destroy", m)
	if d := infoEnv(t, env, m); d.Error == nil || *d.Error != 0 {
		t.Fatalf("after destroy: error %v, want 0", d.Error)
	}
	if exists(dir + "/cow1") {
		t.Error("destroy left the failed COW file")
	}

	// An I/O error on the change list, in incremental mode.
	sectors := strings.TrimSpace(must(t, "blockdev", "--getsz", diskAux))
	dmCreate(t, "cowfs", "0 "+sectors+" linear "+diskAux+" 0")
	t.Cleanup(func() { exec.Command("umount", "/mnt/cowfs").Run(); exec.Command("dmsetup", "remove", "cowfs").Run() })
	must(t, "mkfs.ext4", "-q", "-F", "/dev/mapper/cowfs")
	must(t, "mkdir", "-p", "/mnt/cowfs")
	must(t, "mount", "/dev/mapper/cowfs", "/mnt/cowfs")
	mustEnv(t, env, "setup-snapshot", front, "/mnt/cowfs/cow1", m)
	mustEnv(t, env, "transition-to-incremental", m)
	sh(t, "dd if=/dev/urandom of=/mnt12/b bs=1M count=4 conv=fsync 2>/dev/null")
	must(t, "dmsetup", "suspend", "--nolockfs", "cowfs")
	must(t, "dmsetup", "load", "cowfs", "--table", "0 "+sectors+" error")
	must(t, "dmsetup", "resume", "cowfs")
	// New regions: their write intent must be recorded, and cannot be.
	sh(t, "dd if=/dev/urandom of=/mnt12/c bs=1M count=24 conv=fsync 2>/dev/null")
	if d := infoEnv(t, env, m); d.Error == nil || *d.Error != -5 {
		t.Fatalf("after the change list failed: error %v, want -5 (EIO)", d.Error)
	}
	frontWorks(t, "/mnt12")
	checkOneLineError(t, dbdEnv(t, env, "transition-to-snapshot", dir+"/cow2", m), "has failed")
	must(t, "umount", "/mnt12")
	mustEnv(t, env, "detach", m)
	must(t, "umount", "/mnt/cowfs")
	must(t, "dmsetup", "suspend", "cowfs")
	must(t, "dmsetup", "load", "cowfs", "--table", "0 "+sectors+" linear "+diskAux+" 0")
	must(t, "dmsetup", "resume", "cowfs")
	must(t, "mount", "/dev/mapper/cowfs", "/mnt/cowfs")
	checkOneLineError(t, dbdEnv(t, env, "reload-incremental", diskFault, "/mnt/cowfs/cow1", m), "full backup")
	// The COW file alone (its state file lost) is refused too: its own
	// failure record could not be written while its storage failed, and
	// was written as soon as it could be (by the refused reload above).
	checkOneLineError(t, dbdEnv(t, []string{"DBDCTL_STATE_DIR=" + t.TempDir()}, "reload-incremental", diskFault, "/mnt/cowfs/cow1", m), "full backup")
	if exists(front) {
		t.Fatal("a refused reload left the front device")
	}
	must(t, "umount", "/mnt/cowfs")
}

// TestFailedRecoveryThenReboot: when the server that takes over after a
// kill cannot resume the tracking (its COW file is gone), the device keeps
// serving untracked, the failure is recorded, and a reboot (detach --all,
// reload-all) does not resume the old change list: it attaches the device
// untracked with the failure still shown.
func TestFailedRecoveryThenReboot(t *testing.T) {
	ensureUblk(t)
	ensureScratch(t)
	env := privateState(t)
	const m = "14"
	dir := "/scratch/failrec"
	must(t, "rm", "-rf", dir)
	must(t, "mkdir", "-p", dir)
	dumpLogOnFailure(t, 14)
	t.Cleanup(func() {
		exec.Command("umount", "/mnt14").Run()
		dbdEnv(t, env, "destroy", m)
		dbdEnv(t, env, "detach", m)
	})
	mustEnv(t, env, "attach", diskFault, m)
	front := "/dev/ublkb" + m
	mountFront(t, front, "/mnt14")
	mustEnv(t, env, "setup-snapshot", front, dir+"/cow1", m)
	mustEnv(t, env, "transition-to-incremental", m)
	sh(t, "dd if=/dev/urandom of=/mnt14/a bs=1M count=4 conv=fsync 2>/dev/null")
	must(t, "mv", dir+"/cow1", dir+"/cow1.away")
	pid := infoEnv(t, env, m).ServerPID
	kill(t, pid)
	waitNewServerEnv(t, env, m, pid)
	if d := infoEnv(t, env, m); d.Error == nil || *d.Error != -5 || d.Mode != "passthrough" {
		t.Fatalf("after a failed recovery: mode %s error %v, want passthrough with -5", d.Mode, d.Error)
	}
	frontWorks(t, "/mnt14")
	must(t, "mv", dir+"/cow1.away", dir+"/cow1")
	must(t, "umount", "/mnt14")
	mustEnv(t, env, "detach", "--all")
	r := dbdEnv(t, env, "reload-all")
	if r.code != 0 || !strings.Contains(r.stderr, "a full backup is required") {
		t.Fatalf("reload-all after a failed recovery: exit %d, stderr %q", r.code, r.stderr)
	}
	if d := infoEnv(t, env, m); d.Error == nil || *d.Error != -5 || d.Mode != "passthrough" {
		t.Fatalf("after the reboot: mode %s error %v, want passthrough with -5 (not the old change list resumed)", d.Mode, d.Error)
	}
}

// waitNewServerEnv waits for a server of minor other than old, under env.
func waitNewServerEnv(t *testing.T, env []string, minor string, old int) int {
	t.Helper()
	for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		r := dbdEnv(t, env, "info", minor)
		if r.code != 0 {
			continue
		}
		if d := parseInfo(t, r.stdout).Devices; len(d) == 1 && d[0].ServerPID != 0 && d[0].ServerPID != old && d[0].Status == "serving" {
			return d[0].ServerPID
		}
	}
	t.Fatalf("minor %s has no new server 90 s after pid %d died", minor, old)
	return 0
}

// TestRollback makes each step of setup-snapshot and the transitions that
// can fail fail (failpoints), and checks that the device is left exactly
// as it was: mode, snapshot device, COW files and state file unchanged,
// the filesystem working, and the change list still recording every write
// (a later round's image equals its snapshot). A step past the point of
// no return fails the tracking instead, durably.
func TestRollback(t *testing.T) {
	ensureUblk(t)
	ensureScratch(t)
	const m = "15"
	front, dir, mnt := "/dev/ublkb"+m, "/scratch/rollback", "/mnt15"
	dumpLogOnFailure(t, 15)
	cases := []struct {
		op, step string
		past     bool // past the point of no return: the tracking fails
	}{
		{"setup-snapshot", "create-cow", false},
		{"setup-snapshot", "freeze", false},
		{"setup-snapshot", "snapshot-device", false},
		{"setup-snapshot", "persist", false},
		{"transition-to-snapshot", "sync-change-list", false},
		{"transition-to-snapshot", "create-cow", false},
		{"transition-to-snapshot", "freeze", false},
		{"transition-to-snapshot", "snapshot-device", false},
		{"transition-to-snapshot", "persist", false},
		{"transition-to-snapshot", "close-change-list", true},
		{"transition-to-snapshot", "die-closing-change-list", true},
		{"transition-to-incremental", "freeze", false},
		{"transition-to-incremental", "truncate", true},
		{"transition-to-incremental", "enable-intent", true},
		{"transition-to-incremental", "persist", true},
	}
	must(t, "mkfs.ext4", "-q", "-F", diskFault)
	for _, c := range cases {
		t.Run(c.op+"/"+c.step, func(t *testing.T) {
			env := privateState(t)
			fp := append(env, "DBDCTL_FAILPOINTS="+c.op+"/"+c.step)
			must(t, "rm", "-rf", dir)
			must(t, "mkdir", "-p", dir, mnt)
			t.Cleanup(func() {
				exec.Command("umount", mnt).Run()
				dbdEnv(t, env, "destroy", m)
				dbdEnv(t, env, "detach", m)
			})
			mustEnv(t, fp, "attach", diskFault, m)
			must(t, "mount", front, mnt)
			sh(t, "dd if=/dev/urandom of="+mnt+"/a bs=1M count=2 conv=fsync 2>/dev/null")
			statePath := filepath.Join(strings.TrimPrefix(env[0], "DBDCTL_STATE_DIR="), m+".json")
			if c.op == "setup-snapshot" {
				before, _ := os.ReadFile(statePath)
				checkOneLineError(t, dbdEnv(t, fp, "setup-snapshot", front, dir+"/cow1", m), "")
				d := infoEnv(t, env, m)
				after, _ := os.ReadFile(statePath)
				switch {
				case d.Mode != "passthrough" || *d.Error != 0:
					t.Fatalf("after a failed setup: mode %s error %d", d.Mode, *d.Error)
				case exists(dir+"/cow1") || exists("/dev/datto"+m):
					t.Fatal("a failed setup left its COW file or snapshot device")
				case !bytes.Equal(before, after):
					t.Fatalf("a failed setup changed the state file:\n%s\n%s", before, after)
				}
				frontWorks(t, mnt)
				return
			}
			mustEnv(t, fp, "setup-snapshot", front, dir+"/cow1", m)
			image := dir + "/img"
			must(t, "dd", "if=/dev/datto"+m, "of="+image, "bs=1M")
			if c.op == "transition-to-incremental" {
				sh(t, "dd if=/dev/urandom of="+mnt+"/b bs=1M count=2 conv=fsync 2>/dev/null")
				r := dbdEnv(t, fp, "transition-to-incremental", m)
				checkOneLineError(t, r, "")
				d := infoEnv(t, env, m)
				if c.past {
					if *d.Error != -5 {
						t.Fatalf("a failure past the point of no return: error %d, want -5", *d.Error)
					}
					checkOneLineError(t, dbdEnv(t, env, "transition-to-snapshot", dir+"/cow2", m), "has failed")
					return
				}
				if d.Mode != "snapshot" || *d.Error != 0 || !exists("/dev/datto"+m) {
					t.Fatalf("after a failed transition-to-incremental: mode %s error %d", d.Mode, *d.Error)
				}
				must(t, "/usr/bin/cmp", image, "/dev/datto"+m)
				frontWorks(t, mnt)
				return
			}
			mustEnv(t, fp, "transition-to-incremental", m)
			sh(t, "dd if=/dev/urandom of="+mnt+"/b bs=1M count=2 conv=fsync 2>/dev/null")
			before, _ := os.ReadFile(statePath)
			if c.past {
				// The snapshot is taken; only its change list is lost.
				if strings.HasPrefix(c.step, "die-") {
					// The server dies there; the next one resumes the snapshot.
					old := infoEnv(t, env, m).ServerPID
					checkOneLineError(t, dbdEnv(t, fp, "transition-to-snapshot", dir+"/cow2", m), "dbdctl info "+m)
					waitNewServerEnv(t, env, m, old)
				} else {
					checkOneLineError(t, dbdEnv(t, fp, "transition-to-snapshot", dir+"/cow2", m), "full copy")
				}
				closedUnclean(t, env, m, diskFault, dir, image)
				return
			}
			checkOneLineError(t, dbdEnv(t, fp, "transition-to-snapshot", dir+"/cow2", m), "")
			d := infoEnv(t, env, m)
			after, _ := os.ReadFile(statePath)
			switch {
			case d.Mode != "incremental" || *d.Error != 0:
				t.Fatalf("after a failed transition-to-snapshot: mode %s error %d", d.Mode, *d.Error)
			case exists(dir+"/cow2") || exists("/dev/datto"+m):
				t.Fatal("a failed transition-to-snapshot left its COW file or snapshot device")
			case !bytes.Equal(before, after):
				t.Fatalf("a failed transition-to-snapshot changed the state file:\n%s\n%s", before, after)
			}
			// Writes during and after the failed attempt are in the change
			// list: restart the server without the failpoint and do a round.
			sh(t, "dd if=/dev/urandom of="+mnt+"/c bs=1M count=2 conv=fsync 2>/dev/null")
			must(t, "umount", mnt)
			mustEnv(t, env, "detach", m)
			mustEnv(t, env, "reload-incremental", diskFault, dir+"/cow1", m)
			mustEnv(t, env, "transition-to-snapshot", dir+"/cow2", m)
			mustEnv(t, env, "update-img", "/dev/datto"+m, dir+"/cow1", image)
			must(t, "/usr/bin/cmp", image, "/dev/datto"+m)
			must(t, "e2fsck", "-fn", image)
		})
	}
}

// closedUnclean checks minor m after a transition-to-snapshot that took
// snapshot cow2 but could not close the change list cow1 (a failure, or
// a server killed just then): the snapshot serves, update-img refuses
// cow1 in one line that says a full backup is required and leaves the
// image alone, a full copy equals the snapshot, and the next round's
// change list (cow2) works.
func closedUnclean(t *testing.T, env []string, m, disk, dir, image string) {
	t.Helper()
	if d := infoEnv(t, env, m); d.Mode != "snapshot" || *d.Error != 0 || d.CowFile != dir+"/cow2" {
		t.Fatalf("after the change list could not be closed: mode %s error %d COW file %s", d.Mode, *d.Error, d.CowFile)
	}
	before := must(t, "sha256sum", image)
	checkOneLineError(t, dbdEnv(t, env, "update-img", "/dev/datto"+m, dir+"/cow1", image), "full backup")
	if after := must(t, "sha256sum", image); after != before {
		t.Fatal("a refused update-img changed the image")
	}
	must(t, "dd", "if=/dev/datto"+m, "of="+image, "bs=1M")
	must(t, "/usr/bin/cmp", image, "/dev/datto"+m)
	// A server without the failpoint takes the next round.
	mnt := "/mnt" + m
	must(t, "umount", mnt)
	mustEnv(t, env, "detach", m)
	mustEnv(t, env, "reload-snapshot", disk, dir+"/cow2", m)
	must(t, "mount", "/dev/ublkb"+m, mnt)
	mustEnv(t, env, "transition-to-incremental", m)
	sh(t, "dd if=/dev/urandom of="+mnt+"/d bs=1M count=2 conv=fsync 2>/dev/null")
	mustEnv(t, env, "transition-to-snapshot", dir+"/cow3", m)
	mustEnv(t, env, "update-img", "/dev/datto"+m, dir+"/cow2", image)
	must(t, "/usr/bin/cmp", image, "/dev/datto"+m)
	must(t, "e2fsck", "-fn", image)
}

// TestUnrecoverable: when no new server can keep the device (each one
// exits as soon as it has taken it over: failpoint recover/exit), the
// supervisor gives up in bounded time instead of holding the device's I/O
// for good: a write on the mounted filesystem ends with an error rather
// than hanging, info shows the device orphaned with the tracking failed
// (-5), detach removes it, and reloading its change list is refused: a
// full backup is required.
func TestUnrecoverable(t *testing.T) {
	ensureUblk(t)
	ensureScratch(t)
	env := append(privateState(t), "DBDCTL_FAILPOINTS=recover/exit")
	const m = "22"
	dir, mnt := "/scratch/unrec", "/mnt22"
	must(t, "rm", "-rf", dir)
	must(t, "mkdir", "-p", dir)
	dumpLogOnFailure(t, 22)
	t.Cleanup(func() {
		exec.Command("umount", mnt).Run()
		dbdEnv(t, env, "destroy", m)
		dbdEnv(t, env, "detach", m)
	})
	mustEnv(t, env, "attach", diskFault, m)
	front := "/dev/ublkb" + m
	mountFront(t, front, mnt)
	mustEnv(t, env, "setup-snapshot", front, dir+"/cow1", m)
	mustEnv(t, env, "transition-to-incremental", m)
	sh(t, "dd if=/dev/urandom of="+mnt+"/a bs=1M count=4 conv=fsync 2>/dev/null")
	kill(t, infoEnv(t, env, m).ServerPID)

	// Writes are held while servers come and go, then fail: none may hang.
	deadline := time.Now().Add(3 * time.Minute)
	for failed := false; !failed; {
		if time.Now().After(deadline) {
			t.Fatal("writes still succeed 3 minutes after the server died, with no server able to keep the device")
		}
		done := make(chan error, 1)
		go func() {
			done <- exec.Command("dd", "if=/dev/zero", "of="+mnt+"/probe", "bs=4k", "count=1", "oflag=direct", "conv=notrunc").Run()
		}()
		select {
		case err := <-done:
			failed = err != nil
		case <-time.After(maxStall + time.Minute):
			t.Fatalf("a write on the filesystem hangs (over %v) with no server able to keep the device", maxStall+time.Minute)
		}
		time.Sleep(200 * time.Millisecond)
	}
	d := infoEnv(t, env, m)
	if d.Status != "orphaned" || d.Error == nil || *d.Error != -5 {
		t.Fatalf("after the supervisor gave up: status %q, error %v; want orphaned with -5", d.Status, d.Error)
	}
	run(t, "umount", mnt)
	mustEnv(t, env, "detach", m)
	if exists(front) {
		t.Fatal("detach left the dead front device")
	}
	// Refused by the state record, and by the COW file itself.
	checkOneLineError(t, dbdEnv(t, env, "reload-incremental", diskFault, dir+"/cow1", m), "full backup")
	checkOneLineError(t, dbdEnv(t, privateState(t), "reload-incremental", diskFault, dir+"/cow1", m), "full backup")
	if exists(front) {
		t.Fatal("a refused reload left the front device")
	}
}

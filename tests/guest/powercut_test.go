package guest

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The power-cut loop is driven by the host (tests/powercut_test.go): it
// boots the VM again and again on the same disks, and each boot runs
// TestPowerCutRound once. A round checks the incremental left by the
// previous boot, then writes under load and ends the boot: with a power
// cut (sysrq b: the guest's memory, page cache included, is lost) or with
// a clean shutdown. State, COW files, the image and logs live on the
// scratch disk.
const (
	pcData    = "/dev/vda" // tracked
	pcScratch = "/dev/vdb"
	pcDir     = "/scratch/pc"
	pcMnt     = "/mnt0"
)

func TestPowerCutRound(t *testing.T) {
	phase := os.Getenv("DBD_POWERCUT_PHASE") // first, next or last
	end := os.Getenv("DBD_POWERCUT_END")     // cut or clean
	if phase == "" {
		t.Skip("run by the host's power-cut loop (tests/powercut_test.go)")
	}
	ensureUblk(t)
	front := "/dev/ublkb0"
	iter := 0
	if phase == "first" {
		must(t, "mkfs.ext4", "-q", "-F", pcScratch)
		must(t, "mkdir", "-p", "/scratch")
		must(t, "mount", pcScratch, "/scratch")
		must(t, "mkdir", "-p", pcDir)
		must(t, dbdctl, "attach", pcData, "0")
		mountFront(t, front, pcMnt)
		sh(t, "dd if=/dev/urandom of="+pcMnt+"/base bs=1M count=16 conv=fsync 2>/dev/null")
		must(t, dbdctl, "setup-snapshot", front, pcDir+"/cow0", "0")
		must(t, "dd", "if=/dev/datto0", "of="+pcDir+"/img", "bs=1M", "conv=fsync")
		must(t, dbdctl, "transition-to-incremental", "0")
	} else {
		must(t, "mkdir", "-p", "/scratch")
		must(t, "mount", pcScratch, "/scratch")
		b, err := os.ReadFile(pcDir + "/iter")
		if err != nil {
			t.Fatal(err)
		}
		iter, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		// What the boot unit does: bring back every recorded device.
		must(t, dbdctl, "reload-all")
		if d := info(t, "0").Devices[0]; d.Mode != "incremental" {
			t.Fatalf("after reload-all: mode %q", d.Mode)
		}
		must(t, "mkdir", "-p", pcMnt)
		must(t, "mount", front, pcMnt) // replays the journal: tracked writes
		prev, next := fmt.Sprintf("%s/cow%d", pcDir, iter), fmt.Sprintf("%s/cow%d", pcDir, iter+1)
		marked, changed := incrementalRound(t, "0", prev, next, pcDir+"/img")
		must(t, dbdctl, "transition-to-incremental", "0")
		os.Remove(prev)
		iter++
		appendFigure(t, fmt.Sprintf("round=%d blocks_marked=%d blocks_changed=%d", iter, marked, changed))
	}
	sh(t, fmt.Sprintf("echo %d > %s/iter && sync", iter, pcDir))
	if phase == "last" {
		out, _ := os.ReadFile(pcDir + "/figures")
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			t.Logf("@@POWERCUT %s", l)
		}
		must(t, "umount", pcMnt)
		must(t, "e2fsck", "-fn", front)
		must(t, dbdctl, "destroy", "0")
		must(t, dbdctl, "detach", "0")
		return
	}

	// Load, then the end of this boot.
	fio := exec.Command("fio", "--name=load", "--filename="+pcMnt+"/load", "--size=24M",
		"--rw=randwrite", "--bsrange=4k-64k", "--ioengine=io_uring", "--iodepth=16", "--direct=1",
		"--time_based", "--runtime=30", fmt.Sprintf("--randseed=%d", iter+1))
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(uint64(iter), 11))
	time.Sleep(time.Duration(300+rng.IntN(1500)) * time.Millisecond)
	if end == "clean" {
		// fio runs its job in a child process: stop them all, then unmount
		// once the job has let go of the filesystem.
		run(t, "killall", "fio")
		fio.Wait()
		umountRetry(t, pcMnt)
		must(t, dbdctl, "detach", "--all")
		appendFigure(t, fmt.Sprintf("end=%d clean shutdown", iter))
		umountRetry(t, "/scratch") // once the servers' supervisors have exited (they hold their logs)
		return
	}
	inflight := strings.Join(strings.Fields(sh(t, "cat /sys/block/ublkb0/inflight")), "/")
	appendFigure(t, fmt.Sprintf("end=%d power cut with reads/writes in flight %s", iter, inflight))
	fmt.Println("@@CUT")
	time.Sleep(300 * time.Millisecond) // let the line reach the host, best effort
	os.WriteFile("/proc/sysrq-trigger", []byte("b"), 0)
	time.Sleep(time.Minute)
	t.Fatal("the power cut did not stop the machine")
}

// umountRetry unmounts dir once whatever still holds it lets go (up to 30 s).
func umountRetry(t *testing.T, dir string) {
	t.Helper()
	sh(t, "for i in $(seq 300); do umount "+dir+" 2>/dev/null && exit 0; sleep 0.1; done; umount "+dir)
}

// appendFigure records one line on the scratch disk, durably, for the
// last boot to report.
func appendFigure(t *testing.T, line string) {
	t.Helper()
	f, err := os.OpenFile(pcDir+"/figures", os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintln(f, line)
	f.Sync()
	f.Close()
}

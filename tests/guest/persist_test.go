package guest

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dbdublk/dbdublk/cow"
)

// crashIters is how many kills a crash loop runs ($DBD_CRASH_ITERS).
func crashIters() int {
	n, err := strconv.Atoi(os.Getenv("DBD_CRASH_ITERS"))
	if err != nil || n <= 0 {
		return 20
	}
	return n
}

// mountFront makes an ext4 filesystem on front and mounts it on dir for
// the rest of the test.
func mountFront(t *testing.T, front, dir string) {
	t.Helper()
	must(t, "mkfs.ext4", "-q", "-F", front)
	must(t, "mkdir", "-p", dir)
	must(t, "mount", front, dir)
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
}

// checkIncremental checks the changed-block list cowPath against what
// really changed between the previous image and the new snapshot: every
// block that differs must be marked (a superset is allowed). It returns
// the blocks marked and the blocks that differ.
func checkIncremental(t *testing.T, cowPath, image, snapshot string) (marked, changed uint64) {
	t.Helper()
	s, err := cow.FileStorage(cowPath, true)
	if err != nil {
		t.Fatal(err)
	}
	c, _, err := cow.Open(cowPath, s, cow.ReadOnly, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(false)
	marked = c.NrChangedBlocks()
	a, err := os.Open(image)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := os.Open(snapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	const chunk = 1 << 20
	ba, bb := make([]byte, chunk), make([]byte, chunk)
	for off := int64(0); ; off += chunk {
		na, ea := io.ReadFull(a, ba)
		nb, _ := io.ReadFull(b, bb)
		if na != nb {
			t.Fatalf("%s and %s differ in size", image, snapshot)
		}
		for i := 0; i < na; i += cow.BlockSize {
			end := min(i+cow.BlockSize, na)
			if bytes.Equal(ba[i:end], bb[i:end]) {
				continue
			}
			changed++
			blk := uint64(off+int64(i)) / cow.BlockSize
			if e, err := c.Lookup(blk); err != nil || e == 0 {
				t.Fatalf("block %d changed but %s does not mark it (entry %d, %v)", blk, cowPath, e, err)
			}
		}
		if ea != nil {
			return marked, changed
		}
	}
}

// incrementalRound takes the next snapshot and brings the image up to
// date with update-img, then checks it: the changed-block list is a
// superset of the changes, the image equals the snapshot byte for byte and
// its filesystem is clean.
func incrementalRound(t *testing.T, m, prevCow, nextCow, image string) (marked, changed uint64) {
	t.Helper()
	snap := "/dev/datto" + m
	must(t, dbdctl, "transition-to-snapshot", nextCow, m)
	marked, changed = checkIncremental(t, prevCow, image, snap)
	must(t, dbdctl, "update-img", snap, prevCow, image)
	must(t, "/usr/bin/cmp", image, snap)
	must(t, "e2fsck", "-fn", image)
	return marked, changed
}

// TestKillUnderLoad kills the server (-9) again and again while fio writes
// and verifies a file on the mounted filesystem. Every time, a new server
// takes the device over: fio sees no error and reads back everything it
// wrote; and each incremental round after a kill copies every changed
// block (checked against the data) and yields an image identical to the
// snapshot, with a clean filesystem.
func TestKillUnderLoad(t *testing.T) {
	front, m, dir := tracked(t, diskCrash, 9, "crash")
	mountFront(t, front, "/mnt9")
	must(t, dbdctl, "setup-snapshot", front, dir+"/cow0", m)
	image := dir + "/img"
	must(t, "dd", "if=/dev/datto"+m, "of="+image, "bs=1M")
	must(t, dbdctl, "transition-to-incremental", m)
	rng := rand.New(rand.NewPCG(9, 9))
	n := crashIters()
	for i := 1; i <= n; i++ {
		// Writes and their verification interleave (verify_backlog), so
		// the kill lands while writes are in flight.
		fio := exec.Command("fio", "--name=load", "--filename=/mnt9/load", "--size=48M",
			"--rw=randwrite", "--bsrange=4k-64k", "--ioengine=io_uring", "--iodepth=16", "--direct=1",
			"--verify=crc32c", "--verify_fatal=1", "--verify_backlog=128", fmt.Sprintf("--randseed=%d", i))
		var out bytes.Buffer
		fio.Stdout, fio.Stderr = &out, &out
		if err := fio.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(300+rng.IntN(1500)) * time.Millisecond)
		inflight := strings.TrimSpace(sh(t, "cat /sys/block/ublkb"+m+"/inflight"))
		pid := serverPID(t, 9)
		t0 := time.Now()
		kill(t, pid)
		waitNewServer(t, 9, pid)
		recovery := time.Since(t0)
		if err := fio.Wait(); err != nil {
			t.Fatalf("kill %d: fio failed across the server's death (%v):\n%s", i, err, out.String())
		}
		prev, next := fmt.Sprintf("%s/cow%d", dir, i-1), fmt.Sprintf("%s/cow%d", dir, i)
		marked, changed := incrementalRound(t, m, prev, next, image)
		must(t, dbdctl, "transition-to-incremental", m)
		os.Remove(prev)
		t.Logf("@@CRASH kill=%d inflight(r w)=%s recovered_in=%v blocks_marked=%d blocks_changed=%d",
			i, inflight, recovery.Round(time.Millisecond), marked, changed)
	}
	must(t, "umount", "/mnt9")
	must(t, "e2fsck", "-fn", front)
}

// TestReloadAfterDetach: detaching a tracking device leaves it dormant;
// reload-incremental and reload-snapshot resume it exactly, the next
// update-img gives an image identical to the new snapshot, and detach
// --all / reload-all (what the boot unit runs) bring everything back.
func TestReloadAfterDetach(t *testing.T) {
	front, m, dir := tracked(t, diskFio, 10, "reload")
	mountFront(t, front, "/mnt10")
	sh(t, "dd if=/dev/urandom of=/mnt10/a bs=1M count=8 2>/dev/null")
	must(t, dbdctl, "setup-snapshot", front, dir+"/cow1", m)
	image := dir + "/img"
	must(t, "dd", "if=/dev/datto"+m, "of="+image, "bs=1M")
	must(t, dbdctl, "transition-to-incremental", m)
	sh(t, "dd if=/dev/urandom of=/mnt10/b bs=1M count=8 2>/dev/null")
	must(t, "umount", "/mnt10")

	out := must(t, dbdctl, "detach", m)
	if !strings.Contains(out, "dormant") {
		t.Errorf("detach of a tracking device said %q", out)
	}
	if _, err := os.Stat(front); err == nil {
		t.Fatalf("%s still exists after detach", front)
	}
	// Untracked writes would break the incremental: a plain attach refuses.
	checkOneLineError(t, run(t, dbdctl, "attach", diskFio, m), "reload-incremental")
	// The wrong reload leaves everything as it was.
	checkOneLineError(t, run(t, dbdctl, "reload-snapshot", diskFio, dir+"/cow1", m), "not a snapshot")
	if _, err := os.Stat(front); err == nil {
		t.Fatalf("a refused reload left %s behind", front)
	}

	must(t, dbdctl, "reload-incremental", diskFio, dir+"/cow1", m)
	if d := info(t, m).Devices[0]; d.Mode != "incremental" || d.NrChanged == 0 {
		t.Fatalf("after reload-incremental: mode %q, %d changed blocks", d.Mode, d.NrChanged)
	}
	must(t, "mount", front, "/mnt10")
	sh(t, "dd if=/dev/urandom of=/mnt10/c bs=1M count=8 2>/dev/null")
	marked, changed := incrementalRound(t, m, dir+"/cow1", dir+"/cow2", image)
	t.Logf("incremental across a detach: %d blocks marked, %d changed", marked, changed)

	// A dormant snapshot comes back with the same frozen view.
	must(t, "umount", "/mnt10")
	must(t, dbdctl, "detach", m)
	must(t, dbdctl, "reload-snapshot", diskFio, dir+"/cow2", m)
	must(t, "/usr/bin/cmp", image, "/dev/datto"+m)
	must(t, "mount", front, "/mnt10")
	sh(t, "dd if=/dev/urandom of=/mnt10/d bs=1M count=8 conv=fsync 2>/dev/null")
	must(t, "/usr/bin/cmp", image, "/dev/datto"+m)
	must(t, "umount", "/mnt10")

	// Shutdown and boot: detach --all keeps the state, reload-all uses it.
	if got := strings.Fields(sh(t, "ls /var/lib/dbdctl")); len(got) != 1 || got[0] != m+".json" {
		t.Fatalf("state directory holds %v, want only %s.json", got, m)
	}
	must(t, dbdctl, "detach", "--all")
	if _, err := os.Stat(front); err == nil {
		t.Fatalf("%s still exists after detach --all", front)
	}
	must(t, dbdctl, "reload-all")
	if d := info(t, m).Devices[0]; d.Mode != "snapshot" {
		t.Fatalf("after reload-all: mode %q", d.Mode)
	}
	must(t, "/usr/bin/cmp", image, "/dev/datto"+m)
}

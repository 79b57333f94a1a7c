package guest

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/state"
)

// Disks of the crash-replay test (see tests/integration_test.go).
const (
	diskLogged = "/dev/vdh" // 64 MiB: the real device, under dm-log-writes
	diskLog    = "/dev/vdi" // 1 GiB: dm-log-writes' log
)

// dm-log-writes' log (drivers/md/dm-log-writes.c): a super block, then one
// entry per write, flush, discard or mark, in the order they reached the
// device's media. Each entry is one sector of metadata (for a mark, with
// its text), followed for a write by its data.
const (
	lwFlush   = 1 << 0
	lwFUA     = 1 << 1
	lwDiscard = 1 << 2
	lwMark    = 1 << 3
	lwMagic   = 0x6a736677736872
)

type lwEntry struct {
	sector, sectors uint64 // in the device's logical sectors
	flags           uint64
	mark            string
	data            int64 // offset of the written data in the log
}

// readLog parses the log on dev.
func readLog(t *testing.T, dev string) (entries []lwEntry, sectorSize int64) {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	super := make([]byte, 32)
	if _, err := f.ReadAt(super, 0); err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	if le.Uint64(super) != lwMagic {
		t.Fatalf("%s holds no dm-log-writes log", dev)
	}
	n := le.Uint64(super[16:])
	sectorSize = int64(le.Uint32(super[24:]))
	meta := make([]byte, sectorSize)
	pos := sectorSize
	for i := uint64(0); i < n; i++ {
		if _, err := f.ReadAt(meta, pos); err != nil {
			t.Fatalf("log entry %d: %v", i, err)
		}
		e := lwEntry{sector: le.Uint64(meta), sectors: le.Uint64(meta[8:]), flags: le.Uint64(meta[16:])}
		if e.flags&lwMark != 0 {
			l := min(le.Uint64(meta[24:]), uint64(sectorSize-32))
			e.mark = string(meta[32 : 32+l])
		}
		pos += sectorSize
		if e.flags&(lwMark|lwDiscard) == 0 {
			e.data = pos
			pos += int64(e.sectors) * sectorSize
		}
		entries = append(entries, e)
	}
	return entries, sectorSize
}

// replayer applies the log to an image, forward only.
type replayer struct {
	t          *testing.T
	log, image *os.File
	sectorSize int64
	next       int // entries applied
}

func (r *replayer) to(entries []lwEntry, k int) {
	for ; r.next <= k; r.next++ {
		e := entries[r.next]
		if e.flags&lwMark != 0 || e.sectors == 0 {
			continue
		}
		off, n := int64(e.sector)*r.sectorSize, int64(e.sectors)*r.sectorSize
		var buf []byte
		if e.flags&lwDiscard != 0 {
			buf = make([]byte, n) // discarded blocks may read as anything: zeros
		} else {
			buf = make([]byte, n)
			if _, err := r.log.ReadAt(buf, e.data); err != nil {
				r.t.Fatal(err)
			}
		}
		if _, err := r.image.WriteAt(buf, off); err != nil {
			r.t.Fatal(err)
		}
	}
}

// TestCrashReplay records every write the device receives (dm-log-writes
// under the real device) while a filesystem with its COW file on itself
// is backed up, in snapshot and in incremental mode, with the server
// killed at random points; then it replays the log onto a scratch device
// to every flush and mark (and a sample of points between) — each a power
// cut at that instant — and checks what a reload makes of it: the reload
// refuses with "full backup required", or the snapshot equals the one
// taken, or the change list is a superset of the blocks written since the
// snapshot.
func TestCrashReplay(t *testing.T) {
	ensureUblk(t)
	ensureScratch(t)
	must(t, "modprobe", "dm-log-writes")
	must(t, "modprobe", "loop")
	env := privateState(t)
	stateDir := strings.TrimPrefix(env[0], "DBDCTL_STATE_DIR=")
	const m = "20"
	mnt, dir := "/mnt20", "/scratch/replay"
	must(t, "rm", "-rf", dir)
	must(t, "mkdir", "-p", dir, mnt)
	dumpLogOnFailure(t, 20)
	sectors := strings.TrimSpace(must(t, "blockdev", "--getsz", diskLogged))
	t.Cleanup(func() {
		exec.Command("umount", mnt).Run()
		dbdEnv(t, env, "detach", m)
		exec.Command("dmsetup", "remove", "lw").Run()
	})
	rng := rand.New(rand.NewPCG(20, 20))
	snapImage := dir + "/snap.img"
	var snapRec, incRec state.Record
	// The log disk is a file on the host under qemu: if the host fails a
	// write to it, dm-log-writes stops logging and the recording has
	// nothing to replay. That is the rig failing, not the device under
	// test (whose writes reach vdh, never vdi), so the recording is taken
	// again, once.
	for attempt := 1; ; attempt++ {
		before := logWritesErrors(t)
		snapRec, incRec = recordCrashWorkload(t, env, rng, sectors, mnt, snapImage, m, stateDir, attempt > 1)
		failed := logWritesErrors(t) - before
		if failed == 0 {
			break
		}
		if attempt == 2 {
			t.Fatalf("the host failed %d writes to the log disk, in both recordings: dm-log-writes stopped logging, there is nothing sound to replay", failed)
		}
		t.Logf("the host failed %d writes to the log disk and dm-log-writes stopped logging: recording again", failed)
	}
	entries, sectorSize := readLog(t, diskLog)
	snapAt, incAt := -1, -1
	for i, e := range entries {
		switch e.mark {
		case "snap":
			snapAt = i
		case "inc":
			incAt = i
		}
	}
	if snapAt < 0 || incAt < 0 {
		t.Fatalf("marks missing from the log (%d entries)", len(entries))
	}
	// Replay points: every flush and mark after the snapshot, and one in
	// eight of the writes between them (a power cut amid unflushed writes).
	var points []int
	for i := snapAt; i < len(entries); i++ {
		if e := entries[i]; e.flags&(lwFlush|lwFUA|lwMark) != 0 || rng.IntN(8) == 0 {
			points = append(points, i)
		}
	}
	if maxPoints := replayPoints(); len(points) > maxPoints {
		rng.Shuffle(len(points), func(i, j int) { points[i], points[j] = points[j], points[i] })
		points = points[:maxPoints]
		slices.Sort(points)
	}

	logf, err := os.Open(diskLog)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	img, err := os.Create(dir + "/replay.img")
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	var devSectors int64
	fmt.Sscan(sectors, &devSectors)
	img.Truncate(devSectors * 512)
	rp := &replayer{t: t, log: logf, image: img, sectorSize: sectorSize}
	written := map[uint64]bool{} // 4 KiB blocks written since the snapshot mark
	// The COW file's blocks, in snapshot mode and (truncated to its index,
	// its data store zeroed and given back) in incremental mode.
	cowBlocks := map[uint64]bool{}
	for _, x := range append(snapRec.CowExtents, incRec.CowExtents...) {
		for off := x.Physical; off < x.Physical+x.Length; off += cow.BlockSize {
			cowBlocks[uint64(off/cow.BlockSize)] = true
		}
	}
	var refused, snapshotsEqual, supersets int
	checkEnv := privateState(t)
	for _, k := range points {
		rp.to(entries, k)
		for i := max(snapAt, 0); i <= k; i++ {
			e := entries[i]
			if e.flags&(lwMark|lwDiscard) != 0 || e.sectors == 0 {
				continue
			}
			first := e.sector * uint64(sectorSize) / cow.BlockSize
			last := ((e.sector+e.sectors)*uint64(sectorSize) + cow.BlockSize - 1) / cow.BlockSize
			for b := first; b < last; b++ {
				written[b] = true
			}
		}
		snapshotPhase := k < incAt
		rec := incRec
		if snapshotPhase {
			rec = snapRec
		}
		got := checkReplayPoint(t, checkEnv, img.Name(), rec, snapshotPhase, snapImage, written, cowBlocks)
		switch got {
		case "refused":
			refused++
		case "snapshot":
			snapshotsEqual++
		case "superset":
			supersets++
		}
	}
	t.Logf("@@REPLAY %d log entries, %d replay points checked: %d refused (full backup required), %d snapshots equal to the one taken, %d change lists supersets of the writes",
		len(entries), len(points), refused, snapshotsEqual, supersets)
	if supersets == 0 {
		t.Error("no replay point in incremental mode was recovered")
	}
}

// logWritesErrors counts dm-log-writes' complaints in the kernel log: each
// is a write to its log disk that failed.
func logWritesErrors(t *testing.T) int {
	t.Helper()
	var n int
	fmt.Sscan(sh(t, "dmesg | grep -c 'log-writes: Error writing log block' || true"), &n)
	return n
}

// recordCrashWorkload puts dm-log-writes over the real device and, with a
// file system on the front device, backs it up in snapshot then
// incremental mode while writing, the server killed at random points. It
// marks the log "snap" and "inc" at the two transitions, copies the
// snapshot to snapImage, and returns the records of both modes. again
// attaches with --force: a recording taken before left the minor dormant
// in incremental mode.
func recordCrashWorkload(t *testing.T, env []string, rng *rand.Rand, sectors, mnt, snapImage, m, stateDir string, again bool) (snapRec, incRec state.Record) {
	t.Helper()
	front := "/dev/ublkb" + m
	must(t, "dd", "if=/dev/zero", "of="+diskLog, "bs=1M", "count=1", "oflag=direct")
	dmCreate(t, "lw", "0 "+sectors+" log-writes "+diskLogged+" "+diskLog)
	mark := func(name string) { must(t, "dmsetup", "message", "lw", "0", "mark", name) }
	work := func(phase string, rounds int) {
		for i := 0; i < rounds; i++ {
			sh(t, fmt.Sprintf("dd if=/dev/urandom of=%s/%s%d bs=64k count=%d conv=fsync 2>/dev/null", mnt, phase, i%4, 4+rng.IntN(28)))
			mark(fmt.Sprintf("%s%d", phase, i))
			if rng.IntN(3) == 0 {
				pid := infoEnv(t, env, m).ServerPID
				kill(t, pid)
				waitNewServerEnv(t, env, m, pid)
			}
		}
	}

	if again {
		mustEnv(t, env, "attach", "--force", "/dev/mapper/lw", m)
	} else {
		mustEnv(t, env, "attach", "/dev/mapper/lw", m)
	}
	must(t, "mkfs.ext4", "-q", "-F", "-b", "4096", front)
	must(t, "mount", front, mnt)
	sh(t, "dd if=/dev/urandom of="+mnt+"/base bs=1M count=8 conv=fsync 2>/dev/null")
	mustEnv(t, env, "setup-snapshot", "-f", "24", front, mnt+"/.datto", m)
	mark("snap")
	must(t, "dd", "if=/dev/datto"+m, "of="+snapImage, "bs=1M")
	snapRec = readRecord(t, stateDir, m)
	work("s", 6)
	mustEnv(t, env, "transition-to-incremental", m)
	mark("inc")
	incRec = readRecord(t, stateDir, m)
	work("i", 10)
	must(t, "umount", mnt)
	mustEnv(t, env, "detach", m)
	must(t, "dmsetup", "remove", "lw")
	return snapRec, incRec
}

// replayPoints is how many replay points TestCrashReplay checks at most:
// $DBD_REPLAY_POINTS, 40 by default (`just soak` checks 200).
func replayPoints() int {
	var n int
	if _, err := fmt.Sscan(os.Getenv("DBD_REPLAY_POINTS"), &n); err != nil || n <= 0 {
		return 40
	}
	return n
}

func readRecord(t *testing.T, dir, m string) state.Record {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, m+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var r state.Record
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	return r
}

// checkReplayPoint reloads a copy of the replayed image as a reboot after
// a power cut would and says what came of it: "refused", "snapshot" (equal
// to the one taken) or "superset" (a change list covering every block
// written since the snapshot, except cowBlocks: the COW file's own, which
// the server writes on the device itself). Anything else fails the test.
func checkReplayPoint(t *testing.T, env []string, image string, rec state.Record, snapshotPhase bool, snapImage string, written, cowBlocks map[uint64]bool) string {
	t.Helper()
	copyPath := image + ".try"
	must(t, "cp", image, copyPath)
	defer os.Remove(copyPath)
	loop := strings.TrimSpace(must(t, "losetup", "-f", "--show", copyPath))
	defer run(t, "losetup", "-d", loop)
	const m = "21"
	stateDir := strings.TrimPrefix(env[0], "DBDCTL_STATE_DIR=")
	rec.Minor, rec.BlockDevice = 21, loop
	b, _ := json.Marshal(rec)
	if err := os.WriteFile(filepath.Join(stateDir, m+".json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	defer dbdEnv(t, env, "detach", m)
	mode := "reload-incremental"
	if snapshotPhase {
		mode = "reload-snapshot"
	}
	r := dbdEnv(t, env, mode, loop, "/"+rec.CowRelative, m)
	if r.code != 0 {
		if !strings.Contains(r.stderr, "full backup") {
			t.Fatalf("%s at a replay point refused without saying a full backup is required: %s", mode, r.stderr)
		}
		return "refused"
	}
	if snapshotPhase {
		if rr := run(t, "/usr/bin/cmp", snapImage, "/dev/datto"+m); rr.code != 0 {
			t.Fatalf("a snapshot reloaded after a power cut differs from the one taken: %s", rr.stdout)
		}
		return "snapshot"
	}
	// The change list: the COW file at its extents on the loop device.
	mustEnv(t, env, "detach", m)
	s, err := cow.DeviceStorage(loop, rec.CowExtents)
	if err != nil {
		t.Fatal(err)
	}
	c, _, err := cow.Open(rec.CowFile, s, cow.ReadOnly, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(false)
	if err := c.SetDeviceSize(int64(c.Blocks()) * cow.BlockSize); err != nil {
		t.Fatal(err)
	}
	marked := map[uint64]bool{}
	c.ChangedRuns(func(first, count uint64) error {
		for b := first; b < first+count; b++ {
			marked[b] = true
		}
		return nil
	})
	for b := range written {
		if !marked[b] && !cowBlocks[b] {
			t.Fatalf("a power cut loses block %d from the change list", b)
		}
	}
	return "superset"
}

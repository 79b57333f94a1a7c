package guest

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// stormKills is how many times TestKillStorm kills a server in each mode:
// $DBD_STORM_KILLS, 15 by default (30 in all; `just soak` kills 100 in each).
func stormKills() int {
	var n int
	if _, err := fmt.Sscan(os.Getenv("DBD_STORM_KILLS"), &n); err != nil || n <= 0 {
		return 15
	}
	return n
}

// stormSeed seeds the kills' timing: $DBD_STORM_SEED, or the clock.
func stormSeed() uint64 {
	var n uint64
	if _, err := fmt.Sscan(os.Getenv("DBD_STORM_SEED"), &n); err != nil {
		return uint64(time.Now().UnixNano())
	}
	return n
}

// maxStall is the longest a write may wait across a server's death.
const maxStall = 30 * time.Second

// prober writes 4 KiB with O_DIRECT to a file on the filesystem every
// 100 ms and keeps the longest time one took: a front device left held
// with nobody to serve it shows as a write that never returns.
type prober struct {
	path    string
	stop    chan struct{}
	done    chan struct{}
	longest atomic.Int64
	started atomic.Int64 // unix nanos of the write in progress, 0 between writes
	once    sync.Once
}

func startProber(path string) *prober {
	p := &prober{path: path, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for {
			select {
			case <-p.stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			t0 := time.Now()
			p.started.Store(t0.UnixNano())
			exec.Command("dd", "if=/dev/zero", "of="+p.path, "bs=4k", "count=1", "oflag=direct", "conv=notrunc").Run()
			p.started.Store(0)
			if d := int64(time.Since(t0)); d > p.longest.Load() {
				p.longest.Store(d)
			}
		}
	}()
	return p
}

// stalled is how long the write in progress has waited.
func (p *prober) stalled() time.Duration {
	if s := p.started.Load(); s != 0 {
		return time.Since(time.Unix(0, s))
	}
	return 0
}

// end stops the prober (once; later calls just report) and returns the
// longest time a write took.
func (p *prober) end() time.Duration {
	p.once.Do(func() { close(p.stop) })
	<-p.done
	return time.Duration(p.longest.Load())
}

// TestKillStorm kills the server at random moments, 0.2 to 3 s apart
// (held off while a round reads the snapshot), with fio verifying a file
// on the mounted filesystem: some kills land while a new server is taking
// over, some during a transition, in incremental and in snapshot mode. No
// write may stall longer than maxStall, fio must see no error, and
// afterwards every incremental round's image equals its
// snapshot (no write escaped the change list) and the snapshot kept
// through the kills still equals its image.
func TestKillStorm(t *testing.T) {
	front, m, dir := tracked(t, diskCrash, 16, "storm")
	mountFront(t, front, "/mnt16")
	// -f 64: room for every block fio rewrites (32 MiB) and the metadata.
	must(t, dbdctl, "setup-snapshot", "-f", "64", front, dir+"/cow0", m)
	image := dir + "/img"
	must(t, "dd", "if=/dev/datto"+m, "of="+image, "bs=1M")
	must(t, dbdctl, "transition-to-incremental", m)
	seed := stormSeed()
	t.Logf("storm seed %d (DBD_STORM_SEED repeats it)", seed)
	rng := rand.New(rand.NewPCG(seed, seed))
	kills := stormKills()

	fio := fioVerify("storm", "/mnt16/load", "32M")
	var fioOut bytes.Buffer
	fio.Stdout, fio.Stderr = &fioOut, &fioOut
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	fioDone := make(chan error, 1)
	go func() { fioDone <- fio.Wait() }()
	probe := startProber("/mnt16/probe")
	defer probe.end()

	// rounds runs incremental rounds (transitions the kills land in) until
	// stopped, retrying a command a kill broke. It runs beside the test
	// goroutine, so it reports with Errorf and returns.
	var roundsDone, refused, restarted atomic.Int64
	var copying sync.RWMutex // held (read) while a round reads the snapshot
	stopRounds := make(chan struct{})
	var rounds sync.WaitGroup
	rounds.Add(1)
	go func() {
		defer rounds.Done()
		prev := dir + "/cow0"
		for i := 1; ; i++ {
			select {
			case <-stopRounds:
				return
			default:
			}
			next := fmt.Sprintf("%s/cow%d", dir, i)
			d, ok := servedInfo(t, m)
			if !ok {
				return
			}
			if d.Error != nil && *d.Error != 0 {
				// A kill amid transition-to-incremental (between the
				// snapshot's end and the change list's write-intent
				// record) fails the tracking: a full backup, a new series.
				restarted.Add(1)
				retry(t, m, func() bool { return run(t, dbdctl, "destroy", m).code == 0 },
					func(d infoDevice) bool { return d.Mode == "passthrough" && (d.Error == nil || *d.Error == 0) })
				if !retry(t, m, func() bool { return run(t, dbdctl, "setup-snapshot", "-f", "64", front, next, m).code == 0 },
					func(d infoDevice) bool { return d.Mode == "snapshot" && d.CowFile == next }) {
					os.Remove(next)
					continue
				}
				prev = ""
			} else if !retry(t, m, func() bool { return run(t, dbdctl, "transition-to-snapshot", next, m).code == 0 },
				func(d infoDevice) bool { return d.Mode == "snapshot" && d.CowFile == next }) {
				os.Remove(next)
				continue // not taken: try again with the next name
			}
			// cowN-1 is now the change list of snapshot N. A kill at the
			// instant it was being closed leaves it unusable: update-img
			// refuses it, rightly, and the image is copied whole. No kill
			// lands while the snapshot is read: a server's death fails
			// its snapshot device's reads (it is recreated), which would
			// fail every try of a copy longer than the kills' spacing.
			copying.RLock()
			var last string // the last try's failing command, for the report
			ok = retry(t, m, func() bool {
				var r result
				cmd := "update-img"
				if prev != "" {
					r = run(t, dbdctl, "update-img", "/dev/datto"+m, prev, image)
				}
				if prev == "" || (r.code != 0 && strings.Contains(r.stderr, "full backup")) {
					if prev != "" {
						refused.Add(1)
					}
					cmd, r = "dd", run(t, "dd", "if=/dev/datto"+m, "of="+image, "bs=1M")
				}
				if r.code == 0 {
					cmd, r = "cmp", run(t, "/usr/bin/cmp", image, "/dev/datto"+m)
				}
				last = fmt.Sprintf("%s: exit %d: %s %s", cmd, r.code, r.stdout, r.stderr)
				return r.code == 0
			}, nil)
			copying.RUnlock()
			if !ok {
				t.Errorf("round %d: the image does not equal its snapshot; the last try's %s", i, last)
				return
			}
			roundsDone.Add(1)
			if prev != "" {
				os.Remove(prev)
			}
			prev = next
			retry(t, m, func() bool { return run(t, dbdctl, "transition-to-incremental", m).code == 0 },
				func(d infoDevice) bool { return d.Mode == "incremental" || (d.Error != nil && *d.Error != 0) })
		}
	}()

	stormKill(t, m, kills, rng, probe, &copying)
	close(stopRounds)
	rounds.Wait()
	if roundsDone.Load() == 0 {
		t.Error("no incremental round completed during the storm")
	}
	t.Logf("@@STORM incremental: %d kills, %d rounds checked (%d change lists refused after a kill and %d series failed by a kill mid-transition, copied whole), longest stalled write %v",
		kills, roundsDone.Load(), refused.Load(), restarted.Load(), time.Duration(probe.longest.Load()))

	// Snapshot mode: the snapshot taken before the kills must survive them.
	snapCow := dir + "/snap"
	switch d := info(t, m).Devices[0]; {
	case d.Error != nil && *d.Error != 0: // the last round's series failed
		must(t, dbdctl, "destroy", m)
		must(t, dbdctl, "setup-snapshot", "-f", "64", front, snapCow, m)
	case d.Mode == "incremental":
		must(t, dbdctl, "transition-to-snapshot", snapCow, m)
	default:
		t.Fatalf("after the rounds: mode %s", d.Mode)
	}
	must(t, "dd", "if=/dev/datto"+m, "of="+image, "bs=1M")
	stormKill(t, m, kills, rng, probe, nil)
	must(t, "/usr/bin/cmp", image, "/dev/datto"+m)
	longest := probe.end()
	t.Logf("@@STORM snapshot: %d kills; longest stalled write %v", kills, longest)
	if longest > maxStall {
		t.Errorf("a write stalled %v across a server's death (limit %v)", longest, maxStall)
	}
	fio.Process.Signal(os.Interrupt)
	if err := <-fioDone; err != nil && !strings.Contains(fioOut.String(), "err= 0") {
		t.Fatalf("fio failed across the kills (%v):\n%s", err, fioOut.String())
	}
	if strings.Contains(fioOut.String(), "verify:") && strings.Contains(fioOut.String(), "bad") {
		t.Fatalf("fio verify found bad data:\n%s", fioOut.String())
	}
}

// stormKill kills minor's server n times, 0.2 to 3 s apart; one kill in
// four lands right after a new server has taken over (during its
// recovery). A kill waits while quiet (if not nil) is read-locked. It
// fails the test on a write stalled past maxStall.
func stormKill(t *testing.T, m string, n int, rng *rand.Rand, probe *prober, quiet *sync.RWMutex) {
	t.Helper()
	minor := 0
	fmt.Sscan(m, &minor)
	for k := 0; k < n; k++ {
		time.Sleep(time.Duration(200+rng.IntN(2800)) * time.Millisecond)
		if s := probe.stalled(); s > maxStall {
			t.Fatalf("kill %d: a write has been stalled for %v", k, s)
		}
		if quiet != nil {
			quiet.Lock()
		}
		pid := serverPID(t, minor)
		if pid == 0 {
			pid = waitNewServer(t, minor, 0)
		}
		kill(t, pid)
		if rng.IntN(4) == 0 {
			// Kill the next server too, as soon as it answers.
			next := waitNewServer(t, minor, pid)
			time.Sleep(time.Duration(rng.IntN(300)) * time.Millisecond)
			kill(t, next)
			k++
		}
		if quiet != nil {
			quiet.Unlock()
		}
	}
	waitRecovered(t, m)
	if s := probe.stalled(); s > maxStall {
		t.Fatalf("after the kills a write has been stalled for %v", s)
	}
}

// retry runs do until it succeeds: when it fails (a kill broke it), it
// waits for the next server and, unless done says the command took effect
// before the kill, runs it again. It gives up (false) after 10 tries or
// when the minor is not served again.
func retry(t *testing.T, m string, do func() bool, done func(infoDevice) bool) bool {
	for try := 0; try < 10; try++ {
		if do() {
			return true
		}
		if !waitRecovered(t, m) {
			return false
		}
		if done != nil {
			r := run(t, dbdctl, "info", m)
			if r.code == 0 && done(parseInfo(t, r.stdout).Devices[0]) {
				return true
			}
		}
	}
	return false
}

// waitRecovered waits until minor is served again; false when it is not
// within maxStall (the test has failed then).
func waitRecovered(t *testing.T, m string) bool {
	_, ok := servedInfo(t, m)
	return ok
}

// servedInfo returns minor's info once it is served (a kill may have just
// landed); false when it is not within maxStall (the test has failed then).
// It reports with Errorf, so goroutines beside the test may call it.
func servedInfo(t *testing.T, m string) (infoDevice, bool) {
	for deadline := time.Now().Add(maxStall); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		r := run(t, dbdctl, "info", m)
		if r.code != 0 {
			continue
		}
		if d := parseInfo(t, r.stdout).Devices[0]; d.Status == "serving" {
			return d, true
		}
	}
	t.Errorf("minor %s not served again within %v", m, maxStall)
	return infoDevice{}, false
}

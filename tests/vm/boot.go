package vm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"time"
)

const (
	// maxBoots bounds the retries after early kernel crashes: qemu 7.2's
	// TCG hits an int3 oops in roughly one boot out of thirty.
	maxBoots = 3
	// bootDeadline is how long a boot of Run may take to reach the start
	// marker before it counts as hung. A healthy boot takes about 3 s.
	bootDeadline = 60 * time.Second
	// crashGrace lets a late oops finish printing before qemu is stopped.
	crashGrace = 2 * time.Second
	// pollInterval is how often the console file is read.
	pollInterval = 50 * time.Millisecond
)

// crashRE matches the first line of a kernel panic, oops or BUG report.
// "[#N]" is the oops counter every oops header carries, whatever the
// kernel version's wording ("Oops: int3: 0000 [#1]", "int3: 0000 [#1]").
var crashRE = regexp.MustCompile(`Kernel panic|Oops|BUG:|kernel BUG at|\[#[0-9]+\]`)

// bootOutcome is what one qemu run left behind.
type bootOutcome struct {
	console  string
	results  string
	stderr   string
	bootTime time.Duration // until the start marker; 0 if never seen
	flake    string        // set when the boot died before the start marker: worth one more try
}

// errQemuStart marks qemu refusing its command line or failing to start.
var errQemuStart = errors.New("qemu failed to start")

// bootPlan is what it takes to boot one guest, again after a flake: Run
// and Machine.Boot differ in command line, what prints the start marker and
// how long that may take.
type bootPlan struct {
	args       func(backends []diskBackend) []string // qemu command line for these disk backends
	backends   []diskBackend                         // changed to aio=threads if qemu refuses io_uring
	consoleLog string                                // host side of ttyS0
	resultsLog string                                // host side of ttyS1
	deadline   time.Duration                         // from starting qemu to the start marker
	starter    string                                // what prints the start marker, for messages: "init"
	powerCut   bool                                  // a missing exit trailer is a power cut, not an error
	logf       func(format string, args ...any)
}

// bootOnce runs qemu once and watches the console until the guest powers
// off, crashes, or ctx ends. Errors are final; o.flake asks for a retry.
func bootOnce(ctx context.Context, p *bootPlan) (o *bootOutcome, err error) {
	o = &bootOutcome{}
	args, consoleLog, resultsLog := p.args(p.backends), p.consoleLog, p.resultsLog
	for _, p := range []string{consoleLog, resultsLog} {
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			return o, err
		}
	}
	cmd := exec.Command(qemuBinary, args...)
	var stderr bytes.Buffer
	cmd.Stdout = &stderr
	cmd.Stderr = &stderr
	// qemu must not outlive a test binary that is killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return o, fmt.Errorf("vm: %w: %v", errQemuStart, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	con, err := os.Open(consoleLog)
	if err != nil {
		cmd.Process.Kill()
		<-exited
		return o, err
	}
	defer con.Close()
	var console bytes.Buffer
	readConsole := func() { io.Copy(&console, con) }
	finish := func() {
		readConsole()
		o.console = console.String()
		o.stderr = stderr.String()
		if b, err := os.ReadFile(resultsLog); err == nil {
			o.results = string(b)
		}
	}
	kill := func() {
		cmd.Process.Kill()
		<-exited
		finish()
	}

	var crashAt time.Time
	watch := crashWatch{marker: -1}
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	for {
		select {
		case werr := <-exited:
			finish()
			started := o.bootTime > 0 || bytes.Contains(console.Bytes(), []byte(startMarker))
			if !started && !strings.Contains(o.results, initFailMarker) {
				if console.Len() == 0 && werr != nil {
					return o, fmt.Errorf("vm: %w: %v\n%s", errQemuStart, werr, tail(o.stderr, 2000))
				}
				o.flake = "guest stopped before " + p.starter + " started"
				if m := crashBeforeStart(console.Bytes()); m != "" {
					o.flake = "kernel crashed before " + p.starter + " started (" + m + ")"
				}
				return o, nil
			}
			if m := crashAfterStart(console.Bytes()); m != "" {
				return o, fmt.Errorf("vm: guest kernel crashed while the script ran (%s); console tail:\n%s", m, tail(o.console, 6000))
			}
			return o, nil
		case <-ctx.Done():
			kill()
			return o, fmt.Errorf("vm: stopped the VM after %v: %w; console tail:\n%s",
				time.Since(start).Round(time.Millisecond), ctx.Err(), tail(o.console, 6000))
		case <-tick.C:
		}
		readConsole()
		buf := console.Bytes()
		if o.bootTime == 0 && bytes.Contains(buf, []byte(startMarker)) {
			o.bootTime = time.Since(start)
		}
		if o.bootTime == 0 {
			if m := crashBeforeStart(buf); m != "" {
				kill()
				o.flake = "kernel crashed before " + p.starter + " started (" + m + ")"
				return o, nil
			}
			if time.Since(start) > p.deadline {
				kill()
				o.flake = fmt.Sprintf("no start marker after %v", p.deadline)
				return o, nil
			}
			continue
		}
		if crashAt.IsZero() && watch.crashed(buf) {
			crashAt = time.Now()
		}
		if !crashAt.IsZero() && time.Since(crashAt) > crashGrace {
			kill()
			return o, fmt.Errorf("vm: guest kernel crashed while the script ran (%s); console tail:\n%s",
				crashAfterStart(console.Bytes()), tail(o.console, 6000))
		}
	}
}

// crashBeforeStart returns the crash line if the console shows a crash and
// no start marker before it.
func crashBeforeStart(console []byte) string {
	loc := crashRE.FindIndex(console)
	if loc == nil {
		return ""
	}
	if m := bytes.Index(console, []byte(startMarker)); m >= 0 && m < loc[0] {
		return ""
	}
	return lineAt(console, loc[0])
}

// crashAfterStart returns the first crash line printed after the start marker.
func crashAfterStart(console []byte) string {
	m := bytes.Index(console, []byte(startMarker))
	if m < 0 {
		return ""
	}
	loc := crashRE.FindIndex(console[m:])
	if loc == nil {
		return ""
	}
	return lineAt(console, m+loc[0])
}

// crashWatch tells whether a console that only grows shows a crash after
// the start marker, scanning each part of it about once (the console of a
// long run is megabytes, polled every pollInterval).
type crashWatch struct {
	marker  int // offset of the start marker; -1 until seen
	scanned int // bytes already scanned
}

// crashed reports whether console, the whole console so far, shows a
// crash after the start marker.
func (w *crashWatch) crashed(console []byte) bool {
	const overlap = 64 // longer than any match or marker, so none is cut in two
	from := max(w.scanned-overlap, 0)
	w.scanned = len(console)
	if w.marker < 0 {
		i := bytes.Index(console[from:], []byte(startMarker))
		if i < 0 {
			return false
		}
		w.marker = from + i
		from = w.marker
	}
	return crashRE.Match(console[max(from, w.marker):])
}

// lineAt returns the trimmed console line containing offset i.
func lineAt(b []byte, i int) string {
	s := bytes.LastIndexByte(b[:i], '\n') + 1
	e := bytes.IndexByte(b[i:], '\n')
	if e < 0 {
		e = len(b) - i
	}
	return string(bytes.TrimSpace(b[s : i+e]))
}

// tail returns at most the last n bytes of s, starting at a line boundary.
func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[len(s)-n:]
	if i := bytes.IndexByte([]byte(s), '\n'); i >= 0 {
		s = s[i+1:]
	}
	return "...\n" + s
}

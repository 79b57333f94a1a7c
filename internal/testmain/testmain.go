// Package testmain fails a package's tests when they leave file descriptors
// open or goroutines running. A package opts in with
//
//	func TestMain(m *testing.M) { testmain.Run(m) }
//
// Leaks are checked only when the tests passed. A descriptor held by an
// *os.File that nothing references any more can be closed by the garbage
// collector before the check and so go unnoticed; raw descriptors and
// referenced files are always caught, and a run with GOGC=off catches the
// others too.
package testmain

import (
	"bytes"
	"fmt"
	"io"
	"maps"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// settle is how long goroutines (and the descriptors they hold) get to
// wind down after the tests before they count as leaked.
const settle = 2 * time.Second

// Run runs the tests and exits: with m.Run's code if they failed, with 1 if
// they passed but left more descriptors open than before them, or
// goroutines running that they started (it prints what leaked on standard
// error), and with 0 otherwise.
func Run(m *testing.M) {
	os.Exit(run(m, os.Stderr))
}

func run(m *testing.M, w io.Writer) int {
	fds := openFds()
	goroutines := runtime.NumGoroutine()
	before := goroutineIDs(allStacks())
	code := m.Run()
	if code != 0 {
		return code
	}
	var now map[int]string
	var started []string
	for deadline := time.Now().Add(settle); ; time.Sleep(20 * time.Millisecond) {
		now, started = openFds(), newGoroutines(allStacks(), before)
		if (len(now) <= len(fds) && len(started) == 0) || time.Now().After(deadline) {
			break
		}
	}
	leaked := false
	if len(now) > len(fds) {
		leaked = true
		fmt.Fprintf(w, "testmain: the tests passed but left %d file descriptors open (%d before, %d after):\n", len(now)-len(fds), len(fds), len(now))
		for _, fd := range slices.Sorted(maps.Keys(now)) {
			if fds[fd] != now[fd] {
				fmt.Fprintf(w, "\tfd %d -> %s\n", fd, now[fd])
			}
		}
	}
	if len(started) > 0 {
		leaked = true
		fmt.Fprintf(w, "testmain: the tests passed but left %d goroutines running (%d before, %d after %v):\n\n",
			len(started), goroutines, runtime.NumGoroutine(), settle)
		for _, g := range started {
			fmt.Fprintf(w, "%s\n\n", g)
		}
	}
	if leaked {
		return 1
	}
	return 0
}

// openFds returns the process's open descriptors and what they name, without
// the one that lists them.
func openFds() map[int]string {
	fds := map[int]string{}
	d, err := os.Open("/proc/self/fd")
	if err != nil {
		return fds
	}
	self := int(d.Fd())
	names, _ := d.Readdirnames(-1)
	d.Close()
	for _, name := range names {
		fd, err := strconv.Atoi(name)
		if err != nil || fd == self {
			continue
		}
		target, err := os.Readlink("/proc/self/fd/" + name)
		if err != nil {
			target = "?"
		}
		fds[fd] = target
	}
	return fds
}

// allStacks is the stack trace of every goroutine.
func allStacks() []byte {
	buf := make([]byte, 64<<10)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return buf[:n]
		}
		buf = make([]byte, 2*len(buf))
	}
}

// goroutines splits a runtime.Stack(all) dump into one trace per goroutine.
func goroutines(dump []byte) []string {
	var out []string
	for _, g := range bytes.Split(bytes.TrimSpace(dump), []byte("\n\n")) {
		if bytes.HasPrefix(g, []byte("goroutine ")) {
			out = append(out, string(g))
		}
	}
	return out
}

// goroutineID is the N of a trace's "goroutine N [state]:" line.
func goroutineID(trace string) string {
	id, _, _ := strings.Cut(strings.TrimPrefix(trace, "goroutine "), " ")
	return id
}

func goroutineIDs(dump []byte) map[string]bool {
	ids := map[string]bool{}
	for _, g := range goroutines(dump) {
		ids[goroutineID(g)] = true
	}
	return ids
}

// newGoroutines returns the traces in dump of goroutines not in before,
// leaving out those that live as long as the process by design: the
// os/signal loop that signal.Notify starts (the fuzzing coordinator's, for
// one).
func newGoroutines(dump []byte, before map[string]bool) []string {
	var out []string
	for _, g := range goroutines(dump) {
		if !before[goroutineID(g)] && !strings.Contains(g, "\nos/signal.loop()") {
			out = append(out, g)
		}
	}
	return out
}

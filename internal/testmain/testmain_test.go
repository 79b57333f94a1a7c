package testmain

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) { Run(m) }

// helperEnv selects, in a child process of this test binary, the helper
// test that misbehaves; the helpers skip in a normal run.
const helperEnv = "TESTMAIN_HELPER"

func helper(t *testing.T, name string) {
	if os.Getenv(helperEnv) != name {
		t.Skip("helper of TestLeaks")
	}
}

func TestHelperLeakFd(t *testing.T) {
	helper(t, "fd")
	// A raw descriptor: no *os.File whose cleanup could close it.
	if _, err := unix.Open(filepath.Join(os.Getenv("TESTMAIN_DIR"), "leaked-file"), unix.O_CREAT|unix.O_RDWR|unix.O_CLOEXEC, 0o600); err != nil {
		t.Fatal(err)
	}
}

var forever = make(chan struct{})

func TestHelperLeakGoroutine(t *testing.T) {
	helper(t, "goroutine")
	go func() { <-forever }()
}

func TestHelperTidy(t *testing.T) {
	helper(t, "tidy")
	f, err := os.Create(filepath.Join(os.Getenv("TESTMAIN_DIR"), "closed-file"))
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	// A goroutine that winds down a little after the test: not a leak.
	go func() { time.Sleep(300 * time.Millisecond) }()
}

func TestHelperFails(t *testing.T) {
	helper(t, "fails")
	go func() { <-forever }()
	t.Fatal("failed on purpose")
}

// TestLeaks runs each helper in a child process and checks its exit status
// and what Run reports.
func TestLeaks(t *testing.T) {
	for _, c := range []struct {
		helper, test string
		exit         int
		want         []string // in the output
		not          []string
	}{
		{"fd", "TestHelperLeakFd", 1, []string{"left 1 file descriptors open", "leaked-file"}, []string{"goroutines running"}},
		{"goroutine", "TestHelperLeakGoroutine", 1, []string{"left 1 goroutines running", "TestHelperLeakGoroutine.func1"}, []string{"descriptors open"}},
		{"tidy", "TestHelperTidy", 0, nil, []string{"testmain:"}},
		{"fails", "TestHelperFails", 1, []string{"failed on purpose"}, []string{"testmain:"}},
	} {
		t.Run(c.helper, func(t *testing.T) {
			t.Parallel()
			cmd := exec.Command(os.Args[0], "-test.run=^"+c.test+"$", "-test.count=1")
			cmd.Env = append(os.Environ(), helperEnv+"="+c.helper, "TESTMAIN_DIR="+t.TempDir())
			out, err := cmd.CombinedOutput()
			exit := 0
			if ee, ok := err.(*exec.ExitError); ok {
				exit = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if exit != c.exit {
				t.Fatalf("exit status %d, want %d; output:\n%s", exit, c.exit, out)
			}
			for _, w := range c.want {
				if !strings.Contains(string(out), w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
			for _, w := range c.not {
				if strings.Contains(string(out), w) {
					t.Errorf("output has %q:\n%s", w, out)
				}
			}
		})
	}
}

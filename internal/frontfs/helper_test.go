package frontfs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dbdublk/dbdublk/internal/protocol"
)

// startHelper starts the test binary as a helper process.
func startHelper(t *testing.T) *Helper {
	t.Helper()
	t.Setenv(helperEnv, "1")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	h, err := Start(exe, "@helper-test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	// The argv[0] asked for (a boot server's helper is spared at
	// shutdown by it).
	// Read once it has exec'd (the command line is empty until then).
	var b []byte
	var err2 error
	for i := 0; i < 200 && len(b) == 0; i++ {
		b, err2 = os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", h.cmd.Process.Pid))
		time.Sleep(5 * time.Millisecond)
	}
	if !strings.HasPrefix(string(b), "@helper-test\x00") {
		t.Fatalf("helper's command line %q (%v), want argv[0] @helper-test", b, err2)
	}
	return h
}

// A COW path is judged in the helper, and its refusals keep their kind
// (errors.Is) and their one-line message across the pipe.
func TestCheckCowPathThroughHelper(t *testing.T) {
	h := startHelper(t)
	dir := t.TempDir()
	open := filepath.Join(dir, "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil { // past the umask
		t.Fatal(err)
	}
	existing := filepath.Join(dir, "existing")
	if err := os.WriteFile(existing, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// /dev/null stands in for a front device nothing is mounted from.
	check := func(path string) CowPath {
		return CowPath{Path: path, BlockDevice: "/dev/none", DeviceRdev: 1<<63 - 1, FrontPath: "/dev/null"}
	}
	for _, c := range []struct{ path, want string }{
		{"relative/cow", "must be absolute"},
		{filepath.Join(dir, "missing", "cow"), "does not exist"},
		{filepath.Join(open, "cow"), "writable by a user other than root"},
		{existing, "already exists"},
	} {
		_, err := h.CheckCowPath(check(c.path))
		if !errors.Is(err, protocol.ErrInvalid) || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("CheckCowPath(%s) = %v; want one line saying %q, of kind ErrInvalid", c.path, err, c.want)
		}
	}
	onVolume, err := h.CheckCowPath(check(filepath.Join(dir, "cow")))
	if err != nil || onVolume {
		t.Errorf("CheckCowPath of a good path elsewhere = %v, %v; want false, nil", onVolume, err)
	}
}

// A freeze that cannot happen names the mount point; a thaw of a
// filesystem that is not frozen is no error; removing a file that is
// already gone is no error; a file that is not the one the server wrote
// is refused.
func TestHelperRequests(t *testing.T) {
	h := startHelper(t)
	missing := filepath.Join(t.TempDir(), "not-mounted")
	var fe *FreezeError
	if err := h.Freeze([]string{missing}); !errors.As(err, &fe) || fe.Point != missing {
		t.Errorf("Freeze of a missing mount point = %v; want a FreezeError naming it", err)
	}
	if err := h.Thaw([]string{t.TempDir()}); err != nil {
		t.Errorf("Thaw of a filesystem that is not frozen = %v", err)
	}
	if err := h.Remove(missing, 0, 1); err != nil {
		t.Errorf("Remove of a missing file = %v", err)
	}
	path := filepath.Join(t.TempDir(), "cow")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if err := h.Unpin(path, uint64(st.Dev), st.Ino+1); err == nil || !strings.Contains(err.Error(), "is not the file the server wrote") {
		t.Errorf("Unpin of another file = %v; want a refusal", err)
	}
	if err := h.Remove(path, uint64(st.Dev), st.Ino+1); err == nil {
		t.Error("Remove of another file succeeded")
	}
	if _, err := os.Stat(path); err != nil {
		t.Errorf("a refused Remove removed the file: %v", err)
	}
	if _, err := h.call(request{Op: "no-such-op"}); err == nil || !strings.Contains(err.Error(), "unknown request") {
		t.Errorf("an unknown request = %v", err)
	}
}

// A helper that is gone (killed) answers ErrGone, and a closed one ends.
func TestHelperGone(t *testing.T) {
	h := startHelper(t)
	if err := h.Thaw(nil); err != nil {
		t.Fatal(err)
	}
	h.cmd.Process.Kill()
	h.cmd.Wait()
	if err := h.Thaw(nil); !errors.Is(err, ErrGone) || !h.Gone() {
		t.Fatalf("a request to a killed helper = %v; want ErrGone", err)
	}
	h2 := startHelper(t)
	if err := h2.Close(); err != nil {
		t.Fatalf("a closed helper exited with %v", err)
	}
}

package guest

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// serverPID returns the pid of minor's server, or 0 when none answers.
func serverPID(t *testing.T, minor int) int {
	t.Helper()
	r := run(t, dbdctl, "info", fmt.Sprint(minor))
	if r.code != 0 {
		return 0
	}
	doc := parseInfo(t, r.stdout)
	if len(doc.Devices) != 1 {
		return 0
	}
	return doc.Devices[0].ServerPID
}

// parentPID reads a process's parent from /proc.
func parentPID(t *testing.T, pid int) int {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	ppid, _ := strconv.Atoi(f[1])
	return ppid
}

// waitNewServer waits until minor is served by a process other than old.
func waitNewServer(t *testing.T, minor, old int) int {
	t.Helper()
	for i := 0; i < 1800; i++ {
		if pid := serverPID(t, minor); pid != 0 && pid != old {
			return pid
		}
		time.Sleep(50 * time.Millisecond)
	}
	if b, err := os.ReadFile(fmt.Sprintf("/var/log/dbdctl/ublk%d.log", minor)); err == nil {
		t.Logf("server log of minor %d:\n%s", minor, tail(string(b), 4000))
	}
	// Fail the held I/O, or the test's cleanup (umount) would hang on it.
	run(t, dbdctl, "detach", fmt.Sprint(minor))
	t.Fatalf("minor %d has no new server 90 s after pid %d died", minor, old)
	return 0
}

func kill(t *testing.T, pid int) {
	t.Helper()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill %d: %v", pid, err)
	}
	for alive(pid) {
		time.Sleep(10 * time.Millisecond)
	}
}

// TestServerKilled: when a server dies (kill -9), its front device stays
// and a new server takes it over with every acknowledged write; with no
// supervisor left, attaching the device again recovers it; and detach
// removes a held device nobody recovers.
func TestServerKilled(t *testing.T) {
	front := attach(t, diskFio, 2)
	sh(t, `dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null
		dd if=/tmp/pattern of=`+front+` bs=1M oflag=direct 2>/dev/null`)
	same := `test "$(dd if=` + front + ` bs=1M count=4 iflag=direct 2>/dev/null | sha256sum)" = "$(sha256sum < /tmp/pattern)"`

	// 1. The supervisor restarts the server; the device never goes away.
	pid := serverPID(t, 2)
	kill(t, pid)
	if _, err := os.Stat(front); err != nil {
		t.Fatalf("%s vanished when its server was killed: %v", front, err)
	}
	pid = waitNewServer(t, 2, pid)
	sh(t, same)

	// 2. Supervisor and server both gone: the device waits; attach recovers it.
	kill(t, parentPID(t, pid))
	kill(t, pid)
	if _, err := os.Stat(front); err != nil {
		t.Fatalf("%s vanished with no server left: %v", front, err)
	}
	out := must(t, dbdctl, "attach", diskFio, "2")
	if !strings.Contains(out, front) {
		t.Errorf("recovering attach said %q", out)
	}
	sh(t, same)

	// 3. Nobody recovers it: detach removes it.
	pid = serverPID(t, 2)
	kill(t, parentPID(t, pid))
	kill(t, pid)
	out = must(t, dbdctl, "detach", "2")
	if !strings.Contains(out, "removed /dev/ublkc2") {
		t.Errorf("detach of the held device said %q", out)
	}
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(front); err != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := os.Stat("/dev/ublkc2"); err == nil {
		t.Fatalf("/dev/ublkc2 still exists after detach removed it")
	}
	front = attach(t, diskFio, 2)
	sh(t, same)
	detach(t, 2)
}

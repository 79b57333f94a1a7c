package guest

import (
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestServerKilled: when a server dies (kill -9), the kernel removes its
// front device, info no longer lists it, the minor reads as taken until
// detach removes the orphaned kernel object, and every write acknowledged
// before the kill is on the real device.
func TestServerKilled(t *testing.T) {
	front := attach(t, diskFio, 2)
	sh(t, `dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null
		dd if=/tmp/pattern of=`+front+` bs=1M oflag=direct 2>/dev/null`)
	doc := info(t, "2")
	pid := doc.Devices[0].ServerPID
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill server %d: %v", pid, err)
	}
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(front); err != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := os.Stat(front); err == nil {
		t.Fatalf("%s still exists 10 s after its server was killed", front)
	}
	for _, d := range info(t).Devices {
		if d.Minor == 2 {
			t.Errorf("info still lists minor 2 after its server died: %+v", d)
		}
	}
	r := run(t, dbdctl, "attach", diskFio, "2")
	checkOneLineError(t, r, "dbdctl detach 2")
	out := must(t, dbdctl, "detach", "2")
	if !strings.Contains(out, "removed /dev/ublkc2") {
		t.Errorf("detach of the orphan said %q", out)
	}
	if _, err := os.Stat("/dev/ublkc2"); err == nil {
		t.Fatalf("/dev/ublkc2 still exists after detach removed the orphan")
	}
	front = attach(t, diskFio, 2)
	sh(t, `test "$(dd if=`+front+` bs=1M count=4 iflag=direct 2>/dev/null | sha256sum)" = "$(sha256sum < /tmp/pattern)"`)
	detach(t, 2)
}

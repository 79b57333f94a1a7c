package guest

import (
	"os"
	"strings"
	"testing"
)

// checkOneLineError asserts the shape every failure must have: a non-zero
// exit, exactly one line on stderr naming the problem, no Go panic or stack
// trace.
func checkOneLineError(t *testing.T, r result, want string) {
	t.Helper()
	if r.code == 0 {
		t.Errorf("exit status 0, want non-zero (stdout %q)", r.stdout)
	}
	msg := strings.TrimRight(r.stderr, "\n")
	if msg == "" || strings.Contains(msg, "\n") {
		t.Errorf("stderr is not one line: %q", r.stderr)
	}
	for _, bad := range []string{"panic", "goroutine ", ".go:"} {
		if strings.Contains(msg, bad) {
			t.Errorf("stderr leaks Go internals (%q): %q", bad, msg)
		}
	}
	if !strings.Contains(msg, want) {
		t.Errorf("stderr %q does not mention %q", msg, want)
	}
}

// TestBadInput: each mistake gets a clear one-line error and changes nothing.
func TestBadInput(t *testing.T) {
	ensureUblk(t)
	front := attach(t, diskExt4, 0)
	if err := os.WriteFile("/tmp/plainfile", []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	must(t, "mkfs.ext4", "-q", "-F", diskSpare)
	must(t, "mkdir", "-p", "/mnt/spare")
	must(t, "mount", "-t", "ext4", diskSpare, "/mnt/spare")
	defer run(t, "umount", "/mnt/spare")
	must(t, "mkfs.ext4", "-q", "-F", front)
	must(t, "mount", "-t", "ext4", front, "/mnt")

	cases := []struct {
		name string
		args []string
		want string
	}{
		{"non-numeric minor", []string{"attach", diskFio, "abc"}, "not a number"},
		{"minor out of range", []string{"attach", diskFio, "256"}, "out of range"},
		{"huge minor", []string{"attach", diskFio, "99999999999999999999"}, "out of range"},
		{"negative minor", []string{"attach", diskFio, "-1"}, "-1"},
		{"missing argument", []string{"attach", diskFio}, "minor"},
		{"unknown command", []string{"frobnicate"}, "frobnicate"},
		{"not a block device", []string{"attach", "/tmp/plainfile", "4"}, "not a block device"},
		{"missing device", []string{"attach", "/dev/nosuchdisk", "4"}, "does not exist"},
		{"directory", []string{"attach", "/dev", "4"}, "not a block device"},
		{"mounted device", []string{"attach", diskSpare, "4"}, "is mounted on /mnt/spare"},
		{"already attached", []string{"attach", diskExt4, "4"}, "already attached as minor 0"},
		{"minor taken", []string{"attach", diskFio, "0"}, "minor 0 is taken"},
		{"ublk device itself", []string{"attach", front, "4"}, "ublk device"},
		{"detach unknown minor", []string{"detach", "7"}, "minor 7 is not attached"},
		{"info unknown minor", []string{"info", "7"}, "minor 7 is not attached"},
		{"detach bad minor", []string{"detach", "x7"}, "not a number"},
		{"detach while mounted", []string{"detach", "0"}, "in use"},
	}
	before := info(t)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := run(t, dbdctl, c.args...)
			checkOneLineError(t, r, c.want)
			for _, p := range []string{"/dev/ublkb4", "/dev/ublkc4", "/dev/ublkb7", "/run/dbdctl/4.sock", "/run/dbdctl/7.sock"} {
				if _, err := os.Stat(p); err == nil {
					t.Errorf("%s exists after a refused command", p)
				}
			}
		})
	}
	after := info(t)
	if len(after.Devices) != len(before.Devices) || after.Devices[0].FrontDevice != front {
		t.Errorf("device list changed: before %+v after %+v", before.Devices, after.Devices)
	}
	// The mounted front device survived the refused detach and still works.
	sh(t, `echo still-here > /mnt/probe && sync && grep -q still-here /mnt/probe`)
	must(t, "umount", "/mnt")
	detach(t, 0)
}

package server

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/ublk"
)

func TestParseMinor(t *testing.T) {
	tests := []struct {
		in      string
		want    int
		wantErr string // "" = valid
	}{
		{"0", 0, ""},
		{"1", 1, ""},
		{"255", 255, ""},
		{"007", 7, ""},
		{"000", 0, ""},
		{"", 0, "minor is empty"},
		{"abc", 0, `minor "abc" is not a number`},
		{"-1", 0, `minor "-1" is not a number`},
		{"+1", 0, `minor "+1" is not a number`},
		{"1.5", 0, `minor "1.5" is not a number`},
		{" 1", 0, `minor " 1" is not a number`},
		{"1 ", 0, `minor "1 " is not a number`},
		{"0x1", 0, `minor "0x1" is not a number`},
		{"١", 0, "is not a number"}, // Arabic-Indic digit one
		{"256", 0, "minor 256 is out of range 0..255"},
		{"1000", 0, "minor 1000 is out of range 0..255"},
		{"9223372036854775807", 0, "out of range 0..255"},
		{"99999999999999999999999999", 0, "out of range 0..255"},
	}
	for _, tt := range tests {
		got, err := ParseMinor(tt.in)
		if tt.wantErr == "" {
			if err != nil || got != tt.want {
				t.Errorf("ParseMinor(%q) = %d, %v; want %d, nil", tt.in, got, err, tt.want)
			}
			continue
		}
		if err == nil {
			t.Errorf("ParseMinor(%q) = %d, nil; want error %q", tt.in, got, tt.wantErr)
			continue
		}
		if !strings.Contains(err.Error(), tt.wantErr) {
			t.Errorf("ParseMinor(%q) error = %q, want it to contain %q", tt.in, err, tt.wantErr)
		}
		if got != 0 {
			t.Errorf("ParseMinor(%q) returned %d with an error", tt.in, got)
		}
	}
}

// findBlockDevice returns a block device node under /dev, or "".
func findBlockDevice(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/xvda", "/dev/loop0"} {
		var st unix.Stat_t
		if unix.Stat(p, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK {
			return p
		}
	}
	entries, _ := os.ReadDir("/dev")
	for _, e := range entries {
		if e.Type()&os.ModeDevice != 0 && e.Type()&os.ModeCharDevice == 0 {
			return filepath.Join("/dev", e.Name())
		}
	}
	return ""
}

func TestCheckAttachHostOnly(t *testing.T) {
	tmp := t.TempDir()
	file := filepath.Join(tmp, "disk.img")
	if err := os.WriteFile(file, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(tmp, "no-such-device")
	tests := []struct {
		name  string
		path  string
		minor int
		want  string
	}{
		{"missing", missing, 0, missing + " does not exist"},
		{"regular file", file, 0, file + " is not a block device"},
		{"directory", tmp, 0, tmp + " is not a block device"},
		{"char device", "/dev/null", 3, "/dev/null is not a block device"},
		{"minor -1", file, -1, "minor -1 is out of range 0..255"},
		{"minor 256", file, 256, "minor 256 is out of range 0..255"},
		// The minor is checked before the path.
		{"minor and path both bad", missing, 1000, "minor 1000 is out of range 0..255"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckAttach(tt.path, tt.minor)
			if err == nil || err.Error() != tt.want {
				t.Fatalf("CheckAttach(%q, %d) = %v, want %q", tt.path, tt.minor, err, tt.want)
			}
		})
	}
}

func TestCheckAttachWithoutUblk(t *testing.T) {
	if _, err := os.Stat(ublk.ControlPath); err == nil {
		t.Skipf("%s exists: this host has ublk, so CheckAttach would go on to probe the device", ublk.ControlPath)
	}
	dev := findBlockDevice(t)
	if dev == "" {
		t.Skip("no block device on this host")
	}
	if err := CheckAttach(dev, 0); !errors.Is(err, ublk.ErrNoUblk) {
		t.Fatalf("CheckAttach(%q, 0) without %s = %v, want ErrNoUblk", dev, ublk.ControlPath, err)
	}
}

func TestMountPoint(t *testing.T) {
	// Devices backing "/" and the test's temporary directory are mounted;
	// MountPoint must name a mount point of that same device.
	found := 0
	for _, p := range []string{"/", t.TempDir()} {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			t.Fatal(err)
		}
		dev := uint64(st.Dev)
		mnt := MountPoint(dev)
		if mnt == "" {
			t.Logf("%s (%d:%d) has no mountinfo entry (btrfs or overlay?)", p, unix.Major(dev), unix.Minor(dev))
			continue
		}
		found++
		var mst unix.Stat_t
		if err := unix.Stat(mnt, &mst); err != nil {
			t.Errorf("MountPoint(%d:%d) = %q, which cannot be stat'ed: %v", unix.Major(dev), unix.Minor(dev), mnt, err)
			continue
		}
		if uint64(mst.Dev) != dev {
			t.Errorf("MountPoint(%d:%d) = %q, which is on %d:%d", unix.Major(dev), unix.Minor(dev), mnt,
				unix.Major(uint64(mst.Dev)), unix.Minor(uint64(mst.Dev)))
		}
	}

	// A mounted block device: its rdev is what CheckAttach passes.
	if dev := findMountedBlockDevice(t); dev != "" {
		var st unix.Stat_t
		if err := unix.Stat(dev, &st); err != nil {
			t.Fatal(err)
		}
		mnt := MountPoint(uint64(st.Rdev))
		if mnt == "" {
			t.Errorf("MountPoint(rdev of %s) = \"\", want its mount point", dev)
		} else {
			found++
			var mst unix.Stat_t
			if err := unix.Stat(mnt, &mst); err != nil || mst.Dev != st.Rdev {
				t.Errorf("MountPoint(rdev of %s) = %q, which is not on %s (%v)", dev, mnt, dev, err)
			}
		}
	}
	if found == 0 {
		t.Skip("no mounted device with a mountinfo entry found")
	}
}

// findMountedBlockDevice returns a block device node that /proc/self/mountinfo
// lists as a mount source by its major:minor, or "".
func findMountedBlockDevice(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	mounted := map[string]bool{}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 5 {
			mounted[f[2]] = true
		}
	}
	entries, _ := os.ReadDir("/dev")
	for _, e := range entries {
		if e.Type()&os.ModeDevice == 0 || e.Type()&os.ModeCharDevice != 0 {
			continue
		}
		p := filepath.Join("/dev", e.Name())
		var st unix.Stat_t
		if unix.Stat(p, &st) != nil {
			continue
		}
		if mounted[fmt.Sprintf("%d:%d", unix.Major(uint64(st.Rdev)), unix.Minor(uint64(st.Rdev)))] {
			return p
		}
	}
	return ""
}

// TestMountPointEveryMount checks MountPoint against every entry of
// mountinfo whose mount point is not hidden by a later mount: the path it
// returns must be on the device looked up.
func TestMountPointEveryMount(t *testing.T) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Skipf("no mountinfo: %v", err)
	}
	type entry struct{ dev, mnt string }
	var entries []entry
	uses := map[string]int{}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		entries = append(entries, entry{f[2], f[4]})
		uses[f[4]]++
	}
	seen := map[string]bool{}
	checked := 0
	for _, e := range entries {
		if seen[e.dev] {
			continue // MountPoint reports the first mount of a device
		}
		seen[e.dev] = true
		if uses[e.mnt] > 1 || strings.Contains(e.mnt, "\\") {
			continue // overmounted, or an escaped name stat cannot take
		}
		var major, minor uint32
		if _, err := fmt.Sscanf(e.dev, "%d:%d", &major, &minor); err != nil {
			t.Fatalf("bad major:minor %q in mountinfo", e.dev)
		}
		dev := unix.Mkdev(major, minor)
		got := MountPoint(dev)
		var st unix.Stat_t
		if err := unix.Stat(got, &st); err != nil {
			if got == "" {
				t.Errorf("MountPoint(%s) = \"\", want %s", e.dev, e.mnt)
			}
			continue
		}
		if uint64(st.Dev) != dev {
			t.Errorf("MountPoint(%s) = %q, which is on %d:%d (want %s)", e.dev, got,
				unix.Major(uint64(st.Dev)), unix.Minor(uint64(st.Dev)), e.mnt)
		}
		checked++
	}
	if checked == 0 {
		t.Skip("no usable mountinfo entries")
	}
}

func TestMountPointNotMounted(t *testing.T) {
	// The largest major and minor Linux encodes; nothing is mounted from it.
	if mnt := MountPoint(unix.Mkdev(4095, 1<<20-1)); mnt != "" {
		t.Errorf("MountPoint(4095:1048575) = %q, want \"\"", mnt)
	}
}

func TestProcessAlive(t *testing.T) {
	if !processAlive(os.Getpid()) {
		t.Errorf("processAlive(own pid %d) = false", os.Getpid())
	}
	cmd := exec.Command("sleep", "0")
	if err := cmd.Start(); err != nil {
		t.Skipf("cannot start a child: %v", err)
	}
	pid := cmd.Process.Pid
	// Unreaped, the exited child is a zombie: not alive.
	deadline := time.Now().Add(10 * time.Second)
	for processAlive(pid) {
		if time.Now().After(deadline) {
			cmd.Wait()
			t.Fatalf("processAlive(%d) still true for an exited, unreaped child", pid)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err != nil || !strings.Contains(string(data), ") Z ") {
		t.Errorf("child %d is not a zombie (%q, %v): the test did not check the zombie case", pid, data, err)
	}
	cmd.Wait()
	if processAlive(pid) {
		t.Errorf("processAlive(%d) = true for a reaped child", pid)
	}
}

func TestRemoveOrphanWithoutDevice(t *testing.T) {
	const minor = 251
	if _, err := os.Stat(fmt.Sprintf("/dev/ublkc%d", minor)); err == nil {
		t.Skipf("/dev/ublkc%d exists on this host", minor)
	}
	removed, err := RemoveOrphan(minor)
	if removed || err != nil {
		t.Errorf("RemoveOrphan(%d) with no char device = %v, %v; want false, nil", minor, removed, err)
	}
}

func TestUnescapeOctal(t *testing.T) {
	for in, want := range map[string]string{
		`/mnt/my\040disk`: "/mnt/my disk",
		`/a\134b`:         `/a\b`,
		`/plain`:          "/plain",
		`/trail\04`:       `/trail\04`,
	} {
		if got := unescapeOctal(in); got != want {
			t.Errorf("unescapeOctal(%q) = %q, want %q", in, got, want)
		}
	}
}

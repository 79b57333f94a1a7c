package blockdev

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

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

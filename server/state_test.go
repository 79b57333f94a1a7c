package server

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dbdublk/dbdublk/cow"
)

func useStateDir(t *testing.T) string {
	t.Helper()
	old := StateDir
	StateDir = t.TempDir()
	t.Cleanup(func() { StateDir = old })
	return StateDir
}

// TestStateFiles: state files round-trip, bad ones are reported and
// skipped, and a COW file on the volume is found by its path or by its
// path relative to the volume's mount point.
func TestStateFiles(t *testing.T) {
	dir := useStateDir(t)
	onVol := Persisted{Minor: 3, BlockDevice: "/dev/vdb", Mode: "incremental", CowFile: "/data/.datto",
		CowRelative: ".datto", CowExtents: []cow.Extent{{Logical: 0, Physical: 1 << 20, Length: 1 << 20}}}
	for _, p := range []Persisted{
		{Minor: 7, BlockDevice: "/dev/vda", Mode: "passthrough"},
		onVol,
	} {
		if err := writeState(p); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(dir, "9.json"), []byte("{not json"), 0o600)
	os.WriteFile(filepath.Join(dir, "10.json"), []byte(`{"minor": 11, "block_device": "/dev/x", "mode": "passthrough"}`), 0o600)
	os.WriteFile(filepath.Join(dir, "12.json"), []byte(`{"minor": 12, "block_device": "/dev/x", "mode": "frozen"}`), 0o600)
	states, problems := LoadStates()
	if len(states) != 2 || states[0].Minor != 3 || states[1].Minor != 7 {
		t.Fatalf("states %+v", states)
	}
	if len(states[0].CowExtents) != 1 || states[0].CowExtents[0].Physical != 1<<20 {
		t.Fatalf("extents lost: %+v", states[0])
	}
	if len(problems) != 3 {
		t.Fatalf("problems %v", problems)
	}
	for i, want := range []string{"10.json", "12.json", "9.json"} {
		if !strings.Contains(problems[i].Error(), want) {
			t.Errorf("problem %d %q does not name %s", i, problems[i], want)
		}
	}
	for _, path := range []string{"/data/.datto", ".datto", "/.datto"} {
		if p, ok := OnVolumeRecord(3, path); !ok || p.CowFile != "/data/.datto" {
			t.Errorf("%s: %+v %v", path, p, ok)
		}
	}
	if _, ok := OnVolumeRecord(3, "/elsewhere/.datto"); ok {
		t.Error("an unrelated path matched")
	}
	if _, ok := OnVolumeRecord(7, "/data/.datto"); ok {
		t.Error("another minor's file matched")
	}
	if _, err := os.Stat(StatePath(3) + ".tmp"); err == nil {
		t.Error("a temporary state file was left behind")
	}
}

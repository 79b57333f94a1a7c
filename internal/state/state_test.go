package state

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/linux"
)

func useDir(t *testing.T) string {
	t.Helper()
	old := Dir
	Dir = t.TempDir()
	t.Cleanup(func() { Dir = old })
	return Dir
}

// TestStateFiles: records round-trip, bad files are reported and skipped,
// and a COW file on the volume is found by its path or by its path
// relative to the volume's mount point.
func TestStateFiles(t *testing.T) {
	dir := useDir(t)
	onVol := Record{Minor: 3, BlockDevice: "/dev/vdb", Mode: dattobd.Incremental, CowFile: "/data/.datto",
		CowRelative: ".datto", CowExtents: []linux.Extent{{Logical: 0, Physical: 1 << 20, Length: 1 << 20}}}
	for _, r := range []Record{{Minor: 7, BlockDevice: "/dev/vda", Mode: dattobd.Passthrough}, onVol} {
		if err := Write(r); err != nil {
			t.Fatal(err)
		}
	}
	b, _ := os.ReadFile(Path(3))
	if !strings.Contains(string(b), `"mode": "incremental"`) {
		t.Errorf("mode is not written by name: %s", b)
	}
	os.WriteFile(filepath.Join(dir, "9.json"), []byte("{not json"), 0o600)
	os.WriteFile(filepath.Join(dir, "10.json"), []byte(`{"minor": 11, "block_device": "/dev/x", "mode": "passthrough"}`), 0o600)
	os.WriteFile(filepath.Join(dir, "12.json"), []byte(`{"minor": 12, "block_device": "/dev/x", "mode": "frozen"}`), 0o600)
	// A live insertion must name its own minor's hidden device: detach
	// removes that device by this name.
	os.WriteFile(filepath.Join(dir, "13.json"), []byte(`{"minor": 13, "block_device": "/dev/mapper/vg-lv", "mode": "passthrough", "live": {"volume": "vg-lv", "hidden": "vg-root"}}`), 0o600)
	os.WriteFile(filepath.Join(dir, "14.json"), []byte(`{"minor": 14, "block_device": "/dev/mapper/vg-lv", "mode": "passthrough", "live": {"volume": "vg-lv", "hidden": "dbdctl14-real"}}`), 0o600)
	records, problems := Load()
	if len(records) != 3 || records[0].Minor != 3 || records[1].Minor != 7 || records[2].Minor != 14 || records[2].Live == nil {
		t.Fatalf("records %+v", records)
	}
	records = records[:2]
	if len(records[0].CowExtents) != 1 || records[0].CowExtents[0].Physical != 1<<20 {
		t.Fatalf("extents lost: %+v", records[0])
	}
	if len(problems) != 4 {
		t.Fatalf("problems %v", problems)
	}
	for i, want := range []string{"10.json", "12.json", "13.json", "9.json"} {
		if !strings.Contains(problems[i].Error(), want) {
			t.Errorf("problem %d %q does not name %s", i, problems[i], want)
		}
	}
	for _, path := range []string{"/data/.datto", ".datto", "/.datto"} {
		if r, ok := OnVolume(3, path); !ok || r.CowFile != "/data/.datto" {
			t.Errorf("%s: %+v %v", path, r, ok)
		}
	}
	if _, ok := OnVolume(3, "/elsewhere/.datto"); ok {
		t.Error("an unrelated path matched")
	}
	if _, ok := OnVolume(7, "/data/.datto"); ok {
		t.Error("another minor's file matched")
	}
	if _, err := os.Stat(Path(3) + ".tmp"); err == nil {
		t.Error("a temporary state file was left behind")
	}
	if err := Remove(3); err != nil {
		t.Fatal(err)
	}
	if _, ok := Find(3); ok {
		t.Error("a removed record is still found")
	}
	if err := Remove(3); err != nil {
		t.Errorf("removing a missing record: %v", err)
	}
}

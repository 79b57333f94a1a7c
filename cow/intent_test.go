package cow

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRegionShift(t *testing.T) {
	for _, c := range []struct {
		dev   int64
		shift uint
	}{
		{512 << 20, 22},
		{20 << 30, 22},
		{90 << 30, 22},
		{100 << 30, 23},
		{1 << 40, 26},
		{1 << 50, 36},
	} {
		got := regionShift(Blocks(c.dev))
		if got != c.shift {
			t.Errorf("%d-byte device: region 2^%d, want 2^%d", c.dev, got, c.shift)
		}
		if n := (c.dev + 1<<got - 1) >> got; n > intentMaxBits {
			t.Errorf("%d-byte device: %d regions do not fit %d bits", c.dev, n, intentMaxBits)
		}
	}
}

// TestRecoverRefuses: a dirty file without a record (a crashed snapshot, or
// dattobd's own) and a torn record are refused and left as they were.
func TestRecoverRefuses(t *testing.T) {
	const dev = 64 << 20
	dir := t.TempDir()
	snap := filepath.Join(dir, "snap")
	f := mustCreate(t, snap, Options{DeviceSize: dev})
	f.Close(false)
	before, _ := os.ReadFile(snap)
	if _, _, err := openPath(snap, ReloadIncremental, dev, 0); !errors.Is(err, ErrMode) {
		t.Fatalf("crashed snapshot as an incremental: %v", err)
	}
	if _, _, err := openPath(snap, ReloadSnapshot, dev, 0); !errors.Is(err, ErrNotClean) {
		t.Fatalf("crashed snapshot: %v", err)
	}
	if after, _ := os.ReadFile(snap); string(after) != string(before) {
		t.Fatal("a refused recovery changed the file")
	}

	inc := filepath.Join(dir, "inc")
	g := mustCreate(t, inc, Options{DeviceSize: dev, IndexOnly: true})
	if err := g.EnableIntent(); err != nil {
		t.Fatal(err)
	}
	if must, err := g.MarkRange(10, 20); err != nil || !must {
		t.Fatalf("first mark in a region: %v %v", must, err)
	}
	if err := g.CommitIntent(); err != nil {
		t.Fatal(err)
	}
	if must, _ := g.MarkRange(30, 31); must {
		t.Fatal("a recorded region asked for another commit")
	}
	g.Close(false)
	torn, _ := os.ReadFile(inc)
	torn[intentOff+intentBitsOff] ^= 0x80
	os.WriteFile(inc, torn, 0o600)
	if _, _, err := openPath(inc, ReloadIncremental, dev, 0); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "a full backup is required") {
		t.Fatalf("torn record: %v", err)
	}
	if after, _ := os.ReadFile(inc); string(after) != string(torn) {
		t.Fatal("a refused recovery changed the file")
	}
	// Without a record at all (a dirty file of dattobd's): refused too.
	clear(torn[intentOff:])
	os.WriteFile(inc, torn, 0o600)
	if _, _, err := openPath(inc, ReloadIncremental, dev, 0); !errors.Is(err, ErrNotClean) || !strings.Contains(err.Error(), "a full backup is required") {
		t.Fatalf("dirty file without a record: %v", err)
	}
}

// TestCleanCloseDropsIntent: a cleanly closed file has its reserved space
// zero again (what dattobd writes), and reopens without recovery.
func TestCleanCloseDropsIntent(t *testing.T) {
	const dev = 64 << 20
	path := tempPath(t)
	f := mustCreate(t, path, Options{DeviceSize: dev, IndexOnly: true})
	if err := f.EnableIntent(); err != nil {
		t.Fatal(err)
	}
	if must, _ := f.MarkRange(5, 6); must {
		f.CommitIntent()
	}
	if err := f.Close(true); err != nil {
		t.Fatal(err)
	}
	if !readRaw(t, path).reservedZero() {
		t.Fatal("clean file keeps a write-intent record")
	}
	before, _ := os.ReadFile(path)
	if _, _, err := openPath(path, ReloadSnapshot, dev, 0); !errors.Is(err, ErrMode) {
		t.Fatalf("incremental file as a snapshot: %v", err)
	}
	if after, _ := os.ReadFile(path); string(after) != string(before) {
		t.Fatal("a refused ReloadSnapshot changed the file")
	}
	g, rec, err := openPath(path, ReloadIncremental, dev, 0)
	if err != nil || rec.Crashed {
		t.Fatalf("clean reopen: %+v %v", rec, err)
	}
	defer g.Close(false)
	if e, _ := g.Lookup(5); e != 1 {
		t.Fatalf("block 5 entry %d", e)
	}
}

// After IntentAll, a crash recovers the file with every block changed; a
// clean close afterwards drops the record again.
func TestIntentAll(t *testing.T) {
	const dev = 64 << 20
	path := tempPath(t)
	f := mustCreate(t, path, Options{DeviceSize: dev, IndexOnly: true})
	if err := f.IntentAll(); !errors.Is(err, ErrMode) {
		t.Fatalf("IntentAll without intent logging = %v", err)
	}
	if err := f.EnableIntent(); err != nil {
		t.Fatal(err)
	}
	if err := f.IntentAll(); err != nil {
		t.Fatal(err)
	}
	crashed := filepath.Join(t.TempDir(), "crashed")
	b, _ := os.ReadFile(path)
	os.WriteFile(crashed, b, 0o600)
	g, rec, err := openPath(crashed, ReloadIncremental, dev, 0)
	if err != nil || !rec.Crashed {
		t.Fatalf("recover after IntentAll: %+v %v", rec, err)
	}
	if n := g.NrChangedBlocks(); n != Blocks(dev) {
		t.Fatalf("%d of %d blocks marked after a crash following IntentAll", n, Blocks(dev))
	}
	g.Close(false)
	if err := f.Close(true); err != nil {
		t.Fatal(err)
	}
	if !readRaw(t, path).reservedZero() {
		t.Fatal("a clean close kept the record IntentAll wrote")
	}
}

package cow

import (
	"errors"
	"os"
	"strings"
	"syscall"
	"testing"
)

// A recorded failure is durable and refuses every writable reopen, in
// every mode, with the reason and "a full backup is required"; a read-only
// open (update-img) sees it; the file is never closed clean; and every
// header write after it (checkpoints, intent commits) keeps it.
func TestFailureRecord(t *testing.T) {
	const size = 64 << 20
	for _, indexOnly := range []bool{true, false} {
		path := tempPath(t)
		f := mustCreate(t, path, Options{DeviceSize: size, IndexOnly: indexOnly})
		if indexOnly {
			if err := f.EnableIntent(); err != nil {
				t.Fatal(err)
			}
		}
		if err := f.RecordFailure(syscall.EFBIG, "COW file is full"); err != nil {
			t.Fatal(err)
		}
		// A second failure does not replace the first.
		if err := f.RecordFailure(syscall.EIO, "later"); err != nil {
			t.Fatal(err)
		}
		if x := f.Failed(); x == nil || x.Errno != syscall.EFBIG || x.Reason != "COW file is full" {
			t.Fatalf("Failed() = %+v", x)
		}
		// The record is on disk at once (no close needed).
		raw := readRaw(t, path)
		x, err := parseFailure(raw.b[:HeaderSize])
		if err != nil || x == nil || x.Errno != syscall.EFBIG {
			t.Fatalf("on disk after RecordFailure: %+v, %v", x, err)
		}
		// Every header write after it keeps it.
		kept := func(what string) {
			t.Helper()
			if x, _ := parseFailure(readRaw(t, path).b[:HeaderSize]); x == nil {
				t.Fatalf("%s after the failure dropped its record", what)
			}
		}
		if indexOnly {
			if must, err := f.MarkRange(0, 10); err != nil || !must {
				t.Fatalf("MarkRange = %v, %v", must, err)
			}
			if err := f.CommitIntent(); err != nil {
				t.Fatal(err)
			}
			kept("CommitIntent")
			if err := f.Checkpoint(); err != nil {
				t.Fatal(err)
			}
			kept("Checkpoint")
		} else if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		kept("Sync")
		if err := f.Close(true); err != nil {
			t.Fatal(err)
		}
		raw = readRaw(t, path)
		if raw.flags()&FlagClean != 0 {
			t.Fatal("a failed file was closed clean")
		}
		for _, mode := range []Mode{ReloadSnapshot, ResumeSnapshot, ReloadIncremental} {
			g, _, err := openPath(path, mode, size, 0)
			if err == nil {
				g.Close(false)
				t.Fatalf("mode %d opened a failed file", mode)
			}
			if !errors.Is(err, ErrFailed) || !strings.Contains(err.Error(), "COW file is full") ||
				!strings.Contains(err.Error(), "a full backup is required") {
				t.Errorf("mode %d: %v", mode, err)
			}
		}
		g := mustOpen(t, path, ReadOnly, 0, 0)
		if x := g.Failed(); x == nil || x.Errno != syscall.EFBIG {
			t.Errorf("read-only open does not see the failure: %+v", x)
		}
		g.Close(false)
		after := readRaw(t, path)
		if string(after.b) != string(raw.b) {
			t.Error("refused opens changed the file")
		}
	}
}

// A torn failure record is not ignored: the file is corrupt.
func TestFailureRecordTorn(t *testing.T) {
	path := tempPath(t)
	f := mustCreate(t, path, Options{DeviceSize: 1 << 20, IndexOnly: true})
	if err := f.RecordFailure(syscall.EIO, "write failed"); err != nil {
		t.Fatal(err)
	}
	f.Close(false)
	writeAt(t, path, []byte{'X'}, reasonOff)
	for _, mode := range []Mode{ReadOnly, ReloadIncremental} {
		if _, _, err := openPath(path, mode, 1<<20, 0); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "failure record is torn") {
			t.Errorf("mode %d: torn record: %v", mode, err)
		}
	}
}

// A long reason is cut to fit, and the record still checks out.
func TestFailureRecordLongReason(t *testing.T) {
	b := make([]byte, HeaderSize)
	putFailure(b, &Failure{Errno: syscall.EIO, Reason: strings.Repeat("x", 1000)})
	x, err := parseFailure(b)
	if err != nil || x == nil || len(x.Reason) != maxReason {
		t.Fatalf("%v %v", x, err)
	}
	if b[failureEnd] != 0 {
		t.Fatal("the record spilled past its end")
	}
}

func TestFailureNeedsWritableFile(t *testing.T) {
	path := tempPath(t)
	mustCreate(t, path, Options{DeviceSize: 1 << 20, IndexOnly: true}).Close(true)
	g := mustOpen(t, path, ReadOnly, 0, 0)
	defer g.Close(false)
	if err := g.RecordFailure(syscall.EIO, "x"); !errors.Is(err, ErrMode) {
		t.Errorf("RecordFailure on a read-only file = %v", err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatal(err)
	}
}

// MarkFailed fails a closed file (clean or not) for good.
func TestMarkFailed(t *testing.T) {
	const size = 8 << 20
	path := tempPath(t)
	f := mustCreate(t, path, Options{DeviceSize: size, IndexOnly: true})
	f.Close(true)
	s, err := FileStorage(path, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := MarkFailed(path, s, syscall.EIO, "recovery failed"); err != nil {
		t.Fatal(err)
	}
	if readRaw(t, path).flags()&FlagClean != 0 {
		t.Error("a file marked failed is still clean")
	}
	if _, _, err := openPath(path, ReloadIncremental, size, 0); !errors.Is(err, ErrFailed) || !strings.Contains(err.Error(), "recovery failed") {
		t.Errorf("reload of a file marked failed: %v", err)
	}
	// A second mark keeps the first.
	s, _ = FileStorage(path, false)
	if err := MarkFailed(path, s, syscall.EFBIG, "other"); err != nil {
		t.Fatal(err)
	}
	g := mustOpen(t, path, ReadOnly, 0, 0)
	defer g.Close(false)
	if x := g.Failed(); x == nil || x.Reason != "recovery failed" {
		t.Errorf("record after a second mark: %+v", x)
	}
}

// A failure record whose write failed (the file's storage erring) is
// written by the next RecordFailure, once the storage works again, and it
// is still the first failure that is recorded.
func TestFailureRecordRetried(t *testing.T) {
	const size = 16 << 20
	path := tempPath(t)
	mustCreate(t, path, Options{DeviceSize: size, IndexOnly: true}).Close(true)
	f, h := openHooked(t, path, ReloadIncremental, size, 0)
	defer f.Close(false)
	h.onWrite = func([]byte, int64) error { return errInjected }
	if err := f.RecordFailure(syscall.EIO, "the change list cannot be written"); err == nil {
		t.Fatal("RecordFailure succeeded on a failing storage")
	}
	if x, _ := parseFailure(readRaw(t, path).b[:HeaderSize]); x != nil {
		t.Fatal("a failure record reached the file through a failing storage")
	}
	h.onWrite = nil
	if err := f.RecordFailure(syscall.EFBIG, "later"); err != nil {
		t.Fatal(err)
	}
	x, err := parseFailure(readRaw(t, path).b[:HeaderSize])
	if err != nil || x == nil || x.Errno != syscall.EIO || x.Reason != "the change list cannot be written" {
		t.Fatalf("on disk after the retry: %+v, %v; want the first failure", x, err)
	}
}

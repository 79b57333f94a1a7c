package ctl

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gofrs/flock"

	"github.com/dbdublk/dbdublk/internal/daemon"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/frontfs"
	"github.com/dbdublk/dbdublk/internal/linux"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/internal/protocol/protocoltest"
	"github.com/dbdublk/dbdublk/internal/state"
)

// useRunDir points the run and state directories at fresh ones, so no test
// talks to a server of this host or reads its records.
func useRunDir(t *testing.T) {
	protocoltest.UseRunDir(t)
	old := state.Dir
	state.Dir = t.TempDir()
	t.Cleanup(func() { state.Dir = old })
}

// run runs dbdctl with the real daemon host (its checks run; no test
// reaches a point where a server would be started).
func run(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = Main(args, &out, &errb, daemon.Host{})
	return code, out.String(), errb.String()
}

// wantOneLineError checks the failure contract: a non-zero status and one
// line on stderr, never a stack trace.
func wantOneLineError(t *testing.T, args []string, code int, stdout, stderr string) {
	t.Helper()
	if code == 0 {
		t.Errorf("Main(%q) = 0, want non-zero", args)
	}
	if strings.Count(stderr, "\n") != 1 || !strings.HasSuffix(stderr, "\n") {
		t.Errorf("Main(%q) stderr is not exactly one line: %q", args, stderr)
	}
	if !strings.HasPrefix(stderr, "dbdctl: ") {
		t.Errorf("Main(%q) stderr = %q, want a \"dbdctl: \" prefix", args, stderr)
	}
	for _, bad := range []string{"panic", "goroutine", "internal error", ".go:"} {
		if strings.Contains(stderr, bad) {
			t.Errorf("Main(%q) stderr contains %q: %q", args, bad, stderr)
		}
	}
	if stdout != "" {
		t.Errorf("Main(%q) wrote to stdout on failure: %q", args, stdout)
	}
}

func isRoot() bool { return os.Geteuid() == 0 }

func exists(path string) bool { _, err := os.Stat(path); return err == nil }

func TestMainErrors(t *testing.T) {
	useRunDir(t)
	tests := []struct {
		args     []string
		code     int
		want     string // substring of stderr
		needRoot bool   // want holds only when running as root
	}{
		{nil, 2, `expected one of "attach", "detach", "info", "setup-snapshot"`, false},
		{[]string{"frobnicate"}, 2, "unexpected argument frobnicate", false},
		{[]string{"--no-such-flag"}, 2, "unknown flag --no-such-flag", false},
		{[]string{"attach", "onlyonearg"}, 2, `expected "<minor>"`, false},
		{[]string{"attach"}, 2, `expected "<block-device> <minor>"`, false},
		{[]string{"detach"}, 2, "missing minor (or --all)", false},
		{[]string{"detach", "--all", "3"}, 2, "give a minor or --all, not both", false},
		{[]string{"reload-incremental", "/dev/vda", "/tmp/x"}, 2, `expected "<minor>"`, false},
		{[]string{"reload-snapshot", "/dev/vda", "/tmp/x", "999"}, 2, "minor 999 is out of range 0..255", false},
		{[]string{"reload-incremental", "--cache=-5", "/dev/vda", "/tmp/x", "1"}, 1, "cache size must not be negative", false},
		{[]string{"reload-incremental", "/dev/vda", "/nonexistent/cow", "7"}, 1, "COW file /nonexistent/cow does not exist", true},
		{[]string{"reload-snapshot", "/dev/vda", "/dev", "7"}, 1, "COW file /dev is not a regular file", true},
		{[]string{"attach", "/dev/vda", "1", "extra"}, 2, "unexpected argument extra", false},
		{[]string{"attach", "--queues=x", "/dev/vda", "1"}, 2, "--queues", false},
		{[]string{"attach", "/dev/vda", "abc"}, 2, `minor "abc" is not a number`, false},
		{[]string{"attach", "/dev/vda", "256"}, 2, "minor 256 is out of range 0..255", false},
		{[]string{"attach", "/dev/vda", ""}, 2, "minor is empty", false},
		{[]string{"detach", "x"}, 2, `minor "x" is not a number`, false},
		{[]string{"detach", "-1"}, 2, "unknown flag -1", false},
		{[]string{"info", "300"}, 2, "minor 300 is out of range 0..255", false},
		{[]string{"info", "1.5"}, 2, `minor "1.5" is not a number`, false},
		{[]string{"transition-to-incremental", "0x1"}, 2, `minor "0x1" is not a number`, false},
		{[]string{"update-img", "--workers=0", "/dev/datto0", "/c", "/i"}, 1, "workers must be 1..64", false},
		{[]string{"update-img", "/dev/null", "/c", "/i"}, 1, "/dev/null does not appear to be a snapshot device", false},
		{[]string{"attach", "/nonexistent", "0"}, 1, "/nonexistent does not exist", true},
		{[]string{"attach", "/dev/null", "0"}, 1, "/dev/null is not a block device", true},
		{[]string{"detach", "5"}, 1, "minor 5 is not attached", true},
		{[]string{"attach", "--at-boot", "--force", "/dev/vda", "0"}, 2, "--at-boot takes neither --foreground nor --force", false},
		{[]string{"attach", "--at-boot", "/dev/null", "0"}, 1, "/dev/null is not a block device", true},
		{[]string{"info", "17"}, 1, "minor 17 is not attached", true},
	}
	for _, tt := range tests {
		if len(tt.args) == 2 && tt.args[0] == "detach" && exists("/dev/ublkc"+tt.args[1]) {
			// detach would treat a real ublk device of that minor as an orphan
			// and delete it.
			t.Logf("skipping %q: /dev/ublkc%s exists on this host", tt.args, tt.args[1])
			continue
		}
		code, stdout, stderr := run(tt.args...)
		wantOneLineError(t, tt.args, code, stdout, stderr)
		if code != tt.code {
			t.Errorf("Main(%q) = %d, want %d", tt.args, code, tt.code)
		}
		if tt.needRoot && !isRoot() {
			continue
		}
		if !strings.Contains(stderr, tt.want) {
			t.Errorf("Main(%q) stderr = %q, want it to contain %q", tt.args, stderr, tt.want)
		}
	}
}

func TestMainHelp(t *testing.T) {
	code, stdout, stderr := run("--help")
	if code != 0 {
		t.Errorf("--help = %d, want 0", code)
	}
	if stderr != "" {
		t.Errorf("--help wrote to stderr: %q", stderr)
	}
	for _, want := range []string{"Usage: dbdctl <command>", "attach", "detach", "info", "version"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("--help output lacks %q:\n%s", want, stdout)
		}
	}
	if strings.Contains(stdout, "Run a device server") {
		t.Errorf("--help lists the hidden serve command:\n%s", stdout)
	}

	code, stdout, stderr = run("attach", "--help")
	if code != 0 || stderr != "" {
		t.Errorf("attach --help = %d, stderr %q; want 0 and nothing", code, stderr)
	}
	for _, want := range []string{"Usage: dbdctl attach <block-device> <minor>", "--foreground", "--queues", "--max-io"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("attach --help output lacks %q:\n%s", want, stdout)
		}
	}
}

func TestMainVersion(t *testing.T) {
	code, stdout, stderr := run("version")
	if code != 0 || stderr != "" {
		t.Fatalf("version = %d, stderr %q", code, stderr)
	}
	if want := "dbdctl " + protocol.Version + "\n"; stdout != want {
		t.Errorf("version printed %q, want %q", stdout, want)
	}
}

// fakeServer answers dbdctl's control protocol for one minor in RunDir,
// through the real protocol server: info describes dev (nil: an answer
// without a device), every other request fails with err (nil: succeeds).
type fakeServer struct {
	dev *protocol.DeviceInfo
	err error

	mu  sync.Mutex
	ops []protocol.Op
}

func (f *fakeServer) note(op protocol.Op) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ops = append(f.ops, op)
	return f.err
}

func (f *fakeServer) received() []protocol.Op {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]protocol.Op(nil), f.ops...)
}

func (f *fakeServer) Info() protocol.DeviceInfo {
	f.note(protocol.OpInfo)
	if f.dev == nil {
		return protocol.DeviceInfo{}
	}
	return *f.dev
}
func (f *fakeServer) Detach(protocol.Detach) error { return f.note(protocol.OpDetach) }
func (f *fakeServer) SetupSnapshot(protocol.SetupSnapshot) error {
	return f.note(protocol.OpSetupSnapshot)
}
func (f *fakeServer) TransitionToIncremental() error {
	return f.note(protocol.OpTransitionToIncremental)
}
func (f *fakeServer) TransitionToSnapshot(protocol.TransitionToSnapshot) error {
	return f.note(protocol.OpTransitionToSnapshot)
}
func (f *fakeServer) Destroy() error                         { return f.note(protocol.OpDestroy) }
func (f *fakeServer) Reconfigure(protocol.Reconfigure) error { return f.note(protocol.OpReconfigure) }
func (f *fakeServer) ExpandCowFile(protocol.ExpandCowFile) error {
	return f.note(protocol.OpExpandCowFile)
}
func (f *fakeServer) ReconfigureAutoExpand(protocol.AutoExpand) error {
	return f.note(protocol.OpReconfigureAutoExpand)
}
func (f *fakeServer) UpdateImage(protocol.UpdateImage, []*os.File, func(protocol.Progress)) (protocol.UpdateImageDone, error) {
	return protocol.UpdateImageDone{}, f.note(protocol.OpUpdateImage)
}

func startFake(t *testing.T, m dattobd.Minor, f *fakeServer) *fakeServer {
	t.Helper()
	s, err := protocol.Listen(m, f)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { s.Serve(); close(done) }()
	t.Cleanup(func() { s.Close(); s.Drain(time.Second); <-done })
	return f
}

func fakeDevice(m dattobd.Minor) *protocol.DeviceInfo {
	return &protocol.DeviceInfo{Minor: m, BlockDevice: "/dev/sdz", State: dattobd.StateAttached,
		Mode: dattobd.Passthrough, Status: protocol.StatusServing, FrontDevice: m.FrontPath(), Size: 1 << 30,
		Stats: protocol.IOCounters{Writes: 9}}
}

func TestMainInfo(t *testing.T) {
	if !isRoot() {
		t.Skip("info needs root")
	}
	useRunDir(t)
	startFake(t, 3, &fakeServer{dev: fakeDevice(3)})

	for _, args := range [][]string{{"info"}, {"info", "3"}, {"info", "003"}} {
		code, stdout, stderr := run(args...)
		if code != 0 || stderr != "" {
			t.Fatalf("Main(%q) = %d, stderr %q", args, code, stderr)
		}
		var doc struct {
			Version string                `json:"version"`
			Devices []protocol.DeviceInfo `json:"devices"`
		}
		if err := json.Unmarshal([]byte(stdout), &doc); err != nil {
			t.Fatalf("Main(%q) printed invalid JSON %q: %v", args, stdout, err)
		}
		if doc.Version != protocol.Version {
			t.Errorf("Main(%q) version = %q", args, doc.Version)
		}
		if len(doc.Devices) != 1 || !reflect.DeepEqual(doc.Devices[0], *fakeDevice(3)) {
			t.Errorf("Main(%q) devices = %+v, want the fake device", args, doc.Devices)
		}
	}
}

func TestMainInfoNoDevices(t *testing.T) {
	if !isRoot() {
		t.Skip("info needs root")
	}
	useRunDir(t)
	code, stdout, stderr := run("info")
	if code != 0 || stderr != "" {
		t.Fatalf("info = %d, stderr %q", code, stderr)
	}
	// "devices" must be an empty list, not null, as in /proc/datto-info.
	if !strings.Contains(stdout, `"devices": []`) {
		t.Errorf("info with nothing attached printed %q, want an empty devices list", stdout)
	}
}

func TestMainDetach(t *testing.T) {
	if !isRoot() {
		t.Skip("detach needs root")
	}
	useRunDir(t)
	f := startFake(t, 3, &fakeServer{dev: fakeDevice(3)})
	code, stdout, stderr := run("detach", "3")
	if code != 0 || stderr != "" {
		t.Fatalf("detach 3 = %d, stderr %q", code, stderr)
	}
	if want := "detached /dev/sdz from /dev/ublkb3\n"; stdout != want {
		t.Errorf("detach 3 printed %q, want %q", stdout, want)
	}
	if got := f.received(); !reflect.DeepEqual(got, []protocol.Op{protocol.OpInfo, protocol.OpDetach}) {
		t.Errorf("server received %q, want [info detach]", got)
	}
}

// detach returns only once the device's supervisor (and so its server)
// has exited, so that attaching the minor again right away works.
func TestMainDetachWaitsForTheSupervisor(t *testing.T) {
	if !isRoot() {
		t.Skip("detach needs root")
	}
	useRunDir(t)
	startFake(t, 3, &fakeServer{dev: fakeDevice(3)})
	supervisor := flock.New(protocol.SupervisorLockPath(3))
	if ok, err := supervisor.TryLock(); !ok || err != nil {
		t.Fatalf("lock: %v %v", ok, err)
	}
	var exited atomic.Bool
	go func() {
		time.Sleep(200 * time.Millisecond) // the supervisor outlives the server's answer
		exited.Store(true)
		supervisor.Unlock()
	}()
	code, _, stderr := run("detach", "3")
	if code != 0 || stderr != "" {
		t.Fatalf("detach 3 = %d, stderr %q", code, stderr)
	}
	if !exited.Load() {
		t.Error("detach returned while the supervisor still held its lock")
	}
}

func TestMainDetachRefused(t *testing.T) {
	if !isRoot() {
		t.Skip("detach needs root")
	}
	useRunDir(t)
	// A multi-line server message still becomes one line.
	msg := "/dev/ublkb4 is in use (mounted or open);\nunmount or close it before detaching"
	startFake(t, 4, &fakeServer{dev: fakeDevice(4), err: protocol.Errorf(protocol.ErrInUse, "%s", msg)})
	args := []string{"detach", "4"}
	code, stdout, stderr := run(args...)
	wantOneLineError(t, args, code, stdout, stderr)
	if code != 1 {
		t.Errorf("refused detach = %d, want 1", code)
	}
	if want := "dbdctl: /dev/ublkb4 is in use (mounted or open); unmount or close it before detaching\n"; stderr != want {
		t.Errorf("refused detach stderr = %q, want %q", stderr, want)
	}
}

func TestOneLine(t *testing.T) {
	tests := map[string]string{
		"":                       "",
		"simple":                 "simple",
		"a\nb":                   "a b",
		"  lead\ttab\r\n trail ": "lead tab trail",
	}
	for in, want := range tests {
		if got := oneLine(in); got != want {
			t.Errorf("oneLine(%q) = %q, want %q", in, got, want)
		}
	}
}

// info lists the minors left tracking or failed in the state directory
// beside the attached ones, as dattobd lists dormant devices, with the
// recorded failure as dattobd's negative errno.
func TestMainInfoDormant(t *testing.T) {
	if !isRoot() {
		t.Skip("info needs root")
	}
	useRunDir(t)
	startFake(t, 3, &fakeServer{dev: fakeDevice(3)})
	for _, r := range []state.Record{
		{Minor: 1, BlockDevice: "/dev/sdb", Mode: dattobd.Incremental, CowFile: "/c1"},
		{Minor: 5, BlockDevice: "/dev/sdc", Mode: dattobd.Snapshot, CowFile: "/c5", Failure: &state.Failure{Errno: 27, Reason: "COW file is full"}},
		{Minor: 7, BlockDevice: "/dev/sdd", Mode: dattobd.Passthrough},
	} {
		if err := state.Write(r); err != nil {
			t.Fatal(err)
		}
	}
	code, stdout, stderr := run("info")
	if code != 0 || stderr != "" {
		t.Fatalf("info = %d, %q", code, stderr)
	}
	var doc struct {
		Devices []protocol.DeviceInfo `json:"devices"`
	}
	if err := json.Unmarshal([]byte(stdout), &doc); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, d := range doc.Devices {
		got = append(got, fmt.Sprintf("%d %s %d %d %s", d.Minor, d.Status, d.State, d.Error, d.CowFile))
	}
	want := []string{"1 dormant 0 0 /c1", "3 serving -1 0 ", "5 dormant 1 -27 /c5"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("info lists %q, want %q", got, want)
	}
	code, stdout, _ = run("info", "5")
	if code != 0 || !strings.Contains(stdout, `"error": -27`) || !strings.Contains(stdout, `"status": "dormant"`) {
		t.Errorf("info 5 = %d %s", code, stdout)
	}
	if code, _, stderr := run("info", "7"); code != 1 || !strings.Contains(stderr, "minor 7 is not attached") {
		t.Errorf("info of a plain detached minor = %d %q", code, stderr)
	}
}

// recordingHost is a Host that records the server options it is asked to
// run with.
type recordingHost struct {
	daemon.Host
	ran    protocol.ServeOptions
	helped bool
}

func (h *recordingHost) Run(o protocol.ServeOptions, _ *log.Logger, _ func(string)) error {
	h.ran = o
	return nil
}

func (h *recordingHost) FrontFSHelper() error {
	h.helped = true
	return nil
}

// The command a server starts its helper with (frontfs.Command) is the
// CLI's hidden helper command.
func TestFrontFSHelperCommand(t *testing.T) {
	h := &recordingHost{}
	var out, errb bytes.Buffer
	if code := Main([]string{frontfs.Command}, &out, &errb, h); code != 0 || !h.helped {
		t.Fatalf("%s = %d (helper run: %v): %s", frontfs.Command, code, h.helped, errb.String())
	}
}

// The server command line a spawner builds (protocol.ServeOptions.Args)
// parses back, through the CLI, into the very same options.
func TestServeArgsRoundTrip(t *testing.T) {
	o := protocol.ServeOptions{
		BlockDevice: "/dev/sdz", Minor: 9, ReadyFD: 3, Supervise: true, Force: true, KeepFailure: true,
		Queues: 3, Depth: 64, MaxIO: 1 << 19, Reload: dattobd.Incremental, CowFile: "/c", Cache: 1 << 20, Falloc: 7,
		Checkpoint: time.Minute, Copy: true,
	}
	h := &recordingHost{}
	var out, errb bytes.Buffer
	if code := Main(o.Args(), &out, &errb, h); code != 0 {
		t.Fatalf("serve %v = %d: %s", o.Args(), code, errb.String())
	}
	if h.ran != o {
		t.Errorf("parsed back %+v\nwant        %+v", h.ran, o)
	}
}

// refusingHost refuses every server start, as a kernel without ublk does.
type refusingHost struct {
	daemon.Host
	checked []protocol.ServeOptions
}

func (h *refusingHost) Check(o protocol.ServeOptions) error {
	h.checked = append(h.checked, o)
	return errors.New("no ublk here")
}

// A root volume whose tracking cannot be served at boot (here: no server
// can start) is booted from the real device, untracked: its boot record
// must say the tracking failed, so that no later boot resumes a change
// list that missed this boot's writes. Nothing is printed as the front
// device, and the server was asked for as a boot server.
func TestBootAttachRecordsFailure(t *testing.T) {
	useRunDir(t)
	dev := filepath.Join(t.TempDir(), "dev")
	if err := os.WriteFile(dev, make([]byte, 4<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0); err != nil {
		t.Skipf("O_DIRECT unsupported here: %v", err)
	} else {
		f.Close()
	}
	boot := &state.Boot{File: "/.dbdctl-boot3", Inode: 5, Extents: []linux.Extent{{Logical: 0, Physical: 2 << 20, Length: state.BootFileSize}}}
	rec := state.Record{Minor: 3, BlockDevice: dev, Mode: dattobd.Incremental, CowFile: "/.datto", CowRelative: ".datto",
		CowExtents: []linux.Extent{{Logical: 0, Physical: 0, Length: 1 << 20}}, Boot: boot}
	if err := state.Write(rec); err != nil {
		t.Fatal(err)
	}
	h := &refusingHost{}
	var out, errb bytes.Buffer
	code := Main([]string{"boot-attach", dev}, &out, &errb, h)
	if code == 0 || out.Len() != 0 {
		t.Fatalf("boot-attach = %d, stdout %q; want a failure and no front device", code, out.String())
	}
	got, err := state.ReadBoot(dev, boot.Extents)
	if err != nil {
		t.Fatal(err)
	}
	if got.Failure == nil || got.Mode != dattobd.Incremental {
		t.Fatalf("boot record after a boot that could not serve the root: %+v; want its tracking recorded failed", got)
	}
	if len(h.checked) == 0 || !h.checked[0].Boot || h.checked[0].Reload != dattobd.Incremental {
		t.Fatalf("server starts asked for: %+v; want a boot server resuming incremental first", h.checked)
	}
}

package server

import (
	"bufio"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// useRunDir points RunDir at a fresh directory for the test.
func useRunDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if len(dir) > 80 { // keep socket paths under sun_path's 108 bytes
		d, err := os.MkdirTemp("", "run")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
		dir = d
	}
	old := RunDir
	RunDir = dir
	t.Cleanup(func() { RunDir = old })
	return dir
}

// fakeServer answers the control protocol on SocketPath(minor): one JSON
// request line in, one JSON response line out.
type fakeServer struct {
	ln     net.Listener
	answer func(Request) *Response // nil: never answer (hold the connection)
	wg     sync.WaitGroup

	mu    sync.Mutex
	lines []string // raw request lines received
	hold  []net.Conn
}

func startFake(t *testing.T, minor int, answer func(Request) *Response) *fakeServer {
	t.Helper()
	ln, err := net.Listen("unix", SocketPath(minor))
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeServer{ln: ln, answer: answer}
	f.wg.Add(1)
	go f.serve()
	t.Cleanup(f.close)
	return f
}

func (f *fakeServer) serve() {
	defer f.wg.Done()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			f.handle(c)
		}()
	}
}

func (f *fakeServer) handle(c net.Conn) {
	line, err := bufio.NewReader(c).ReadString('\n')
	f.mu.Lock()
	f.lines = append(f.lines, line)
	f.mu.Unlock()
	if err != nil {
		c.Close()
		return
	}
	var req Request
	if err := json.Unmarshal([]byte(line), &req); err != nil {
		json.NewEncoder(c).Encode(Response{Error: "malformed request"})
		c.Close()
		return
	}
	resp := f.answer(req)
	if resp == nil {
		f.mu.Lock()
		f.hold = append(f.hold, c)
		f.mu.Unlock()
		return
	}
	json.NewEncoder(c).Encode(resp)
	c.Close()
}

func (f *fakeServer) close() {
	f.ln.Close()
	f.mu.Lock()
	for _, c := range f.hold {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

func (f *fakeServer) requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.lines...)
}

// infoServer answers info with a device for minor and rejects everything
// else with a server error.
func infoServer(minor int) func(Request) *Response {
	return func(req Request) *Response {
		switch req.Op {
		case "info":
			return &Response{Device: &DeviceInfo{
				Minor: minor, BlockDevice: "/dev/fake" + itoa(minor), State: StateAttached,
				Mode: "passthrough", FrontDevice: "/dev/ublkb" + itoa(minor), Size: 1 << 30,
				Stats: IOCounters{Reads: 3, BytesRead: 12288},
			}}
		case "detach":
			return &Response{Error: "/dev/ublkb" + itoa(minor) + " is in use (mounted or open); unmount or close it before detaching"}
		}
		return &Response{Error: "unknown request " + req.Op}
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

func TestSocketPath(t *testing.T) {
	dir := useRunDir(t)
	if got, want := SocketPath(5), filepath.Join(dir, "5.sock"); got != want {
		t.Errorf("SocketPath(5) = %q, want %q", got, want)
	}
}

func TestCall(t *testing.T) {
	useRunDir(t)
	f := startFake(t, 5, infoServer(5))

	resp, err := Call(5, Request{Op: "info"}, 5*time.Second)
	if err != nil {
		t.Fatalf("Call(5, info) = %v", err)
	}
	if resp.Error != "" || resp.Device == nil {
		t.Fatalf("Call(5, info) = %+v, want a device", resp)
	}
	d := resp.Device
	if d.Minor != 5 || d.FrontDevice != "/dev/ublkb5" || d.Size != 1<<30 || d.State != StateAttached ||
		d.Stats.Reads != 3 || d.Stats.BytesRead != 12288 {
		t.Errorf("device = %+v", *d)
	}
	if got := f.requests(); !reflect.DeepEqual(got, []string{`{"op":"info"}` + "\n"}) {
		t.Errorf("server received %q, want one line {\"op\":\"info\"}", got)
	}
}

func TestCallServerError(t *testing.T) {
	useRunDir(t)
	startFake(t, 5, infoServer(5))
	resp, err := Call(5, Request{Op: "detach"}, 5*time.Second)
	want := "/dev/ublkb5 is in use (mounted or open); unmount or close it before detaching"
	if err == nil || err.Error() != want {
		t.Fatalf("Call(5, detach) error = %v, want %q", err, want)
	}
	if errors.Is(err, ErrNotAttached) {
		t.Error("a server error is reported as not attached")
	}
	if resp == nil || resp.Error != want {
		t.Errorf("Call(5, detach) response = %+v, want Error %q", resp, want)
	}
}

func TestCallNotAttached(t *testing.T) {
	useRunDir(t)
	for _, minor := range []int{0, 9, 255} {
		resp, err := Call(minor, Request{Op: "info"}, time.Second)
		if !errors.Is(err, ErrNotAttached) {
			t.Errorf("Call(%d) error = %v, want ErrNotAttached", minor, err)
		}
		if want := "minor " + itoa(minor) + " is not attached"; err == nil || err.Error() != want {
			t.Errorf("Call(%d) error = %v, want %q", minor, err, want)
		}
		if resp != nil {
			t.Errorf("Call(%d) response = %+v, want nil", minor, resp)
		}
	}
}

func TestCallStaleSocket(t *testing.T) {
	useRunDir(t)
	staleSocket(t, 7)
	if _, err := os.Stat(SocketPath(7)); err != nil {
		t.Fatalf("stale socket file missing: %v", err)
	}
	if _, err := Call(7, Request{Op: "info"}, time.Second); !errors.Is(err, ErrNotAttached) {
		t.Errorf("Call to a stale socket = %v, want ErrNotAttached", err)
	}
}

func TestCallTimeout(t *testing.T) {
	useRunDir(t)
	startFake(t, 4, func(Request) *Response { return nil })
	start := time.Now()
	_, err := Call(4, Request{Op: "info"}, 200*time.Millisecond)
	if err == nil {
		t.Fatal("Call to a silent server succeeded")
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("Call to a silent server = %v, want a deadline error", err)
	}
	if !strings.Contains(err.Error(), "minor 4: no answer to info") {
		t.Errorf("Call to a silent server = %q, want it to name the minor and request", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Call took %v with a 200ms timeout", d)
	}
}

func TestCallGarbageAnswer(t *testing.T) {
	useRunDir(t)
	ln, err := net.Listen("unix", SocketPath(6))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		bufio.NewReader(c).ReadString('\n')
		c.Write([]byte("not json\n"))
		c.Close()
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	if _, err := Call(6, Request{Op: "info"}, 5*time.Second); err == nil || !strings.Contains(err.Error(), "no answer to info") {
		t.Errorf("Call with a garbage answer = %v, want a no-answer error", err)
	}
}

// staleSocket leaves a socket file for minor with nobody listening.
func staleSocket(t *testing.T, minor int) {
	t.Helper()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: SocketPath(minor), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
}

func TestMinorsAndListDevices(t *testing.T) {
	dir := useRunDir(t)
	startFake(t, 12, infoServer(12))
	startFake(t, 5, infoServer(5))
	staleSocket(t, 7)
	// A server that answers without a device is skipped too.
	startFake(t, 200, func(Request) *Response { return &Response{} })
	for _, name := range []string{"x.sock", "abc.sock", ".sock", "3", "3.sock.bak", "notes.txt"} {
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o700); err != nil {
		t.Fatal(err)
	}

	if got, want := Minors(), []int{5, 7, 12, 200}; !reflect.DeepEqual(got, want) {
		t.Errorf("Minors() = %v, want %v", got, want)
	}

	devs := ListDevices()
	var got []int
	for _, d := range devs {
		got = append(got, d.Minor)
	}
	if want := []int{5, 12}; !reflect.DeepEqual(got, want) {
		t.Fatalf("ListDevices() minors = %v, want %v", got, want)
	}
	if devs[0].FrontDevice != "/dev/ublkb5" || devs[1].FrontDevice != "/dev/ublkb12" {
		t.Errorf("ListDevices() = %+v", devs)
	}
}

func TestMinorsEmpty(t *testing.T) {
	dir := useRunDir(t)
	if got := Minors(); len(got) != 0 {
		t.Errorf("Minors() in an empty dir = %v", got)
	}
	RunDir = filepath.Join(dir, "missing")
	if got := Minors(); len(got) != 0 {
		t.Errorf("Minors() with a missing dir = %v", got)
	}
	if got := ListDevices(); len(got) != 0 {
		t.Errorf("ListDevices() with a missing dir = %v", got)
	}
}

func TestResponseJSON(t *testing.T) {
	// The wire names are part of the CLI's output (dbdctl info) and of the
	// protocol between dbdctl and its servers.
	b, err := json.Marshal(Response{Device: &DeviceInfo{Minor: 1, BlockDevice: "/dev/sdb", State: StateAttached,
		FrontDevice: "/dev/ublkb1", LogicalBS: 512, Stats: IOCounters{WriteZeroes: 2}}})
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for _, want := range []string{`"minor":1`, `"block_device":"/dev/sdb"`, `"state":-1`, `"front_device":"/dev/ublkb1"`,
		`"logical_block_size":512`, `"io":{`, `"write_zeroes":2`} {
		if !strings.Contains(s, want) {
			t.Errorf("response JSON %s lacks %s", s, want)
		}
	}
	if strings.Contains(s, `"error":""`) {
		t.Errorf("response JSON %s carries an empty error", s)
	}
	b, _ = json.Marshal(Request{Op: "detach"})
	if string(b) != `{"op":"detach"}` {
		t.Errorf("request JSON = %s", b)
	}
}

package protocol_test

import (
	"bufio"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/internal/protocol/protocoltest"
)

func useRunDir(t *testing.T) string { return protocoltest.UseRunDir(t) }

// fakeHandler records the requests it answers; info describes minor, every
// command fails with err (nil = succeeds).
type fakeHandler struct {
	minor dattobd.Minor
	err   error
	block chan struct{} // non-nil: commands wait for it to close

	mu   sync.Mutex
	got  []any
	done sync.WaitGroup
}

func (h *fakeHandler) record(a any) error {
	h.mu.Lock()
	h.got = append(h.got, a)
	h.mu.Unlock()
	if h.block != nil {
		<-h.block
	}
	return h.err
}

func (h *fakeHandler) received() []any {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]any(nil), h.got...)
}

func (h *fakeHandler) Info() protocol.DeviceInfo {
	return protocol.DeviceInfo{
		Minor: h.minor, BlockDevice: "/dev/fake" + h.minor.String(), State: dattobd.StateAttached,
		Mode: dattobd.Passthrough, Status: protocol.StatusServing, FrontDevice: h.minor.FrontPath(), Size: 1 << 30,
		Stats: protocol.IOCounters{Reads: 3, BytesRead: 12288},
	}
}
func (h *fakeHandler) Detach(a protocol.Detach) error               { return h.record(a) }
func (h *fakeHandler) SetupSnapshot(a protocol.SetupSnapshot) error { return h.record(a) }
func (h *fakeHandler) TransitionToIncremental() error {
	return h.record(protocol.OpTransitionToIncremental)
}
func (h *fakeHandler) TransitionToSnapshot(a protocol.TransitionToSnapshot) error { return h.record(a) }
func (h *fakeHandler) Destroy() error                                             { return h.record(protocol.OpDestroy) }
func (h *fakeHandler) Reconfigure(a protocol.Reconfigure) error                   { return h.record(a) }
func (h *fakeHandler) ExpandCowFile(a protocol.ExpandCowFile) error               { return h.record(a) }
func (h *fakeHandler) ReconfigureAutoExpand(a protocol.AutoExpand) error          { return h.record(a) }

// UpdateImage copies the first descriptor's bytes into the second, with a
// progress report before and after.
func (h *fakeHandler) UpdateImage(a protocol.UpdateImage, files []*os.File, progress func(protocol.Progress)) (protocol.UpdateImageDone, error) {
	if err := h.record(a); err != nil {
		return protocol.UpdateImageDone{}, err
	}
	data, err := io.ReadAll(io.NewSectionReader(files[0], 0, 1<<20))
	if err != nil {
		return protocol.UpdateImageDone{}, err
	}
	progress(protocol.Progress{Done: 0, Total: int64(len(data))})
	if _, err := files[1].WriteAt(data, 0); err != nil {
		return protocol.UpdateImageDone{}, err
	}
	progress(protocol.Progress{Done: int64(len(data)), Total: int64(len(data))})
	return protocol.UpdateImageDone{BlocksChanged: 1, BytesCopied: int64(len(data)), Seconds: 0.5}, nil
}

// serve runs the real protocol server for h on minor's socket.
func serve(t *testing.T, h *fakeHandler) *protocol.Server {
	t.Helper()
	s, err := protocol.Listen(h.minor, h)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { s.Serve(); close(done) }()
	t.Cleanup(func() {
		if h.block != nil {
			select {
			case <-h.block:
			default:
				close(h.block)
			}
		}
		s.Close()
		s.Drain(5 * time.Second)
		<-done
	})
	return s
}

// update-img's descriptors reach the handler (the COW file first, then the
// image), its progress reaches the client in order, and so does its result.
func TestUpdateImagePassesFiles(t *testing.T) {
	useRunDir(t)
	h := &fakeHandler{minor: 4}
	serve(t, h)
	dir := t.TempDir()
	src := filepath.Join(dir, "cow")
	if err := os.WriteFile(src, []byte("changed blocks"), 0o600); err != nil {
		t.Fatal(err)
	}
	cowFile, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer cowFile.Close()
	image, err := os.Create(filepath.Join(dir, "image"))
	if err != nil {
		t.Fatal(err)
	}
	defer image.Close()
	var got []protocol.Progress
	args := protocol.UpdateImage{UUID: "ab", SeqID: 3, Workers: 2}
	done, err := protocol.For(4).UpdateImage(args, cowFile, image, func(p protocol.Progress) { got = append(got, p) })
	if err != nil {
		t.Fatalf("UpdateImage = %v", err)
	}
	if done != (protocol.UpdateImageDone{BlocksChanged: 1, BytesCopied: 14, Seconds: 0.5}) {
		t.Errorf("done = %+v", done)
	}
	if want := []protocol.Progress{{0, 14}, {14, 14}}; !reflect.DeepEqual(got, want) {
		t.Errorf("progress = %v, want %v", got, want)
	}
	if b, _ := os.ReadFile(image.Name()); string(b) != "changed blocks" {
		t.Errorf("image holds %q", b)
	}
	if r := h.received(); len(r) != 1 || r[0] != args {
		t.Errorf("handler got %v", r)
	}
	// A handler's error comes back as the request's.
	h.err = errors.New("snapshot changed")
	_, err = protocol.For(4).UpdateImage(args, cowFile, image, nil)
	if err == nil || !strings.Contains(err.Error(), "snapshot changed") || protocol.UnknownRequest(err) {
		t.Errorf("failing UpdateImage = %v (unknown request: %v)", err, protocol.UnknownRequest(err))
	}
	// A server older than the request says so, and the client can tell.
	answerOnce(t, 17, `{"error":"unknown request \"update-img\"","code":"invalid"}`+"\n")
	if _, err := protocol.For(17).UpdateImage(args, cowFile, image, nil); !protocol.UnknownRequest(err) {
		t.Errorf("UpdateImage to an older server = %v, want an unknown-request refusal", err)
	}
}

// update-img without its two descriptors is refused before the handler.
func TestUpdateImageWithoutFiles(t *testing.T) {
	useRunDir(t)
	h := &fakeHandler{minor: 6}
	serve(t, h)
	conn, err := net.Dial("unix", protocol.SocketPath(6))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.Write([]byte(`{"op":"update-img","args":{"uuid":"ab","seq_id":2}}` + "\n"))
	var resp struct{ Error string }
	if err := json.NewDecoder(conn).Decode(&resp); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(resp.Error, "2 descriptors") {
		t.Errorf("answer %q", resp.Error)
	}
	if r := h.received(); len(r) != 0 {
		t.Errorf("handler was called: %v", r)
	}
}

func TestSocketPath(t *testing.T) {
	dir := useRunDir(t)
	if got, want := protocol.SocketPath(5), filepath.Join(dir, "5.sock"); got != want {
		t.Errorf("SocketPath(5) = %q, want %q", got, want)
	}
	protocol.LogDir = "/var/log/x"
	if got := protocol.LogPath(7); got != "/var/log/x/ublk7.log" {
		t.Errorf("LogPath(7) = %q", got)
	}
}

func TestInfo(t *testing.T) {
	useRunDir(t)
	serve(t, &fakeHandler{minor: 5})
	d, err := protocol.For(5).Info()
	if err != nil {
		t.Fatalf("Info = %v", err)
	}
	if d.Minor != 5 || d.FrontDevice != "/dev/ublkb5" || d.Size != 1<<30 || d.State != dattobd.StateAttached ||
		d.Mode != dattobd.Passthrough || d.Stats.Reads != 3 || d.Stats.BytesRead != 12288 {
		t.Errorf("device = %+v", d)
	}
}

// Every command reaches its handler method with its arguments intact.
func TestCommandsReachHandler(t *testing.T) {
	useRunDir(t)
	h := &fakeHandler{minor: 3}
	serve(t, h)
	c := protocol.For(3)
	calls := []struct {
		do   func() error
		want any
	}{
		{func() error { return c.Detach(protocol.Detach{KeepState: true}) }, protocol.Detach{KeepState: true}},
		{func() error { return c.SetupSnapshot(protocol.SetupSnapshot{"/c", 4096, 10, true}) }, protocol.SetupSnapshot{"/c", 4096, 10, true}},
		{c.TransitionToIncremental, protocol.OpTransitionToIncremental},
		{func() error { return c.TransitionToSnapshot(protocol.TransitionToSnapshot{"/d", 7, false}) }, protocol.TransitionToSnapshot{"/d", 7, false}},
		{c.Destroy, protocol.OpDestroy},
		{func() error { return c.Reconfigure(protocol.Reconfigure{1 << 20}) }, protocol.Reconfigure{1 << 20}},
		{func() error { return c.ExpandCowFile(protocol.ExpandCowFile{64}) }, protocol.ExpandCowFile{64}},
		{func() error { return c.ReconfigureAutoExpand(protocol.AutoExpand{8, 100}) }, protocol.AutoExpand{8, 100}},
	}
	var want []any
	for _, call := range calls {
		if err := call.do(); err != nil {
			t.Fatalf("call for %v: %v", call.want, err)
		}
		want = append(want, call.want)
	}
	if got := h.received(); !reflect.DeepEqual(got, want) {
		t.Errorf("handler received %v, want %v", got, want)
	}
}

// A server's error keeps its message and its kind across the socket.
func TestErrorIdentity(t *testing.T) {
	useRunDir(t)
	for i, kind := range []error{protocol.ErrInUse, protocol.ErrWrongMode, protocol.ErrFailed, protocol.ErrInvalid, protocol.ErrDetaching} {
		m := dattobd.Minor(10 + i)
		h := &fakeHandler{minor: m, err: protocol.Errorf(kind, "minor %d says no", m)}
		serve(t, h)
		err := protocol.For(m).Destroy()
		if err == nil || err.Error() != "minor "+m.String()+" says no" {
			t.Fatalf("error = %v", err)
		}
		if !errors.Is(err, kind) {
			t.Errorf("errors.Is(%v, %v) = false across the socket", err, kind)
		}
		for _, other := range []error{protocol.ErrInUse, protocol.ErrWrongMode, protocol.ErrFailed, protocol.ErrInvalid, protocol.ErrDetaching, protocol.ErrNotAttached} {
			if other != kind && errors.Is(err, other) {
				t.Errorf("%v also matches %v", err, other)
			}
		}
	}
	// An error of no known kind matches none.
	serve(t, &fakeHandler{minor: 20, err: errors.New("plain")})
	err := protocol.For(20).Destroy()
	if err == nil || err.Error() != "plain" || errors.Is(err, protocol.ErrInvalid) || errors.Is(err, protocol.ErrNotAttached) {
		t.Errorf("plain error across the socket = %v", err)
	}
}

func TestNotAttached(t *testing.T) {
	useRunDir(t)
	for _, m := range []dattobd.Minor{0, 9, 255} {
		_, err := protocol.For(m).Info()
		if !errors.Is(err, protocol.ErrNotAttached) {
			t.Errorf("Info(%d) error = %v, want protocol.ErrNotAttached", m, err)
		}
		if want := "minor " + m.String() + " is not attached"; err == nil || err.Error() != want {
			t.Errorf("Info(%d) error = %v, want %q", m, err, want)
		}
	}
}

// staleSocket leaves a socket file for minor with nobody listening.
func staleSocket(t *testing.T, m dattobd.Minor) {
	t.Helper()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: protocol.SocketPath(m), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
}

func TestStaleSocket(t *testing.T) {
	useRunDir(t)
	staleSocket(t, 7)
	if _, err := protocol.For(7).Info(); !errors.Is(err, protocol.ErrNotAttached) {
		t.Errorf("Info on a stale socket = %v, want protocol.ErrNotAttached", err)
	}
	// A new server replaces the stale socket.
	serve(t, &fakeHandler{minor: 7})
	if _, err := protocol.For(7).Info(); err != nil {
		t.Errorf("Info after a new server took the stale socket: %v", err)
	}
}

// A second server for a minor with a live one is refused.
func TestListenRefusesLiveServer(t *testing.T) {
	useRunDir(t)
	serve(t, &fakeHandler{minor: 8})
	if _, err := protocol.Listen(8, &fakeHandler{minor: 8}); err == nil || !strings.Contains(err.Error(), "is taken: another server holds") {
		t.Errorf("second protocol.Listen = %v, want a refusal", err)
	}
	if _, err := protocol.For(8).Info(); err != nil {
		t.Errorf("the first server stopped answering: %v", err)
	}
}

// Drain waits for an answer in progress, so a detach's answer arrives.
func TestCloseWaitsForAnswers(t *testing.T) {
	useRunDir(t)
	h := &fakeHandler{minor: 4, block: make(chan struct{})}
	s := serve(t, h)
	res := make(chan error, 1)
	go func() { res <- protocol.For(4).Destroy() }()
	for len(h.received()) == 0 {
		time.Sleep(time.Millisecond)
	}
	closed := make(chan struct{})
	go func() { s.Close(); s.Drain(5 * time.Second); close(closed) }()
	time.Sleep(20 * time.Millisecond)
	select {
	case <-closed:
		t.Fatal("Drain returned while an answer was in progress")
	default:
	}
	close(h.block)
	if err := <-res; err != nil {
		t.Errorf("the answer in progress was lost: %v", err)
	}
	<-closed
}

// answerOnce is a server for minor that answers one request with reply.
func answerOnce(t *testing.T, m dattobd.Minor, reply string) {
	ln, err := net.Listen("unix", protocol.SocketPath(m))
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
		c.Write([]byte(reply))
		c.Close()
	}()
	t.Cleanup(func() { ln.Close(); <-done })
}

func TestGarbage(t *testing.T) {
	useRunDir(t)
	answerOnce(t, 6, "not json\n")
	if _, err := protocol.For(6).Info(); err == nil || !strings.Contains(err.Error(), "no answer to info") {
		t.Errorf("Info with a garbage answer = %v, want a no-answer error", err)
	}
	// A server that dies mid-command: the client cannot know whether the
	// command took effect, and says where to look.
	answerOnce(t, 7, "")
	err := protocol.For(7).Destroy()
	if err == nil || !strings.Contains(err.Error(), "ended before answering destroy") || !strings.Contains(err.Error(), "dbdctl info 7") {
		t.Errorf("a command whose server closed without answering = %v, want it to point at dbdctl info", err)
	}
	answerOnce(t, 16, "{}\n")
	if _, err := protocol.For(16).Info(); err == nil || !strings.Contains(err.Error(), "no device info") {
		t.Errorf("Info answered without a device = %v, want a no-device error", err)
	}

	// A client sending garbage or an unknown op gets protocol.ErrInvalid's code.
	serve(t, &fakeHandler{minor: 9})
	for _, line := range []string{"not json\n", `{"op":"frobnicate"}` + "\n", `{"op":"setup-snapshot","args":"x"}` + "\n"} {
		c, err := net.Dial("unix", protocol.SocketPath(9))
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(line))
		var resp struct{ Error, Code string }
		err = json.NewDecoder(c).Decode(&resp)
		c.Close()
		if err != nil || resp.Error == "" || resp.Code != "invalid" {
			t.Errorf("answer to %q = %+v, %v; want an invalid-argument error", line, resp, err)
		}
	}
}

func TestMinorsAndListDevices(t *testing.T) {
	dir := useRunDir(t)
	serve(t, &fakeHandler{minor: 12})
	serve(t, &fakeHandler{minor: 5})
	staleSocket(t, 7)
	for _, name := range []string{"x.sock", "abc.sock", ".sock", "3", "3.sock.bak", "notes.txt"} {
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if got, want := protocol.Minors(), []dattobd.Minor{5, 7, 12}; !reflect.DeepEqual(got, want) {
		t.Errorf("Minors() = %v, want %v", got, want)
	}
	devs := protocol.ListDevices()
	if len(devs) != 2 || devs[0].Minor != 5 || devs[1].Minor != 12 {
		t.Fatalf("ListDevices() = %+v", devs)
	}
	protocol.RunDir = filepath.Join(dir, "missing")
	if len(protocol.Minors()) != 0 || len(protocol.ListDevices()) != 0 {
		t.Error("a missing run directory lists devices")
	}
}

func TestWireNames(t *testing.T) {
	// The wire names are part of the CLI's output (dbdctl info) and of the
	// protocol between dbdctl and its servers.
	b, err := json.Marshal(&protocol.DeviceInfo{Minor: 1, BlockDevice: "/dev/sdb", State: dattobd.StateAttached,
		Mode: dattobd.Snapshot, FrontDevice: "/dev/ublkb1", LogicalBS: 512, Stats: protocol.IOCounters{WriteZeroes: 2},
		AutoExpand: &protocol.AutoExpandInfo{StepSizeMiB: 4, ReservedSpaceMiB: 9}})
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for _, want := range []string{`"minor":1`, `"block_device":"/dev/sdb"`, `"state":-1`, `"front_device":"/dev/ublkb1"`,
		`"mode":"snapshot"`, `"logical_block_size":512`, `"io":{`, `"write_zeroes":2`,
		`"auto_expand":{"step_size_mib":4,"reserved_space_mib":9}`} {
		if !strings.Contains(s, want) {
			t.Errorf("response JSON %s lacks %s", s, want)
		}
	}
	if strings.Contains(s, `"cow_file"`) || strings.Contains(s, `"uuid"`) {
		t.Errorf("info JSON %s carries tracking fields of an untracked device", s)
	}
}

// Two servers racing for one minor: exactly one gets it, and the loser
// leaves the winner's socket alone.
func TestListenRace(t *testing.T) {
	useRunDir(t)
	const racers = 8
	wins := make(chan *protocol.Server, racers)
	errs := make(chan error, racers)
	var wg sync.WaitGroup
	for i := 0; i < racers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := protocol.Listen(21, &fakeHandler{minor: 21})
			if err != nil {
				errs <- err
				return
			}
			wins <- s
		}()
	}
	wg.Wait()
	close(wins)
	close(errs)
	var won []*protocol.Server
	for s := range wins {
		won = append(won, s)
	}
	if len(won) != 1 || len(errs) != racers-1 {
		t.Fatalf("%d servers won the minor, %d lost", len(won), len(errs))
	}
	for err := range errs {
		if !strings.Contains(err.Error(), "minor 21 is taken") {
			t.Errorf("loser's error: %v", err)
		}
	}
	go won[0].Serve()
	if _, err := protocol.For(21).Info(); err != nil {
		t.Errorf("the winner does not answer: %v", err)
	}
	won[0].Close()
	won[0].Drain(time.Second)
}

// A server removes its socket on Close only if the file is still its own.
func TestCloseKeepsAnotherSocket(t *testing.T) {
	useRunDir(t)
	s, err := protocol.Listen(22, &fakeHandler{minor: 22})
	if err != nil {
		t.Fatal(err)
	}
	path := protocol.SocketPath(22)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte("someone else's"), 0o600); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if b, err := os.ReadFile(path); err != nil || string(b) != "someone else's" {
		t.Errorf("Close removed a socket path that was no longer its own: %q, %v", b, err)
	}
	// And the lock is free again.
	s2, err := protocol.Listen(22, &fakeHandler{minor: 22})
	if err != nil {
		t.Fatalf("the minor stays locked after Close: %v", err)
	}
	s2.Close()
}

// A server killed while answering info, and the next one its supervisor
// starts a moment later, give the client the new server's answer, not an
// error: info only reads.
func TestInfoAcrossServerRestart(t *testing.T) {
	useRunDir(t)
	dying, err := net.Listen("unix", protocol.SocketPath(12))
	if err != nil {
		t.Fatal(err)
	}
	type answer struct {
		info protocol.DeviceInfo
		err  error
	}
	asked := make(chan answer, 1)
	go func() {
		info, err := protocol.For(12).Info()
		asked <- answer{info, err}
	}()
	c, err := dying.Accept()
	if err != nil {
		t.Fatal(err)
	}
	bufio.NewReader(c).ReadString('\n')
	c.Close() // killed before its answer
	dying.Close()
	time.Sleep(200 * time.Millisecond) // no socket while the next server starts
	serve(t, &fakeHandler{minor: 12})
	a := <-asked
	if a.err != nil {
		t.Fatalf("Info across a server's restart: %v", a.err)
	}
	if a.info.Minor != 12 {
		t.Errorf("Info answered for minor %d, want 12", a.info.Minor)
	}
}

package protocol

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/dbdublk/dbdublk/internal/dattobd"
)

// ServeOptions are the command line of a server process, `dbdctl serve`:
// what attach, the reloads and the supervisor start. Args renders them and
// the daemon parses them back (the struct tags are the flags), so the two
// sides cannot drift.
type ServeOptions struct {
	BlockDevice string        `arg:"" name:"block-device" help:"The real block device."`
	Minor       dattobd.Minor `arg:"" name:"minor" help:"Device number N of /dev/ublkbN (0-255)."`
	ReadyFD     int           `name:"ready-fd" default:"-1" help:"Write one JSON readiness line to this descriptor."`
	Supervise   bool          `help:"Run the server as a child and restart it when it dies."`
	Force       bool          `help:"Attach untracked even though the minor was left tracking."`
	KeepFailure bool          `name:"keep-failure" help:"Attach untracked, keeping the minor's recorded tracking failure (until destroy)."`
	Queues      int           `help:"Hardware queues; 0 = default."`
	Depth       int           `help:"Requests in flight per queue; 0 = default."`
	MaxIO       int           `name:"max-io" help:"Largest request in bytes; 0 = default."`
	Copy        bool          `help:"Serve in ublk's copy mode even where the kernel offers zero copy."`
	// Reload, unless passthrough, resumes tracking from CowFile.
	Reload     dattobd.Mode  `default:"passthrough" help:"Resume tracking: snapshot or incremental."`
	CowFile    string        `name:"cow-file" help:"The COW file to resume from."`
	Cache      int64         `help:"Index cache limit in bytes; 0 = default."`
	Falloc     int64         `help:"COW file size, in MiB, that transition-to-snapshot reuses."`
	Checkpoint time.Duration `help:"How often incremental tracking writes its index back; 0 = default."`
	// Boot marks a server started by the initramfs for the root volume:
	// it must survive the switch to the real root and the shutdown.
	Boot bool `help:"Serve the root volume from boot: outlive switch_root and shutdown, keep the boot record."`
}

// Args is the command line (after the program name) that starts a server
// with o.
func (o ServeOptions) Args() []string {
	args := []string{"serve"}
	flag := func(name, value string) { args = append(args, "--"+name+"="+value) }
	if o.ReadyFD >= 0 {
		flag("ready-fd", strconv.Itoa(o.ReadyFD))
	}
	if o.Supervise {
		args = append(args, "--supervise")
	}
	if o.Force {
		args = append(args, "--force")
	}
	if o.KeepFailure {
		args = append(args, "--keep-failure")
	}
	if o.Boot {
		args = append(args, "--boot")
	}
	if o.Copy {
		args = append(args, "--copy")
	}
	for _, f := range []struct {
		name string
		v    int64
	}{{"queues", int64(o.Queues)}, {"depth", int64(o.Depth)}, {"max-io", int64(o.MaxIO)}, {"cache", o.Cache}, {"falloc", o.Falloc}} {
		if f.v != 0 {
			flag(f.name, strconv.FormatInt(f.v, 10))
		}
	}
	if o.Reload.Tracking() {
		flag("reload", o.Reload.String())
		flag("cow-file", o.CowFile)
	}
	if o.Checkpoint > 0 {
		flag("checkpoint", o.Checkpoint.String())
	}
	return append(args, "--", o.BlockDevice, o.Minor.String())
}

// Ready is the one line a server writes on its ready descriptor: the front
// device once it serves, or why it could not.
type Ready struct {
	Front string `json:"front,omitempty"`
	Error string `json:"error,omitempty"`
}

// BootArgv0 is the argv[0] of a boot server and its supervisor.
const BootArgv0 = "@dbdctl"

// readyFD is the descriptor number the ready pipe gets in a started server
// (the first of exec.Cmd.ExtraFiles).
const readyFD = 3

// Launch starts exe as a server with o (its ReadyFD set to the ready pipe),
// its output to out, and waits up to timeout for its ready line; it returns
// the running server and its front device. ownSession puts it in a session
// of its own, so it outlives the caller's terminal. A server that reports
// an error has been waited for.
func Launch(exe string, o ServeOptions, out *os.File, ownSession bool, timeout time.Duration) (*exec.Cmd, string, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, "", err
	}
	defer r.Close()
	o.ReadyFD = readyFD
	cmd := exec.Command(exe, o.Args()...)
	if o.Boot {
		// systemd's convention for root storage daemons: a process whose
		// argv[0] starts with '@' is spared when the initramfs hands over
		// and at shutdown, so / stays served until the very end.
		cmd.Args[0] = BootArgv0
	}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.ExtraFiles = []*os.File{w}
	if ownSession {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	}
	if err := cmd.Start(); err != nil {
		w.Close()
		return nil, "", fmt.Errorf("start server: %w", err)
	}
	w.Close()
	st := readReady(r, timeout)
	if st.Error != "" {
		cmd.Wait()
		return nil, "", errors.New(st.Error)
	}
	return cmd, st.Front, nil
}

func readReady(r *os.File, timeout time.Duration) Ready {
	r.SetReadDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil && line == "" {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return Ready{Error: "server did not become ready in time; see its log"}
		}
		return Ready{Error: "server exited before it was ready; see its log"}
	}
	var st Ready
	if json.Unmarshal([]byte(strings.TrimSpace(line)), &st) != nil {
		return Ready{Error: "server sent a malformed ready line: " + strings.TrimSpace(line)}
	}
	if st.Error == "" && st.Front == "" {
		return Ready{Error: "server sent an empty ready line"}
	}
	return st
}

// Reporter returns the function a server calls, once, to write its ready
// line to fd; it does nothing without one (fd < 0).
func Reporter(fd int) func(Ready) {
	var w io.WriteCloser
	if fd >= 0 {
		w = os.NewFile(uintptr(fd), "ready")
	}
	return func(st Ready) {
		if w != nil {
			json.NewEncoder(w).Encode(st)
			w.Close()
			w = nil
		}
	}
}

package protocol

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/internal/dattobd"
)

// Timeouts of the client's calls: info is quick; a tracking request may
// set up a snapshot of a large device or write back a large index.
const (
	dialTimeout    = 2 * time.Second
	InfoTimeout    = 5 * time.Second
	CommandTimeout = requestTimeout
)

// Client talks to one minor's server.
type Client struct {
	Minor dattobd.Minor
}

// For returns the client of minor's server.
func For(m dattobd.Minor) Client { return Client{Minor: m} }

// Info returns the device's state. It fails with ErrNotAttached when no
// server answers for the minor. A server that dies while answering (killed,
// and its supervisor starting the next one) is asked again until
// InfoTimeout: info only reads, so asking twice is harmless, and a script
// polling info across a server's restart should not see a failure.
func (c Client) Info() (DeviceInfo, error) {
	deadline := time.Now().Add(InfoTimeout)
	resp, err := c.do(OpInfo, nil, InfoTimeout)
	for dropped := droppedAnswer(err); dropped && time.Now().Before(deadline); {
		time.Sleep(infoRetryPause)
		resp, err = c.do(OpInfo, nil, time.Until(deadline))
		// Between the old server's death and the new one's socket the
		// dial fails: still the same restart.
		dropped = droppedAnswer(err) || errors.Is(err, ErrNotAttached)
	}
	if err != nil {
		return DeviceInfo{}, err
	}
	if resp.Device == nil {
		return DeviceInfo{}, fmt.Errorf("minor %d: %w", c.Minor, errNoDevice)
	}
	return *resp.Device, nil
}

// Detach removes the front device; the server exits.
func (c Client) Detach(a Detach) error { return c.command(OpDetach, a) }

// SetupSnapshot starts a snapshot series.
func (c Client) SetupSnapshot(a SetupSnapshot) error { return c.command(OpSetupSnapshot, a) }

// TransitionToIncremental ends the snapshot and keeps tracking changes.
func (c Client) TransitionToIncremental() error { return c.command(OpTransitionToIncremental, nil) }

// TransitionToSnapshot takes the next snapshot.
func (c Client) TransitionToSnapshot(a TransitionToSnapshot) error {
	return c.command(OpTransitionToSnapshot, a)
}

// Destroy stops tracking and removes the current COW file.
func (c Client) Destroy() error { return c.command(OpDestroy, nil) }

// Reconfigure changes the index cache limit.
func (c Client) Reconfigure(a Reconfigure) error { return c.command(OpReconfigure, a) }

// ExpandCowFile grows the COW store.
func (c Client) ExpandCowFile(a ExpandCowFile) error { return c.command(OpExpandCowFile, a) }

// ReconfigureAutoExpand sets auto-expansion.
func (c Client) ReconfigureAutoExpand(a AutoExpand) error {
	return c.command(OpReconfigureAutoExpand, a)
}

// infoRetryPause spaces Info's tries after a dropped answer.
const infoRetryPause = 50 * time.Millisecond

// droppedAnswer reports whether err is a connection that closed before the
// server's answer: its process died mid-request. A garbled answer is not.
func droppedAnswer(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, unix.ECONNRESET) || errors.Is(err, unix.EPIPE)
}

// unknownRequest opens a server's answer to a request it does not know.
const unknownRequest = "unknown request"

// UnknownRequest reports whether err is a server's refusal of a request it
// does not know (a server older than the client).
func UnknownRequest(err error) bool {
	var remote *RemoteError
	return errors.As(err, &remote) && strings.HasPrefix(remote.Message, unknownRequest)
}

// UpdateImage has the snapshot's server copy the blocks cowFile marks as
// changed into image (see UpdateImage), calling progress (which may be
// nil) as the server reports. A server that predates the request answers
// with an ErrInvalid RemoteError ("unknown request").
func (c Client) UpdateImage(a UpdateImage, cowFile, image *os.File, progress func(Progress)) (UpdateImageDone, error) {
	b, err := json.Marshal(a)
	if err != nil {
		return UpdateImageDone{}, err
	}
	msg, err := json.Marshal(request{Op: OpUpdateImage, Args: b})
	if err != nil {
		return UpdateImageDone{}, err
	}
	conn, err := net.DialTimeout("unix", SocketPath(c.Minor), dialTimeout)
	if err != nil {
		return UpdateImageDone{}, fmt.Errorf("minor %d is %w", c.Minor, ErrNotAttached)
	}
	defer conn.Close()
	uc := conn.(*net.UnixConn)
	uc.SetDeadline(time.Now().Add(requestTimeout))
	rights := unix.UnixRights(int(cowFile.Fd()), int(image.Fd()))
	if _, _, err := uc.WriteMsgUnix(append(msg, '\n'), rights, nil); err != nil {
		return UpdateImageDone{}, fmt.Errorf("minor %d: send %s: %w", c.Minor, OpUpdateImage, err)
	}
	runtime.KeepAlive(cowFile)
	runtime.KeepAlive(image)
	dec := json.NewDecoder(uc)
	for {
		var resp response
		if err := dec.Decode(&resp); err != nil {
			return UpdateImageDone{}, fmt.Errorf("minor %d: no answer to %s: %w", c.Minor, OpUpdateImage, err)
		}
		switch {
		case resp.Error != "":
			return UpdateImageDone{}, &RemoteError{Code: resp.Code, Message: resp.Error}
		case resp.Progress != nil:
			uc.SetDeadline(time.Now().Add(requestTimeout))
			if progress != nil {
				progress(*resp.Progress)
			}
		case resp.Copied != nil:
			return *resp.Copied, nil
		default:
			return UpdateImageDone{}, fmt.Errorf("minor %d: empty answer to %s", c.Minor, OpUpdateImage)
		}
	}
}

func (c Client) command(op Op, args any) error {
	_, err := c.do(op, args, CommandTimeout)
	if droppedAnswer(err) {
		// The server died mid-command: whether the command took effect
		// is in the record the next server resumes, not in this answer.
		return fmt.Errorf("minor %d: its server ended before answering %s; run dbdctl info %d to see whether it took effect: %w",
			c.Minor, op, c.Minor, err)
	}
	return err
}

// do sends one request and reads the answer. A server's error comes back
// as a *RemoteError carrying its message and kind.
func (c Client) do(op Op, args any, timeout time.Duration) (*response, error) {
	req := request{Op: op}
	if args != nil {
		b, err := json.Marshal(args)
		if err != nil {
			return nil, err
		}
		req.Args = b
	}
	conn, err := net.DialTimeout("unix", SocketPath(c.Minor), dialTimeout)
	if err != nil {
		return nil, fmt.Errorf("minor %d is %w", c.Minor, ErrNotAttached)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(timeout))
	if err := json.NewEncoder(conn).Encode(req); err != nil {
		return nil, fmt.Errorf("minor %d: send %s: %w", c.Minor, op, err)
	}
	var resp response
	if err := json.NewDecoder(conn).Decode(&resp); err != nil {
		return nil, fmt.Errorf("minor %d: no answer to %s: %w", c.Minor, op, err)
	}
	if resp.Error != "" {
		return &resp, &RemoteError{Code: resp.Code, Message: resp.Error}
	}
	return &resp, nil
}

// ListDevices asks every live server for its info.
func ListDevices() []DeviceInfo {
	var out []DeviceInfo
	for _, m := range Minors() {
		if info, err := For(m).Info(); err == nil {
			out = append(out, info)
		}
	}
	return out
}

package protocol

import (
	"errors"
	"fmt"
)

// Code is an error's kind on the wire, so that errors.Is works on the
// client side of the socket as it does in the server.
type Code string

// Errors a request can fail with, whichever side of the socket it is seen
// on. A server wraps them with Errorf; the client's error matches them
// with errors.Is.
var (
	// ErrNotAttached: no server answers for the minor (client side).
	ErrNotAttached = errors.New("not attached")
	// ErrInUse: a device the request must take is mounted or open.
	ErrInUse = errors.New("in use")
	// ErrWrongMode: the minor is not in the mode the request needs.
	ErrWrongMode = errors.New("wrong mode")
	// ErrFailed: tracking has failed; only destroy (then a full backup) helps.
	ErrFailed = errors.New("tracking failed")
	// ErrInvalid: an argument is unusable (a bad path, size or file).
	ErrInvalid = errors.New("invalid argument")
	// ErrDetaching: the server is detaching and takes no more requests.
	ErrDetaching = errors.New("detaching")
)

var codes = []struct {
	code Code
	err  error
}{
	{"in-use", ErrInUse},
	{"wrong-mode", ErrWrongMode},
	{"failed", ErrFailed},
	{"invalid", ErrInvalid},
	{"detaching", ErrDetaching},
}

// CodeOf is err's code, or "" for an error of no known kind: what goes on
// the wire beside its message (RemoteError restores both).
func CodeOf(err error) Code {
	for _, c := range codes {
		if errors.Is(err, c.err) {
			return c.code
		}
	}
	return ""
}

// Errorf returns an error whose message is the formatted text and which
// matches kind (one of the Err values above) with errors.Is.
func Errorf(kind error, format string, a ...any) error {
	return &kindError{kind: kind, msg: fmt.Sprintf(format, a...)}
}

type kindError struct {
	kind error
	msg  string
}

func (e *kindError) Error() string        { return e.msg }
func (e *kindError) Is(target error) bool { return target == e.kind }

// RemoteError is a server's answer to a failed request.
type RemoteError struct {
	Code    Code
	Message string
}

func (e *RemoteError) Error() string { return e.Message }

// Is matches the error kind the server's error had.
func (e *RemoteError) Is(target error) bool {
	return e.Code != "" && CodeOf(target) == e.Code
}

// Package failpoint makes a named step of the daemon fail on purpose, so
// that tests can prove what every error path leaves behind (as storage
// projects do with failpoints). A server reads the names from
// DBDCTL_FAILPOINTS (comma-separated) when it starts; without it, which is
// every production run, Check always returns nil.
package failpoint

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
)

// Env is the environment variable that lists the failpoints to trigger.
const Env = "DBDCTL_FAILPOINTS"

var active = parse(os.Getenv(Env))

func parse(s string) map[string]bool {
	m := map[string]bool{}
	for _, name := range strings.Split(s, ",") {
		if name = strings.TrimSpace(name); name != "" {
			m[name] = true
		}
	}
	return m
}

// ErrInjected is what a triggered failpoint returns (it also matches EIO,
// as a real I/O failure would).
var ErrInjected = errors.New("injected failure")

type injected struct{ name string }

func (e injected) Error() string { return fmt.Sprintf("failpoint %s: injected failure", e.name) }
func (e injected) Is(target error) bool {
	return target == ErrInjected || target == syscall.EIO
}

// Check returns an error when failpoint name is triggered, nil otherwise.
func Check(name string) error {
	if active[name] {
		return injected{name}
	}
	return nil
}

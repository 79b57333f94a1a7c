package protocol

import (
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/gofrs/flock"

	"github.com/dbdublk/dbdublk/internal/dattobd"
)

// RunDir holds one control socket per attached minor. It is root-only.
var RunDir = envOr("DBDCTL_RUN_DIR", "/run/dbdctl")

// LogDir holds one log file per minor.
var LogDir = envOr("DBDCTL_LOG_DIR", "/var/log/dbdctl")

// SocketPath is the control socket of minor's server.
func SocketPath(m dattobd.Minor) string { return filepath.Join(RunDir, m.String()+".sock") }

// LockPath is the lock a minor's server holds while it lives.
func LockPath(m dattobd.Minor) string { return filepath.Join(RunDir, m.String()+".lock") }

// SupervisorLockPath is the lock a minor's supervisor holds while it
// lives: held, the minor is being recovered when no server answers.
func SupervisorLockPath(m dattobd.Minor) string {
	return filepath.Join(RunDir, m.String()+".supervisor.lock")
}

// Supervised reports whether minor's supervisor runs: it holds
// SupervisorLockPath (probed by taking it for an instant).
func Supervised(m dattobd.Minor) bool {
	lock := flock.New(SupervisorLockPath(m))
	ok, err := lock.TryLock()
	if err != nil {
		return false
	}
	if ok {
		lock.Unlock()
	}
	return !ok
}

// LogPath is the log file of minor's server.
func LogPath(m dattobd.Minor) string { return filepath.Join(LogDir, "ublk"+m.String()+".log") }

// Minors lists the minors that have a control socket, ascending. A socket
// may be stale; a Client call tells.
func Minors() []dattobd.Minor {
	entries, _ := os.ReadDir(RunDir)
	var out []dattobd.Minor
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".sock")
		if !ok {
			continue
		}
		if m, err := dattobd.ParseMinor(name); err == nil {
			out = append(out, m)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

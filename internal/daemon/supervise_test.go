package daemon

import (
	"os/exec"
	"testing"
)

// Only a SIGKILL counts as killed from outside: a server that panics
// (exit 2), exits with an error or dies of another signal is one that
// cannot run, and its quick deaths make the supervisor give up.
func TestKilled(t *testing.T) {
	for _, c := range []struct {
		script string
		want   bool
	}{
		{"kill -KILL $$", true},
		{"exit 2", false},
		{"exit 3", false},
		{"kill -SEGV $$", false},
		{"kill -TERM $$", false},
	} {
		err := exec.Command("sh", "-c", c.script).Run()
		if got := killed(err); got != c.want {
			t.Errorf("%q: killed(%v) = %v, want %v", c.script, err, got, c.want)
		}
	}
	if killed(nil) {
		t.Error("killed(nil) = true")
	}
}

// Package protocoltest holds helpers for tests that talk the control
// protocol without disturbing the servers of the host they run on.
package protocoltest

import (
	"os"
	"testing"

	"github.com/dbdublk/dbdublk/internal/protocol"
)

// UseRunDir points protocol.RunDir at a fresh directory for the test, so no
// test talks to a real server of this host, and returns it.
func UseRunDir(t testing.TB) string {
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
	old := protocol.RunDir
	protocol.RunDir = dir
	t.Cleanup(func() { protocol.RunDir = old })
	return dir
}

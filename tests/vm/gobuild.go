package vm

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// GoBuild runs `go <args>` from the repository root with cgo off, so the
// binaries it makes are static and run in the guest as they are. Use it for
// `build -o X ./pkg` and `test -c -o X ./pkg`.
func GoBuild(args ...string) error {
	root, err := repoRoot()
	if err != nil {
		return err
	}
	cmd := exec.Command("go", args...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

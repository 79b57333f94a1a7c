package frontfs

import (
	"os"
	"testing"

	"github.com/dbdublk/dbdublk/internal/testmain"
)

// helperEnv makes the test binary the helper process: the tests start
// themselves as the helper the way a server starts its executable.
const helperEnv = "FRONTFS_TEST_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "1" {
		if err := Serve(os.Stdin, os.Stdout); err != nil {
			os.Exit(1)
		}
		os.Exit(0)
	}
	testmain.Run(m)
}

// Command dbdctl controls live snapshots and incremental backups of block
// devices served through ublk. See README.md.
package main

import (
	"os"

	"github.com/dbdublk/dbdublk/ctl"
	"github.com/dbdublk/dbdublk/internal/daemon"
)

func main() { os.Exit(ctl.Main(os.Args[1:], os.Stdout, os.Stderr, daemon.Host{})) }

// Package ctl is dbdctl's command line: dattobd's subcommands, arguments
// and units, parsed with kong. Each command is a struct whose Run method
// does the work; Main maps every failure to one line on stderr and a
// non-zero exit status, never a stack trace.
//
// The CLI talks to the server of each minor through internal/protocol and
// reads the state directory through internal/state. What needs the daemon
// itself (running a server in this process, removing a device whose server
// died) comes in through Host, so this package does not depend on the
// daemon.
package ctl

import (
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"strconv"
	"strings"

	"github.com/alecthomas/kong"

	"github.com/dbdublk/dbdublk/backup"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/ublk"
)

// CLI is the root of dbdctl's command tree.
type CLI struct {
	Attach AttachCmd `cmd:"" help:"Front a block device as /dev/ublkb<minor> (the volume is then used through that device)."`
	Detach DetachCmd `cmd:"" help:"Flush and remove the front device of <minor>; the real device is released (a tracking device is left dormant for reload-*)."`
	Info   InfoCmd   `cmd:"" help:"Print the state of attached devices as JSON, in the shape of dattobd's /proc/datto-info."`

	SetupSnapshot           SetupSnapshotCmd           `cmd:"" name:"setup-snapshot" help:"Take a snapshot of a device, served read-only as /dev/datto<minor>."`
	TransitionToIncremental TransitionToIncrementalCmd `cmd:"" name:"transition-to-incremental" help:"End the snapshot; keep recording changed blocks in its COW file."`
	TransitionToSnapshot    TransitionToSnapshotCmd    `cmd:"" name:"transition-to-snapshot" help:"Take the next snapshot into a new COW file; the old one lists the changed blocks."`
	Destroy                 DestroyCmd                 `cmd:"" help:"Stop tracking <minor> and remove its current COW file (the device stays attached)."`
	Reconfigure             ReconfigureCmd             `cmd:"" help:"Change the index memory limit (-c bytes)."`
	ExpandCowFile           ExpandCowFileCmd           `cmd:"" name:"expand-cow-file" help:"Grow an active snapshot's COW store by <size> MiB."`
	ReconfigureAutoExpand   ReconfigureAutoExpandCmd   `cmd:"" name:"reconfigure-auto-expand" help:"Grow a full COW store by <step> MiB while -r MiB stay free."`
	ReloadSnapshot          ReloadSnapshotCmd          `cmd:"" name:"reload-snapshot" help:"Attach a device and resume the snapshot it was detached or stopped with."`
	ReloadIncremental       ReloadIncrementalCmd       `cmd:"" name:"reload-incremental" help:"Attach a device and resume incremental tracking, also after a crash."`
	ReloadAll               ReloadAllCmd               `cmd:"" name:"reload-all" help:"Bring back every device recorded in the state directory (run at boot)."`
	UpdateImg               UpdateImgCmd               `cmd:"" name:"update-img" aliases:"img-merge" help:"Copy the blocks changed since the previous snapshot into its image."`

	Serve          ServeCmd          `cmd:"" hidden:"" help:"Run a device server (started by attach)."`
	FrontFSHelper  FrontFSHelperCmd  `cmd:"" name:"front-fs-helper" hidden:"" help:"Do a server's work on its own volume's filesystems (started by the server)."`
	BootAttach     BootAttachCmd     `cmd:"" name:"boot-attach" hidden:"" help:"Attach the root device from the initramfs; print the front device to mount as /."`
	BootFiles      BootFilesCmd      `cmd:"" name:"boot-files" hidden:"" help:"List the state files the initramfs carries (volumes attached at boot)."`
	SystemShutdown SystemShutdownCmd `cmd:"" name:"system-shutdown" hidden:"" help:"End the tracking of volumes served from boot in place, once / is read-only (systemd's system-shutdown hook)."`
	ManPage        ManPageCmd        `cmd:"" name:"man-page" hidden:"" help:"Print the dbdctl(8) manual page (roff), as packages ship it."`
	Version        VersionCmd        `cmd:"" help:"Print the version."`
}

// Host is what the CLI needs from the daemon without depending on it.
// daemon.Host implements it; the command (ctl/dbdctl) passes it to Main.
type Host interface {
	// Check refuses a server start that cannot work, before anything
	// changes, with the one-line reason the server would give.
	Check(o protocol.ServeOptions) error
	// Run runs a server (or its supervisor) in this process.
	Run(o protocol.ServeOptions, logger *log.Logger, onReady func(front string)) error
	// RemoveOrphan removes a front device whose server died.
	RemoveOrphan(m dattobd.Minor) (bool, error)
	// Unserved lists the front devices in the kernel no server answers
	// for: recovering, held or orphaned.
	Unserved() []protocol.DeviceInfo
	// FrontFSHelper runs the helper a server starts to work on the
	// filesystems of its own front device, on standard input and output.
	FrontFSHelper() error
}

// Env is what commands need from outside.
type Env struct {
	Stdout io.Writer
	Stderr io.Writer
	Host   Host
}

// exitError carries a specific exit status.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }

// Main runs dbdctl with args (without the program name) and returns the
// exit status.
func Main(args []string, stdout, stderr io.Writer, host Host) (code int) {
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(stderr, "dbdctl: internal error: %v\n", r)
			code = 70
		}
	}()
	var cli CLI
	exited := false
	parser, err := newParser(&cli,
		kong.Writers(stdout, stderr),
		kong.Exit(func(int) { exited = true }),
	)
	if err != nil {
		fmt.Fprintf(stderr, "dbdctl: internal error: %v\n", err)
		return 70
	}
	kctx, err := parser.Parse(args)
	if exited {
		return 0 // --help printed usage
	}
	if err != nil {
		fmt.Fprintf(stderr, "dbdctl: %s (see dbdctl --help)\n", oneLine(err.Error()))
		return 2
	}
	if err := kctx.Run(&Env{Stdout: stdout, Stderr: stderr, Host: host}); err != nil {
		fmt.Fprintf(stderr, "dbdctl: %s\n", oneLine(err.Error()))
		var ee *exitError
		if errors.As(err, &ee) {
			return ee.code
		}
		return 1
	}
	return 0
}

// newParser builds dbdctl's parser over cli: the one command tree that
// Main parses and ManPage documents.
func newParser(cli *CLI, options ...kong.Option) (*kong.Kong, error) {
	return kong.New(cli, append([]kong.Option{
		kong.Name("dbdctl"),
		kong.Description("Live snapshots and incremental backups of block devices, served through ublk."),
		kong.ConfigureHelp(kong.HelpOptions{Compact: true}),
		kong.Vars{
			// Defaults shown in help come from the packages that own them.
			"queues":    strconv.Itoa(ublk.DefaultQueues),
			"depth":     strconv.Itoa(ublk.DefaultDepth),
			"maxio":     strconv.Itoa(ublk.DefaultMaxIOBytes),
			"copydepth": strconv.Itoa(ublk.CopyDepth),
			"copymaxio": strconv.Itoa(ublk.CopyMaxIOBytes),
			"workers":   strconv.Itoa(backup.DefaultWorkers),
		},
	}, options...)...)
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// VersionCmd prints the version.
type VersionCmd struct{}

// Run prints the version.
func (VersionCmd) Run(env *Env) error {
	fmt.Fprintln(env.Stdout, "dbdctl", protocol.Version)
	return nil
}

func requireRoot() error {
	if os.Geteuid() != 0 {
		return errors.New("permission denied: dbdctl must run as root")
	}
	return nil
}

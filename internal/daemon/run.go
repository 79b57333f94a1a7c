package daemon

import (
	"context"
	"log"
	"os"
	"runtime/pprof"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/frontfs"
	"github.com/dbdublk/dbdublk/internal/protocol"
)

// Run runs the server described by o in this process until it detaches
// (with o.Supervise, the supervisor that runs it as a child and restarts
// it). onReady is called once the front device serves; a failure before
// that is returned (and, with o.ReadyFD, reported on the ready line).
func Run(o protocol.ServeOptions, logger *log.Logger, onReady func(front string)) error {
	report := protocol.Reporter(o.ReadyFD)
	if o.Supervise {
		return supervise(o, logger, report)
	}
	err := serve(configOf(o), logger, func(front string) {
		report(protocol.Ready{Front: front})
		if onReady != nil {
			onReady(front)
		}
	})
	if err != nil {
		report(protocol.Ready{Error: err.Error()})
		logger.Print(err)
	}
	return err
}

// configOf is the Config a server command line asks for.
func configOf(o protocol.ServeOptions) Config {
	cfg := Config{
		BlockDevice: o.BlockDevice, Minor: o.Minor, Queues: o.Queues, Depth: o.Depth, MaxIOBytes: o.MaxIO, Copy: o.Copy,
		Force: o.Force, KeepFailure: o.KeepFailure, CheckpointEvery: o.Checkpoint, Boot: o.Boot,
	}
	if o.Reload.Tracking() {
		cfg.Reload = &Reload{Mode: o.Reload, CowFile: o.CowFile, CacheBytes: o.Cache, FallocMiB: o.Falloc}
	}
	return cfg
}

// serve starts a server and answers it until it detaches.
func serve(cfg Config, logger *log.Logger, onReady func(front string)) error {
	// DBDCTL_CPUPROFILE=file profiles the server until it exits (for
	// performance work; see bench/).
	if path := os.Getenv("DBDCTL_CPUPROFILE"); path != "" {
		if f, err := os.Create(path); err == nil {
			if pprof.StartCPUProfile(f) == nil {
				defer func() { pprof.StopCPUProfile(); f.Close() }()
			}
		}
	}
	// No transparent huge pages for a server: its heap (the COW index
	// cache) grows in small pieces, and with huge pages each piece made up
	// to 2 MiB resident (a long-running server's RSS was mostly them).
	_ = unix.Prctl(unix.PR_SET_THP_DISABLE, 1, 0, 0, 0)
	limitGoMemory(0)
	s, err := Start(cfg, logger)
	if err != nil {
		return err
	}
	onReady(s.FrontPath())
	return s.Serve(context.Background())
}

// Host is the daemon as the CLI uses it (ctl.Host): running a server in
// this process, and removing a front device whose server is gone.
type Host struct{}

// Check refuses a start that cannot work (see Start).
func (Host) Check(o protocol.ServeOptions) error {
	_, _, err := preflight(configOf(o))
	return err
}

// Run runs a server or its supervisor (see Run).
func (Host) Run(o protocol.ServeOptions, logger *log.Logger, onReady func(front string)) error {
	return Run(o, logger, onReady)
}

// Unserved lists front devices no server answers for (see Unserved).
func (Host) Unserved() []protocol.DeviceInfo { return Unserved() }

// FrontFSHelper runs the helper a server starts for its work on its own
// volume's filesystems (frontfs.Serve).
func (Host) FrontFSHelper() error { return frontfs.Serve(os.Stdin, os.Stdout) }

// RemoveOrphan removes a ublk device a dead server left (see RemoveOrphan).
func (Host) RemoveOrphan(m dattobd.Minor) (bool, error) { return RemoveOrphan(m) }

package ctl

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/internal/state"
)

// DetachCmd removes a front device.
type DetachCmd struct {
	Minor *dattobd.Minor `arg:"" optional:"" name:"minor" help:"Minor of the attached device."`
	All   bool           `help:"Detach every attached device and keep their state for reload-all (what the boot unit runs at shutdown)."`
}

// Run detaches: the server flushes and deletes the front device, releases
// the real device and exits. A tracking device becomes dormant: its COW
// file is closed clean for reload-snapshot or reload-incremental.
func (c *DetachCmd) Run(env *Env) error {
	switch {
	case c.All && c.Minor != nil:
		return &exitError{2, errors.New("give a minor or --all, not both")}
	case !c.All && c.Minor == nil:
		return &exitError{2, errors.New("missing minor (or --all)")}
	}
	if err := requireRoot(); err != nil {
		return err
	}
	if !c.All {
		return detachOne(env, *c.Minor, false)
	}
	failed := 0
	for _, m := range protocol.Minors() {
		if err := detachOne(env, m, true); err != nil {
			failed++
			fmt.Fprintf(env.Stderr, "dbdctl: minor %d: %s\n", m, oneLine(err.Error()))
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d device(s) could not be detached; see above", failed)
	}
	return nil
}

func detachOne(env *Env, m dattobd.Minor, keepState bool) error {
	c := protocol.For(m)
	d, err := c.Info()
	if errors.Is(err, protocol.ErrNotAttached) {
		// No server answers; its ublk device may have outlived it.
		removed, oerr := env.Host.RemoveOrphan(m)
		if oerr != nil {
			return oerr
		}
		if removed {
			fmt.Fprintf(env.Stdout, "removed %s, left behind by a server that died\n", m.FrontCharPath())
			return nil
		}
	}
	if err != nil {
		return err
	}
	if d.AttachedAtBoot && keepState {
		// detach --all at shutdown: / is never unmounted; the
		// system-shutdown hook ends it once / is read-only.
		fmt.Fprintf(env.Stdout, "%s serves the root volume %s until the machine stops\n", d.FrontDevice, d.BlockDevice)
		return nil
	}
	if err := c.Detach(protocol.Detach{KeepState: keepState}); err != nil {
		return err
	}
	if err := awaitSupervisorExit(m, detachWait); err != nil {
		return err
	}
	if d.Mode.Tracking() {
		fmt.Fprintf(env.Stdout, "detached %s from %s; %s mode is dormant in %s (resume with dbdctl reload-%s)\n",
			d.BlockDevice, d.FrontDevice, d.Mode, d.CowFile, d.Mode)
		return nil
	}
	fmt.Fprintf(env.Stdout, "detached %s from %s\n", d.BlockDevice, d.FrontDevice)
	return nil
}

// detachWait bounds how long detach waits for the server to exit once it
// has answered.
const detachWait = 30 * time.Second

// awaitSupervisorExit waits until m's supervisor has exited. A server
// answers detach before it exits, and its supervisor exits after it; only
// then may the minor be attached again, which a script does right away.
func awaitSupervisorExit(m dattobd.Minor, within time.Duration) error {
	deadline := time.Now().Add(within)
	for protocol.Supervised(m) {
		if time.Now().After(deadline) {
			return fmt.Errorf("minor %d is detached, but its server has not exited after %v", m, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// InfoCmd prints device state.
type InfoCmd struct {
	Minor *dattobd.Minor `arg:"" optional:"" name:"minor" help:"Only this minor."`
}

// infoDoc is the document info prints: /proc/datto-info's shape.
type infoDoc struct {
	Version string                `json:"version"`
	Devices []protocol.DeviceInfo `json:"devices"`
}

// Run prints the JSON document: every attached device, and every minor
// the state directory says was left tracking (dormant, as dattobd lists
// them), with its recorded failure.
func (c *InfoCmd) Run(env *Env) error {
	if err := requireRoot(); err != nil {
		return err
	}
	doc := infoDoc{Version: protocol.Version, Devices: []protocol.DeviceInfo{}}
	if c.Minor != nil {
		d, err := protocol.For(*c.Minor).Info()
		if errors.Is(err, protocol.ErrNotAttached) {
			if u, ok := unserved(env, *c.Minor); ok {
				d, err = u, nil
			} else if r, ok := state.Find(*c.Minor); ok && dormant(r) {
				d, err = dormantInfo(r), nil
			}
		}
		if err != nil {
			return err
		}
		doc.Devices = append(doc.Devices, d)
	} else {
		doc.Devices = append(doc.Devices, protocol.ListDevices()...)
		doc.Devices = append(doc.Devices, env.Host.Unserved()...)
		listed := map[dattobd.Minor]bool{}
		for _, d := range doc.Devices {
			listed[d.Minor] = true
		}
		records, _ := state.Load()
		for _, r := range records {
			if !listed[r.Minor] && dormant(r) {
				doc.Devices = append(doc.Devices, dormantInfo(r))
			}
		}
		sort.Slice(doc.Devices, func(i, j int) bool { return doc.Devices[i].Minor < doc.Devices[j].Minor })
	}
	out, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	fmt.Fprintln(env.Stdout, string(out))
	return nil
}

// dormant reports whether a record of a minor no server answers for is
// worth listing: it was left tracking, or its tracking failed.
func dormant(r state.Record) bool { return r.Mode.Tracking() || r.Failure != nil }

// dormantInfo is info's entry for a minor that is not attached but whose
// tracking is recorded.
func dormantInfo(r state.Record) protocol.DeviceInfo {
	d := protocol.DeviceInfo{
		Minor: r.Minor, BlockDevice: r.BlockDevice, State: dattobd.DormantState(r.Mode),
		Mode: r.Mode, Status: protocol.StatusDormant, CowFile: r.CowFile, MaxCache: r.CacheBytes,
	}
	if r.Failure != nil {
		d.Error = -r.Failure.Errno
	}
	return d
}

// unserved returns minor's entry if its front device is in the kernel with
// no server answering for it.
func unserved(env *Env, m dattobd.Minor) (protocol.DeviceInfo, bool) {
	for _, d := range env.Host.Unserved() {
		if d.Minor == m {
			return d, true
		}
	}
	return protocol.DeviceInfo{}, false
}

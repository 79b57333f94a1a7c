package ctl

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/dbdublk/dbdublk/server"
)

// DetachCmd removes a front device.
type DetachCmd struct {
	Minor string `arg:"" optional:"" name:"minor" help:"Minor of the attached device."`
	All   bool   `help:"Detach every attached device and keep their state for reload-all (what the boot unit runs at shutdown)."`
}

// Run detaches: the server flushes and deletes the front device, releases
// the real device and exits. A tracking device becomes dormant: its COW
// file is closed clean for reload-snapshot or reload-incremental.
func (c *DetachCmd) Run(env *Env) error {
	if c.All {
		if c.Minor != "" {
			return &exitError{2, errors.New("give a minor or --all, not both")}
		}
		if err := requireRoot(); err != nil {
			return err
		}
		failed := 0
		for _, m := range server.Minors() {
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
	if c.Minor == "" {
		return &exitError{2, errors.New("missing minor (or --all)")}
	}
	minor, err := server.ParseMinor(c.Minor)
	if err != nil {
		return err
	}
	if err := requireRoot(); err != nil {
		return err
	}
	return detachOne(env, minor, false)
}

func detachOne(env *Env, minor int, keep bool) error {
	resp, err := server.Call(minor, server.Request{Op: "info"}, 5*time.Second)
	if errors.Is(err, server.ErrNotAttached) {
		// No server answers; its ublk device may have outlived it.
		removed, oerr := server.RemoveOrphan(minor)
		if oerr != nil {
			return oerr
		}
		if removed {
			fmt.Fprintf(env.Stdout, "removed /dev/ublkc%d, left behind by a server that died\n", minor)
			return nil
		}
	}
	if err != nil {
		return err
	}
	if resp.Device == nil {
		return errors.New("server sent no device info")
	}
	if _, err := server.Call(minor, server.Request{Op: "detach", Keep: keep}, 10*time.Minute); err != nil {
		return err
	}
	if resp.Device.Mode != "passthrough" {
		fmt.Fprintf(env.Stdout, "detached %s from %s; %s mode is dormant in %s (resume with dbdctl reload-%s)\n",
			resp.Device.BlockDevice, resp.Device.FrontDevice, resp.Device.Mode, resp.Device.CowFile, resp.Device.Mode)
		return nil
	}
	fmt.Fprintf(env.Stdout, "detached %s from %s\n", resp.Device.BlockDevice, resp.Device.FrontDevice)
	return nil
}

// InfoCmd prints device state.
type InfoCmd struct {
	Minor string `arg:"" optional:"" name:"minor" help:"Only this minor."`
}

// infoDoc is the document info prints: /proc/datto-info's shape.
type infoDoc struct {
	Version string              `json:"version"`
	Devices []server.DeviceInfo `json:"devices"`
}

// Run prints the JSON document.
func (c *InfoCmd) Run(env *Env) error {
	doc := infoDoc{Version: server.Version, Devices: []server.DeviceInfo{}}
	if c.Minor != "" {
		minor, err := server.ParseMinor(c.Minor)
		if err != nil {
			return err
		}
		if err := requireRoot(); err != nil {
			return err
		}
		resp, err := server.Call(minor, server.Request{Op: "info"}, 5*time.Second)
		if err != nil {
			return err
		}
		if resp.Device == nil {
			return errors.New("server sent no device info")
		}
		doc.Devices = append(doc.Devices, *resp.Device)
	} else {
		if err := requireRoot(); err != nil {
			return err
		}
		doc.Devices = append(doc.Devices, server.ListDevices()...)
	}
	out, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	fmt.Fprintln(env.Stdout, string(out))
	return nil
}

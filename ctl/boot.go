package ctl

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"

	"github.com/dbdublk/dbdublk/internal/blockdev"
	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/internal/state"
)

// The root volume cannot be unmounted, so it is attached from boot: the
// initramfs starts its server before / is mounted and mounts the front
// device as / instead (dist/initramfs-tools, dist/dracut). attach
// --at-boot sets that up once; from then on the boot attaches it with the
// tracking its boot record names (boot-attach), and the system-shutdown
// hook ends the tracking clean once / is read-only.

// initramfsTool is one way of building the initramfs, with the file that
// shows dbdctl's hook is installed for it.
type initramfsTool struct {
	name string
	args []string
	hook string
}

var initramfsTools = []initramfsTool{
	{"update-initramfs", []string{"-u", "-k", "all"}, "/usr/share/initramfs-tools/hooks/dbdctl"},
	{"dracut", []string{"--force", "--regenerate-all"}, "/usr/lib/dracut/modules.d/90dbdctl/module-setup.sh"},
}

// bootFilePath is where the boot record of minor m lives: at the top of
// the root volume, so it is on that volume whatever else is mounted.
func bootFilePath(m dattobd.Minor) string { return fmt.Sprintf("/.dbdctl-boot%d", m) }

// attachAtBoot makes the initramfs attach the root volume dev as minor m
// from the next boot on: it creates the volume's boot record, records the
// minor and rebuilds the initramfs. Nothing is left changed on error.
func attachAtBoot(env *Env, dev string, m dattobd.Minor) error {
	rdev, err := blockdev.Rdev(dev)
	if err != nil {
		return err
	}
	var root syscall.Stat_t
	if err := syscall.Stat("/", &root); err != nil {
		return err
	}
	if uint64(root.Dev) != rdev {
		return fmt.Errorf("%s is not the root volume: --at-boot attaches the volume mounted on /; attach any other volume unmounted, or while mounted if it is device-mapper", dev)
	}
	if _, err := protocol.For(m).Info(); err == nil {
		return fmt.Errorf("minor %d is taken: it is attached", m)
	}
	records, _ := state.Load()
	for _, r := range records {
		switch {
		case r.Minor == m:
			return fmt.Errorf("minor %d is taken: it is recorded for %s in %s", m, r.BlockDevice, state.Path(m))
		case r.Boot != nil:
			return fmt.Errorf("minor %d already attaches %s at boot", r.Minor, r.BlockDevice)
		}
	}
	tool, err := findInitramfsTool()
	if err != nil {
		return err
	}
	boot, err := state.CreateBootFile(bootFilePath(m))
	if err != nil {
		return err
	}
	undo := func(err error) error {
		return errors.Join(err, state.Remove(m), state.RemoveBootFile(boot))
	}
	if err := state.Write(state.Record{Minor: m, BlockDevice: dev, Mode: dattobd.Passthrough, Boot: boot}); err != nil {
		return undo(err)
	}
	fmt.Fprintf(env.Stdout, "rebuilding the initramfs: %s %v\n", tool.name, tool.args)
	var out bytes.Buffer
	cmd := exec.Command(tool.name, tool.args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return undo(fmt.Errorf("%s failed (%v): %s", tool.name, err, lastLine(out.String())))
	}
	fmt.Fprintf(env.Stdout, "%s, the root volume, is attached at boot as %s (minor %d) from the next boot on; reboot to start serving it\n",
		dev, m.FrontPath(), m)
	return nil
}

// findInitramfsTool returns the machine's initramfs builder, once dbdctl's
// hook for it is installed.
func findInitramfsTool() (initramfsTool, error) {
	for _, t := range initramfsTools {
		if _, err := exec.LookPath(t.name); err != nil {
			continue
		}
		if _, err := os.Stat(t.hook); err != nil {
			return t, fmt.Errorf("%s has no dbdctl hook (%s): install the dbdctl package, which ships it", t.name, t.hook)
		}
		return t, nil
	}
	return initramfsTool{}, errors.New("neither update-initramfs (initramfs-tools) nor dracut is installed: the root volume is attached by the initramfs")
}

func lastLine(s string) string {
	lines := bytes.Split(bytes.TrimSpace([]byte(s)), []byte("\n"))
	return string(lines[len(lines)-1])
}

// BootAttachCmd is run by the initramfs before the root filesystem is
// mounted: it attaches the root device with the tracking its boot record
// names and prints the front device to mount as / (nothing when the root
// device is not attached at boot).
type BootAttachCmd struct {
	Root string `arg:"" name:"root-device" help:"The root device the initramfs found."`
}

// Run attaches the root volume. Its record comes from the boot record on
// the device (the initramfs's copy of the state file only says where that
// is): the state file itself is on the volume, not mounted yet. A tracking
// that cannot be resumed is recorded failed (a full backup is required)
// and the volume attached untracked all the same, so the machine boots
// and nothing it writes goes unnoticed.
func (c *BootAttachCmd) Run(env *Env) error {
	if err := requireRoot(); err != nil {
		return err
	}
	records, problems := state.Load()
	for _, p := range problems {
		fmt.Fprintf(env.Stderr, "dbdctl: %s\n", oneLine(p.Error()))
	}
	for _, r := range records {
		if r.Boot == nil {
			continue
		}
		rec, err := state.ReadBoot(c.Root, r.Boot.Extents)
		if err != nil {
			fmt.Fprintf(env.Stderr, "dbdctl: minor %d's boot record is not on %s: %s\n", r.Minor, c.Root, oneLine(err.Error()))
			continue
		}
		if rec.Minor != r.Minor || rec.Boot == nil {
			fmt.Fprintf(env.Stderr, "dbdctl: the boot record on %s is minor %d's, not %d's\n", c.Root, rec.Minor, r.Minor)
			continue
		}
		// The volume keeps the name it was attached by (/dev/vg/root)
		// when that names the device the initramfs found (/dev/dm-0 to
		// dracut), so info and the state file name it as the user did.
		if !blockdev.Same(rec.BlockDevice, c.Root) {
			rec.BlockDevice = c.Root
		}
		front, err := bootAttach(env, rec)
		if err != nil {
			return err
		}
		fmt.Fprintln(env.Stdout, front)
		return nil
	}
	return nil
}

// bootAttach starts the boot server of rec and returns its front device.
func bootAttach(env *Env, rec state.Record) (string, error) {
	if err := state.WriteFile(rec); err != nil {
		return "", err
	}
	quiet := &Env{Stdout: env.Stderr, Stderr: env.Stderr, Host: env.Host} // stdout is the front device only
	o := ServerFlags{}.serveOptions(rec.BlockDevice, rec.Minor)
	o.Boot = true
	if rec.Failure == nil && rec.Mode.Tracking() {
		ra := reloadArgs{Cache: rec.CacheBytes, BlockDevice: rec.BlockDevice, CowFile: rec.CowFile, Minor: rec.Minor}
		err := ra.spawnReload(quiet, o, rec.Mode, rec.FallocMiB)
		if err == nil {
			return rec.Minor.FrontPath(), nil
		}
		fmt.Fprintf(env.Stderr, "dbdctl: minor %d (%s): %s mode cannot be resumed: %s; a full backup is required: attaching it untracked\n",
			rec.Minor, rec.BlockDevice, rec.Mode, oneLine(err.Error()))
		rec.Failure = &state.Failure{Errno: int(syscall.EIO), Reason: "resume at boot: " + oneLine(err.Error())}
		if err := state.Write(rec); err != nil {
			return "", fmt.Errorf("record the failure: %w", err)
		}
	}
	o.KeepFailure = rec.Failure != nil
	if err := spawn(quiet, o); err != nil {
		return "", err
	}
	return rec.Minor.FrontPath(), nil
}

// SystemShutdownCmd is run by systemd's system-shutdown hook, once / is
// read-only: every volume served from boot ends its tracking clean, in
// place (protocol.Detach.InPlace), so the next boot resumes it.
type SystemShutdownCmd struct {
	Verb string `arg:"" optional:"" name:"verb" help:"What the machine is doing (halt, poweroff, reboot, kexec), as systemd passes it."`
}

// Run ends every boot-served device in place.
func (c *SystemShutdownCmd) Run(env *Env) error {
	failed := 0
	for _, m := range protocol.Minors() {
		cl := protocol.For(m)
		d, err := cl.Info()
		if err != nil || !d.AttachedAtBoot {
			continue
		}
		if err := cl.Detach(protocol.Detach{InPlace: true}); err != nil {
			failed++
			fmt.Fprintf(env.Stderr, "dbdctl: minor %d: %s\n", m, oneLine(err.Error()))
			continue
		}
		fmt.Fprintf(env.Stdout, "dbdctl: %s (%s) ended in place, %s mode dormant\n", d.FrontDevice, d.BlockDevice, d.Mode)
	}
	if failed > 0 {
		return fmt.Errorf("%d device(s) could not end in place; the next boot recovers them", failed)
	}
	return nil
}

// BootFilesCmd prints the state files the initramfs must carry (those of
// volumes attached at boot), one per line, for the initramfs hooks.
type BootFilesCmd struct{}

// Run prints them.
func (BootFilesCmd) Run(env *Env) error {
	records, _ := state.Load()
	for _, r := range records {
		if r.Boot != nil {
			fmt.Fprintln(env.Stdout, state.Path(r.Minor))
		}
	}
	return nil
}

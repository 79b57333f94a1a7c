// Package insert puts a front device under a device-mapper volume that is
// in use (a mounted LVM logical volume, a dm-crypt mapping), with no
// unmount, and takes it out again: the way LVM inserts a "-real" device
// under a volume it snapshots.
//
// The volume's table is cloned into a hidden device, which the server
// serves as its real device; the volume's table is then replaced by one
// linear target onto the front device, so the mounted filesystem's I/O
// flows through the server. Removal loads the original table back.
//
// Every step is a device-mapper ioctl (internal/linux), not dmsetup: the
// server may run where dmsetup is not installed, and must not wait on
// udev, which may not run (an initramfs, a test VM).
package insert

import (
	"errors"
	"fmt"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/linux"
)

// Insertion is a volume the front device is (being) inserted under, as the
// state file keeps it: enough to find the hidden device after a crash and
// to put the volume back as it was. The original table itself is not
// kept: the hidden device carries it live (a dm-crypt table holds its key,
// which must not land in a state file).
type Insertion struct {
	// Volume is the device-mapper name of the volume (e.g. "vg-root").
	Volume string `json:"volume"`
	// Hidden is the name of the hidden device that carries the volume's
	// original table; the server serves it.
	Hidden string `json:"hidden"`
	// ReadOnly is whether the volume's table was loaded read-only.
	ReadOnly bool `json:"read_only,omitempty"`
}

// HiddenName is the hidden device's name for minor m.
func HiddenName(m dattobd.Minor) string { return fmt.Sprintf("dbdctl%d-real", m) }

// hiddenUUID marks the hidden device as dbdctl's own, as LVM's prefix
// marks its devices.
func hiddenUUID(m dattobd.Minor) string { return fmt.Sprintf("DBDCTL-%d-real", m) }

// clonable are the targets a second device may map at the same time as
// the volume without harm: they keep no state of their own on disk or in
// memory that two instances would fight over.
var clonable = []string{"linear", "striped", "crypt", "zero", "error"}

// CheckClonable refuses a table that cannot be served twice: a thin pool
// or a thin volume, a mirror or RAID set, a multipath map, a snapshot, a
// cache, an integrity or a writecache device keep metadata or state that a
// clone would corrupt or contend for.
func CheckClonable(volume string, table []linux.DMTarget) error {
	if len(table) == 0 {
		return fmt.Errorf("%s has no table (a device-mapper device that maps nothing)", volume)
	}
	for _, t := range table {
		if !slices.Contains(clonable, t.Type) {
			return fmt.Errorf("%s cannot have the front device inserted under it: its table has a %q target (only %v can be mapped twice safely)",
				volume, t.Type, clonable)
		}
	}
	return nil
}

// size is the table's length in sectors, checked to leave no gap.
func size(volume string, table []linux.DMTarget) (uint64, error) {
	var end uint64
	for _, t := range table {
		if t.Start != end {
			return 0, fmt.Errorf("the table of %s has a gap or overlap at sector %d", volume, end)
		}
		end += t.Length
	}
	return end, nil
}

// redirected is the table that sends the volume's I/O to the front device.
func redirected(sectors, front uint64) []linux.DMTarget {
	return []linux.DMTarget{{Start: 0, Length: sectors, Type: "linear",
		Params: fmt.Sprintf("%d:%d 0", unix.Major(front), unix.Minor(front))}}
}

// Inspect reads the table of the volume with device number volume and
// refuses one the front device cannot go under: a suspended volume, one
// already on a front device (isFront says which device numbers are), a
// table with a gap or one that cannot be mapped twice.
func Inspect(c *linux.DMControl, volume uint64, isFront func(uint64) bool) ([]linux.DMTarget, linux.DMInfo, error) {
	table, info, err := c.Table(linux.DMID{Dev: volume})
	if err != nil {
		return nil, info, err
	}
	if info.Suspended() {
		return nil, info, fmt.Errorf("%s is suspended; resume it first", info.Name)
	}
	for _, t := range table {
		var major, minor uint32
		if _, err := fmt.Sscanf(t.Params, "%d:%d", &major, &minor); err == nil && t.Type == "linear" && isFront(unix.Mkdev(major, minor)) {
			return nil, info, fmt.Errorf("%s is on a ublk front device already", info.Name)
		}
	}
	if err := CheckClonable(info.Name, table); err != nil {
		return nil, info, err
	}
	if _, err := size(info.Name, table); err != nil {
		return nil, info, err
	}
	return table, info, nil
}

// Begin inspects the volume with device number volume and creates minor's
// hidden device with the same table. It returns the insertion and the
// hidden device's number. On error nothing is left behind.
func Begin(c *linux.DMControl, volume uint64, m dattobd.Minor, isFront func(uint64) bool) (*Insertion, uint64, error) {
	table, info, err := Inspect(c, volume, isFront)
	if err != nil {
		return nil, 0, err
	}
	in := &Insertion{Volume: info.Name, Hidden: HiddenName(m), ReadOnly: info.Flags&linux.DMReadOnlyFlag != 0}
	hidden, err := in.createHidden(c, m, table)
	if err != nil {
		return nil, 0, err
	}
	return in, hidden, nil
}

// createHidden creates the hidden device with the original table.
func (in *Insertion) createHidden(c *linux.DMControl, m dattobd.Minor, table []linux.DMTarget) (uint64, error) {
	if _, err := c.Info(linux.DMID{Name: in.Hidden}); err == nil {
		return 0, fmt.Errorf("device-mapper device %s exists already (left by a crash? `dmsetup remove %s` once nothing uses it)", in.Hidden, in.Hidden)
	}
	if _, err := c.Create(in.Hidden, hiddenUUID(m), linux.DMUdevHidden); err != nil {
		return 0, err
	}
	id := linux.DMID{Name: in.Hidden}
	if err := c.Load(id, table, in.ReadOnly); err != nil {
		c.Remove(id, linux.DMUdevHidden)
		return 0, err
	}
	info, err := c.Resume(id, linux.DMUdevHidden)
	if err != nil {
		c.Remove(id, linux.DMUdevHidden)
		return 0, err
	}
	return info.Dev, nil
}

// HiddenDev finds the hidden device of an insertion after a restart.
func (in *Insertion) HiddenDev(c *linux.DMControl) (uint64, error) {
	info, err := c.Info(linux.DMID{Name: in.Hidden})
	if err != nil {
		return 0, err
	}
	return info.Dev, nil
}

// original is the volume's original table: the hidden device's.
func (in *Insertion) original(c *linux.DMControl) ([]linux.DMTarget, uint64, error) {
	table, _, err := c.Table(linux.DMID{Name: in.Hidden})
	if err != nil {
		return nil, 0, fmt.Errorf("the original table of %s (kept by %s): %w", in.Volume, in.Hidden, err)
	}
	sectors, err := size(in.Hidden, table)
	return table, sectors, err
}

// Redirect sends the volume's I/O to the front device: its table becomes
// one linear target onto front. The volume is suspended meanwhile (its
// filesystem frozen, its I/O drained to the original devices). If a step
// fails, the volume is resumed on its original table.
func (in *Insertion) Redirect(c *linux.DMControl, front uint64) error {
	_, sectors, err := in.original(c)
	if err != nil {
		return err
	}
	return in.swap(c, redirected(sectors, front), 0)
}

// Restore puts the volume's original table back. The suspend drains the
// volume's I/O through the front device, so the caller must be able to
// serve it while this waits (and must not be the only thread that could).
// If a step fails, the volume is resumed on the table it had.
func (in *Insertion) Restore(c *linux.DMControl) error { return in.restore(c, 0) }

// Abandon puts the volume's original table back when its front device is
// gone (stopped: its I/O fails). Its filesystem cannot be frozen then
// (the freeze's writeback fails), so the suspend skips the freeze.
func (in *Insertion) Abandon(c *linux.DMControl) error {
	return in.restore(c, linux.DMSkipLockfsFlag)
}

func (in *Insertion) restore(c *linux.DMControl, suspendFlags uint32) error {
	table, _, err := in.original(c)
	if err != nil {
		return err
	}
	return in.swap(c, table, suspendFlags)
}

// swap makes table the volume's live table: load, suspend (with
// suspendFlags), resume. If a step fails, the loaded table is dropped and
// the volume resumed on the table it had.
func (in *Insertion) swap(c *linux.DMControl, table []linux.DMTarget, suspendFlags uint32) error {
	id := linux.DMID{Name: in.Volume}
	if err := c.Load(id, table, in.ReadOnly); err != nil {
		return err
	}
	if err := c.Suspend(id, suspendFlags); err != nil {
		return errors.Join(err, c.ClearInactive(id))
	}
	if _, err := c.Resume(id, linux.DMUdevVisible); err != nil {
		return errors.Join(err, c.ClearInactive(id), resumeErr(c.Resume(id, linux.DMUdevVisible)))
	}
	return nil
}

func resumeErr(_ linux.DMInfo, err error) error { return err }

// State is where the volume's I/O goes now.
type State int

const (
	// Original: the volume maps its original table (not inserted, or put back).
	Original State = iota
	// Inserted: the volume maps exactly the front device.
	Inserted
	// Foreign: the volume maps something else: its table was reloaded
	// behind the server's back (lvextend, lvchange --refresh).
	Foreign
)

func (s State) String() string {
	return [...]string{"original", "inserted", "foreign"}[s]
}

// Recover, in a server taking over from a dead one, resumes a volume the
// dead server left suspended (killed between suspend and resume; a
// suspended volume hangs its filesystem, whatever its table), then says
// where its I/O goes.
func (in *Insertion) Recover(c *linux.DMControl, front uint64) (State, error) {
	id := linux.DMID{Name: in.Volume}
	info, err := c.Info(id)
	if err != nil {
		return Foreign, err
	}
	if info.Suspended() {
		if _, err := c.Resume(id, linux.DMUdevVisible); err != nil {
			return Foreign, fmt.Errorf("%s was left suspended and cannot be resumed: %w", in.Volume, err)
		}
	}
	return in.Check(c, front)
}

// DropStale removes the hidden device an earlier insertion left (its
// server gone, the front device removed) when the volume maps its
// original table again; a hidden device that is the only copy of the
// volume's table is refused, never removed.
func (in *Insertion) DropStale(c *linux.DMControl) error {
	if _, err := c.Info(linux.DMID{Name: in.Hidden}); err != nil {
		return nil // gone (a reboot): nothing stale
	}
	table, _, err := c.Table(linux.DMID{Name: in.Volume})
	if err != nil {
		return err
	}
	original, _, err := in.original(c)
	if err != nil {
		return err
	}
	if !slices.Equal(table, original) {
		return fmt.Errorf("%s does not map its original table, which only %s, left by an earlier insertion, still has; put it back by hand (dmsetup table %s; dmsetup load/suspend/resume %s) before attaching",
			in.Volume, in.Hidden, in.Hidden, in.Volume)
	}
	return in.RemoveHidden(c)
}

// Check reads the volume's live table and says where its I/O goes.
func (in *Insertion) Check(c *linux.DMControl, front uint64) (State, error) {
	table, _, err := c.Table(linux.DMID{Name: in.Volume})
	if err != nil {
		return Foreign, err
	}
	original, sectors, err := in.original(c)
	if err != nil {
		return Foreign, err
	}
	switch {
	case slices.Equal(table, redirected(sectors, front)):
		return Inserted, nil
	case slices.Equal(table, original):
		return Original, nil
	}
	return Foreign, nil
}

// RemoveHidden removes the hidden device once the server has closed it.
// A hidden device already gone is not an error.
func (in *Insertion) RemoveHidden(c *linux.DMControl) error {
	err := c.Remove(linux.DMID{Name: in.Hidden}, linux.DMUdevHidden)
	if errors.Is(err, unix.ENXIO) {
		return nil
	}
	return err
}

package dattobd

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// Minor numbers a tracked device, as in dattobd: 0..MaxMinor.
type Minor uint8

// MaxMinor is the largest minor, dattobd's hard maximum.
const MaxMinor = 255

// ParseMinor accepts a decimal minor in 0..MaxMinor and nothing else (no
// sign, no spaces, no other base), as dattobd's dbdctl does.
func ParseMinor(s string) (Minor, error) {
	if s == "" {
		return 0, errors.New("minor is empty")
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return 0, fmt.Errorf("minor %q is not a number", s)
		}
	}
	n, err := strconv.Atoi(s)
	if err != nil || n > MaxMinor {
		return 0, fmt.Errorf("minor %s is out of range 0..%d", s, MaxMinor)
	}
	return Minor(n), nil
}

// UnmarshalText parses a command-line minor (kong uses it for arguments).
func (m *Minor) UnmarshalText(b []byte) error {
	v, err := ParseMinor(string(b))
	if err != nil {
		return err
	}
	*m = v
	return nil
}

// UnmarshalJSON reads a minor written as a JSON number (UnmarshalText
// would otherwise make encoding/json expect a string).
func (m *Minor) UnmarshalJSON(b []byte) error { return m.UnmarshalText(b) }

func (m Minor) String() string { return strconv.Itoa(int(m)) }

// The ublk ids a minor owns: its front device has id minor, its snapshot
// device id snapshotIDBase+minor, past every front device.
const snapshotIDBase = MaxMinor + 1

// FrontID is the ublk device id of the minor's front device.
func (m Minor) FrontID() uint32 { return uint32(m) }

// SnapshotID is the ublk device id of the minor's snapshot device.
func (m Minor) SnapshotID() uint32 { return snapshotIDBase + uint32(m) }

// MinorOfSnapshot maps a snapshot device's ublk id back to its minor.
func MinorOfSnapshot(id uint32) (Minor, bool) {
	if id < snapshotIDBase || id > snapshotIDBase+MaxMinor {
		return 0, false
	}
	return Minor(id - snapshotIDBase), true
}

// FrontPath is /dev/ublkb<minor>, the device the volume is used through.
func (m Minor) FrontPath() string { return uapi.BlockPath(m.FrontID()) }

// FrontCharPath is the front device's ublk char device.
func (m Minor) FrontCharPath() string { return uapi.CharPath(m.FrontID()) }

// SnapshotPath is the ublk block device serving the minor's snapshot.
func (m Minor) SnapshotPath() string { return uapi.BlockPath(m.SnapshotID()) }

// SnapshotCharPath is the snapshot device's ublk char device.
func (m Minor) SnapshotCharPath() string { return uapi.CharPath(m.SnapshotID()) }

// DattoPath is /dev/datto<minor>, dattobd's name for the snapshot device:
// a symlink to SnapshotPath, so dattobd's scripts keep working.
func (m Minor) DattoPath() string { return dattoPrefix + m.String() }

const dattoPrefix = "/dev/datto"

// SnapshotMinor maps a snapshot device path, /dev/datto<minor> or the ublk
// device it links to, to its minor.
func SnapshotMinor(path string) (Minor, bool) {
	if s, ok := strings.CutPrefix(path, dattoPrefix); ok {
		m, err := ParseMinor(s)
		return m, err == nil
	}
	if id, ok := uapi.ParseBlockPath(path); ok {
		return MinorOfSnapshot(id)
	}
	return 0, false
}

package dattobd

import "fmt"

// Mode is what the front device does with writes.
type Mode int32

const (
	// Passthrough forwards writes untouched (attached, not tracking).
	Passthrough Mode = iota
	// Snapshot copies a block's old data to the COW file before its first
	// write, so the snapshot device keeps serving the old view.
	Snapshot
	// Incremental records which blocks were written.
	Incremental
)

var modeNames = [...]string{Passthrough: "passthrough", Snapshot: "snapshot", Incremental: "incremental"}

func (m Mode) String() string {
	if m >= 0 && int(m) < len(modeNames) {
		return modeNames[m]
	}
	return fmt.Sprintf("mode(%d)", int32(m))
}

// Tracking reports whether the mode keeps a COW file.
func (m Mode) Tracking() bool { return m == Snapshot || m == Incremental }

// MarshalText writes the mode's name (state files, info, the wire).
func (m Mode) MarshalText() ([]byte, error) {
	if m < 0 || int(m) >= len(modeNames) {
		return nil, fmt.Errorf("unknown mode %d", int32(m))
	}
	return []byte(modeNames[m]), nil
}

// UnmarshalText accepts a mode's name.
func (m *Mode) UnmarshalText(b []byte) error {
	v, err := ParseMode(string(b))
	if err != nil {
		return err
	}
	*m = v
	return nil
}

// ParseMode accepts "passthrough", "snapshot" or "incremental".
func ParseMode(s string) (Mode, error) {
	for i, name := range modeNames {
		if s == name {
			return Mode(i), nil
		}
	}
	return 0, fmt.Errorf("unknown mode %q", s)
}

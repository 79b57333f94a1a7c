package dattobd

// State is the "state" of /proc/datto-info: dattobd's 0..5 for tracked
// devices (dormant, active or unverified, incremental or snapshot).
type State int

const (
	// StateAttached is an attached device that is not tracking. dattobd has
	// no such state (it only knows tracked devices), so it reports -1.
	StateAttached State = -1
	// Dormant (tracking recorded, device not attached) and active states,
	// dattobd's 0..3.
	StateDormantIncremental State = 0
	StateDormantSnapshot    State = 1
	StateActiveIncremental  State = 2
	StateActiveSnapshot     State = 3
)

// ActiveState is the state dattobd reports for a device tracking in mode.
func ActiveState(m Mode) State {
	switch m {
	case Snapshot:
		return StateActiveSnapshot
	case Incremental:
		return StateActiveIncremental
	}
	return StateAttached
}

// DormantState is the state dattobd reports for a device left tracking in
// mode while it is not attached.
func DormantState(m Mode) State {
	if m == Snapshot {
		return StateDormantSnapshot
	}
	return StateDormantIncremental
}

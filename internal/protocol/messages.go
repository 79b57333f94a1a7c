package protocol

import (
	"encoding/json"

	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/ublk"
)

// Op names a request.
type Op string

// The requests a server answers.
const (
	OpInfo                    Op = "info"
	OpDetach                  Op = "detach"
	OpSetupSnapshot           Op = "setup-snapshot"
	OpTransitionToIncremental Op = "transition-to-incremental"
	OpTransitionToSnapshot    Op = "transition-to-snapshot"
	OpDestroy                 Op = "destroy"
	OpReconfigure             Op = "reconfigure"
	OpExpandCowFile           Op = "expand-cow-file"
	OpReconfigureAutoExpand   Op = "reconfigure-auto-expand"
	OpUpdateImage             Op = "update-img"
)

// request is one line from a client: the op and its arguments.
type request struct {
	Op   Op              `json:"op"`
	Args json.RawMessage `json:"args,omitempty"`
}

// response is a server's answer: an error (message and code), or, for
// info, the device.
type response struct {
	Error  string      `json:"error,omitempty"`
	Code   Code        `json:"code,omitempty"`
	Device *DeviceInfo `json:"device,omitempty"`
	// Progress comes in the interim answers of update-img; Copied in its
	// last one.
	Progress *Progress        `json:"progress,omitempty"`
	Copied   *UpdateImageDone `json:"copied,omitempty"`
}

// UpdateImage asks the server of the current snapshot to copy the blocks a
// previous snapshot's COW file marks as changed into that snapshot's image,
// reading the real device and its COW store itself: no round trip through
// the snapshot device. The client has checked both files; they travel with
// the request as descriptors (SCM_RIGHTS), the COW file first, so the
// server never opens a path the client named.
type UpdateImage struct {
	// UUID and SeqID are the snapshot the client checked the COW file
	// against; the server refuses if its current snapshot is another.
	UUID    string `json:"uuid"`
	SeqID   uint64 `json:"seq_id"`
	Workers int    `json:"workers,omitempty"` // parallel copies; 0 = default
}

// Progress is how many of the bytes to copy are copied.
type Progress struct {
	Done  int64 `json:"done"`
	Total int64 `json:"total"`
}

// UpdateImageDone is what an update-img did.
type UpdateImageDone struct {
	BlocksChanged uint64  `json:"blocks_changed"`
	BytesCopied   int64   `json:"bytes_copied"`
	Seconds       float64 `json:"seconds"`
}

// Detach asks the server to remove the front device and exit.
type Detach struct {
	// KeepState keeps an untracked device's state file for reload-all
	// (detach --all at shutdown); an explicit detach forgets it.
	KeepState bool `json:"keep_state,omitempty"`
	// InPlace, for a volume served from boot at shutdown (its filesystem
	// read-only by then, never unmounted), ends tracking clean and dormant
	// while the device goes on serving reads; writes are refused from
	// then on, so none can go untracked.
	InPlace bool `json:"in_place,omitempty"`
}

// SetupSnapshot starts a snapshot series (dattobd's setup-snapshot).
type SetupSnapshot struct {
	CowFile    string `json:"cow_file"`              // absolute path of a new file
	CacheBytes int64  `json:"cache_bytes,omitempty"` // -c; 0 = default
	FallocMiB  int64  `json:"falloc_mib,omitempty"`  // -f; 0 = default
	NoFreeze   bool   `json:"no_freeze,omitempty"`   // take it crash-consistent, unfrozen
}

// TransitionToSnapshot takes the next snapshot of the series.
type TransitionToSnapshot struct {
	CowFile   string `json:"cow_file"`             // absolute path of a new file
	FallocMiB int64  `json:"falloc_mib,omitempty"` // -f; 0 = as before
	NoFreeze  bool   `json:"no_freeze,omitempty"`  // take it crash-consistent, unfrozen
}

// Reconfigure changes the index cache limit.
type Reconfigure struct {
	CacheBytes int64 `json:"cache_bytes"`
}

// ExpandCowFile grows an active snapshot's COW store.
type ExpandCowFile struct {
	SizeMiB int64 `json:"size_mib"`
}

// AutoExpand makes a full COW store grow by itself; StepMiB 0 turns it off.
type AutoExpand struct {
	StepMiB    int64 `json:"step_mib"`
	ReserveMiB int64 `json:"reserve_mib,omitempty"`
}

// Status is what a minor's server is doing.
type Status string

const (
	// StatusServing: the front device is served.
	StatusServing Status = "serving"
	// StatusDetaching: a detach is removing the front device.
	StatusDetaching Status = "detaching"
	// StatusDormant: not attached, its tracking recorded for a reload.
	StatusDormant Status = "dormant"
	// StatusRecovering: its server died; the supervisor is starting a new
	// one (I/O is held meanwhile).
	StatusRecovering Status = "recovering"
	// StatusHeld: its server died and nothing restarts one: I/O is held
	// until `dbdctl attach` recovers it or `dbdctl detach` removes it.
	StatusHeld Status = "held"
	// StatusOrphaned: its server died and the device is dead: `dbdctl
	// detach` removes it.
	StatusOrphaned Status = "orphaned"
)

// DeviceInfo is one entry of `dbdctl info`: dattobd's /proc/datto-info
// fields first, then this project's.
type DeviceInfo struct {
	Minor       dattobd.Minor `json:"minor"`
	BlockDevice string        `json:"block_device"`
	State       dattobd.State `json:"state"`
	Error       int           `json:"error"` // dattobd's negative errno; 0 = healthy

	CowFile         string          `json:"cow_file,omitempty"`
	MaxCache        int64           `json:"max_cache,omitempty"`
	Fallocate       int64           `json:"fallocate,omitempty"`
	CowSizeCurrent  int64           `json:"cow_size_current,omitempty"`
	SeqID           uint64          `json:"seq_id,omitempty"`
	UUID            string          `json:"uuid,omitempty"`
	Version         uint64          `json:"version,omitempty"`
	NrChangedBlocks uint64          `json:"nr_changed_blocks,omitempty"`
	AutoExpand      *AutoExpandInfo `json:"auto_expand,omitempty"`

	Mode   dattobd.Mode `json:"mode"`
	Status Status       `json:"status"`
	// Frozen lists the filesystems frozen for the current snapshot's
	// instant; CrashConsistent says it was taken unfrozen (--no-freeze).
	Frozen          []string `json:"frozen,omitempty"`
	CrashConsistent bool     `json:"crash_consistent,omitempty"`
	SnapshotDevice  string   `json:"snapshot_device,omitempty"`
	CacheInUse      int64    `json:"cache_in_use,omitempty"`
	FrontDevice     string   `json:"front_device"`
	// InsertedVia names the hidden device-mapper device the server serves
	// when the front device is inserted under the (in use) block device.
	InsertedVia string `json:"inserted_via,omitempty"`
	// AttachedAtBoot says the initramfs attached the device (the root
	// volume): it ends at shutdown in place (Detach.InPlace).
	AttachedAtBoot bool  `json:"attached_at_boot,omitempty"`
	ServerPID      int   `json:"server_pid"`
	Size           int64 `json:"size"`
	LogicalBS      int   `json:"logical_block_size"`
	PhysicalBS     int   `json:"physical_block_size"`
	Queues         int   `json:"queues"`
	QueueDepth     int   `json:"queue_depth"`
	MaxIOBytes     int   `json:"max_io_bytes"`
	// DataPath is "zero-copy" where the kernel lends each request's pages
	// to the server's I/O, "copy" where it copies them (before Linux 6.16,
	// or with attach --copy); the snapshot device asks for the same.
	DataPath   ublk.DataPath `json:"data_path"`
	Features   string        `json:"ublk_features"`
	KernelFeat string        `json:"kernel_ublk_features"`
	Log        string        `json:"log"`
	Stats      IOCounters    `json:"io"`
}

// AutoExpandInfo is dattobd's auto_expand entry of info.
type AutoExpandInfo struct {
	StepSizeMiB      int64 `json:"step_size_mib"`
	ReservedSpaceMiB int64 `json:"reserved_space_mib"`
}

// IOCounters are the requests served since attach.
type IOCounters struct {
	Reads        uint64 `json:"reads"`
	Writes       uint64 `json:"writes"`
	Flushes      uint64 `json:"flushes"`
	Discards     uint64 `json:"discards"`
	WriteZeroes  uint64 `json:"write_zeroes"`
	Errors       uint64 `json:"errors"`
	BytesRead    uint64 `json:"bytes_read"`
	BytesWritten uint64 `json:"bytes_written"`
	// CowWritesMerged counts first writes' COW data writes that went to the
	// COW file inside a neighbour's vectored write.
	CowWritesMerged uint64 `json:"cow_writes_merged"`
}

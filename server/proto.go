package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Version is the project's version, reported by info.
const Version = "0.1.0"

// StateAttached is the info state of a device that is attached but not
// tracking. dattobd's states are 0..5 (dormant/active/unverified ×
// incremental/snapshot); a passthrough front device has no dattobd
// equivalent, so it reports -1.
const StateAttached = -1

// MaxMinor is the largest minor accepted, dattobd's hard maximum.
const MaxMinor = 255

// RunDir holds one control socket per attached minor. It is root-only.
var RunDir = envOr("DBDCTL_RUN_DIR", "/run/dbdctl")

// LogDir holds one log file per minor.
var LogDir = envOr("DBDCTL_LOG_DIR", "/var/log/dbdctl")

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// SocketPath is the control socket of minor.
func SocketPath(minor int) string { return filepath.Join(RunDir, strconv.Itoa(minor)+".sock") }

// LogPath is the log file of minor's server.
func LogPath(minor int) string { return filepath.Join(LogDir, "ublk"+strconv.Itoa(minor)+".log") }

// Request is one command sent to a server.
type Request struct {
	Op         string `json:"op"`                    // info, detach, setup-snapshot, transition-to-incremental, transition-to-snapshot, destroy, reconfigure, expand-cow-file, reconfigure-auto-expand
	CowFile    string `json:"cow_file,omitempty"`    // absolute path
	CacheBytes int64  `json:"cache_bytes,omitempty"` // -c
	FallocMiB  int64  `json:"falloc_mib,omitempty"`  // -f
	SizeMiB    int64  `json:"size_mib,omitempty"`    // expand-cow-file, auto-expand step
	ReserveMiB int64  `json:"reserve_mib,omitempty"` // auto-expand -r
	Keep       bool   `json:"keep,omitempty"`        // detach: keep the state file for reload-all
}

// Response is a server's answer.
type Response struct {
	Error  string      `json:"error,omitempty"`
	Device *DeviceInfo `json:"device,omitempty"`
}

// DeviceInfo is one entry of `dbdctl info`: dattobd's /proc/datto-info
// fields first, then this project's.
type DeviceInfo struct {
	Minor       int    `json:"minor"`
	BlockDevice string `json:"block_device"`
	State       int    `json:"state"`
	Error       int    `json:"error"`

	CowFile         string `json:"cow_file,omitempty"`
	MaxCache        int64  `json:"max_cache,omitempty"`
	Fallocate       int64  `json:"fallocate,omitempty"`
	CowSizeCurrent  int64  `json:"cow_size_current,omitempty"`
	SeqID           uint64 `json:"seq_id,omitempty"`
	UUID            string `json:"uuid,omitempty"`
	Version         uint64 `json:"version,omitempty"`
	NrChangedBlocks uint64 `json:"nr_changed_blocks,omitempty"`
	AutoExpand      *struct {
		StepSizeMiB      int64 `json:"step_size_mib"`
		ReservedSpaceMiB int64 `json:"reserved_space_mib"`
	} `json:"auto_expand,omitempty"`

	Mode           string     `json:"mode"`
	SnapshotDevice string     `json:"snapshot_device,omitempty"`
	CacheInUse     int64      `json:"cache_in_use,omitempty"`
	FrontDevice    string     `json:"front_device"`
	ServerPID      int        `json:"server_pid"`
	Size           int64      `json:"size"`
	LogicalBS      int        `json:"logical_block_size"`
	PhysicalBS     int        `json:"physical_block_size"`
	Queues         int        `json:"queues"`
	QueueDepth     int        `json:"queue_depth"`
	MaxIOBytes     int        `json:"max_io_bytes"`
	Features       string     `json:"ublk_features"`
	KernelFeat     string     `json:"kernel_ublk_features"`
	Log            string     `json:"log"`
	Stats          IOCounters `json:"io"`
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
}

// ErrNotAttached means no server answers for a minor.
var ErrNotAttached = errors.New("not attached")

// Call sends req to minor's server and returns its answer. A server error
// comes back as a Go error carrying the server's message.
func Call(minor int, req Request, timeout time.Duration) (*Response, error) {
	conn, err := net.DialTimeout("unix", SocketPath(minor), 2*time.Second)
	if err != nil {
		return nil, fmt.Errorf("minor %d is %w", minor, ErrNotAttached)
	}
	defer conn.Close()
	if timeout > 0 {
		conn.SetDeadline(time.Now().Add(timeout))
	}
	if err := json.NewEncoder(conn).Encode(req); err != nil {
		return nil, fmt.Errorf("minor %d: send %s: %w", minor, req.Op, err)
	}
	var resp Response
	if err := json.NewDecoder(conn).Decode(&resp); err != nil {
		return nil, fmt.Errorf("minor %d: no answer to %s: %w", minor, req.Op, err)
	}
	if resp.Error != "" {
		return &resp, errors.New(resp.Error)
	}
	return &resp, nil
}

// Minors lists the minors that have a control socket, ascending. A socket
// may be stale; Call tells.
func Minors() []int {
	entries, _ := os.ReadDir(RunDir)
	var out []int
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".sock")
		if !ok {
			continue
		}
		if n, err := ParseMinor(name); err == nil {
			out = append(out, n)
		}
	}
	sort.Ints(out)
	return out
}

// ListDevices asks every live server for its info.
func ListDevices() []DeviceInfo {
	var out []DeviceInfo
	for _, m := range Minors() {
		resp, err := Call(m, Request{Op: "info"}, 5*time.Second)
		if err != nil || resp.Device == nil {
			continue
		}
		out = append(out, *resp.Device)
	}
	return out
}

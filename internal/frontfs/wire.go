package frontfs

import (
	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/insert"
	"github.com/dbdublk/dbdublk/internal/protocol"
)

// Command is the hidden CLI command that runs Serve.
const Command = "front-fs-helper"

// op names a request.
type op string

const (
	opFreeze   op = "freeze"
	opThaw     op = "thaw"
	opCheck    op = "check-cow-path"
	opCreate   op = "create-on-volume"
	opTruncate op = "truncate"
	opUnpin    op = "unpin"
	opRemove   op = "remove"
	opRestore  op = "restore-volume"
)

// request is one line the server sends.
type request struct {
	Op     op       `json:"op"`
	Points []string `json:"points,omitempty"` // freeze, thaw: mount points
	// A COW file on the volume: its path, the real device it is written
	// to (create), the front device's number and the file's inode (the
	// checks of an open by name), a size (truncate).
	Path     string       `json:"path,omitempty"`
	Device   string       `json:"device,omitempty"`
	Options  *cow.Options `json:"options,omitempty"`
	FrontDev uint64       `json:"front_dev,omitempty"`
	Inode    uint64       `json:"inode,omitempty"`
	Size     int64        `json:"size,omitempty"`
	Check    *CowPath     `json:"check,omitempty"`
	// restore-volume: the live insertion to take out.
	Live *insert.Insertion `json:"live,omitempty"`
}

// response is the helper's answer to one request.
type response struct {
	Error    string        `json:"error,omitempty"`
	Code     protocol.Code `json:"code,omitempty"`
	Point    string        `json:"point,omitempty"` // freeze: the mount point that could not be frozen
	Extents  []cow.Extent  `json:"extents,omitempty"`
	Inode    uint64        `json:"inode,omitempty"`
	OnVolume bool          `json:"on_volume,omitempty"`
}

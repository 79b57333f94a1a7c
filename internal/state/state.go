// Package state keeps one record per attached minor in a state directory,
// saying how to bring it back after a restart, a crash or a reboot (what
// `dbdctl reload-all`, run by the boot unit, reads). Records are replaced
// atomically and durably.
package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/insert"
	"github.com/dbdublk/dbdublk/internal/linux"
)

// Dir holds the records, one file per minor.
var Dir = envOr("DBDCTL_STATE_DIR", "/var/lib/dbdctl")

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// Record is what a minor's state file says.
type Record struct {
	Minor       dattobd.Minor `json:"minor"`
	BlockDevice string        `json:"block_device"`
	Mode        dattobd.Mode  `json:"mode"`
	CowFile     string        `json:"cow_file,omitempty"`
	CacheBytes  int64         `json:"cache_bytes,omitempty"`
	FallocMiB   int64         `json:"falloc_mib,omitempty"`
	// CowExtents locate a COW file on the volume itself on the device, so
	// a reload opens it before its filesystem is mounted.
	CowExtents []linux.Extent `json:"cow_extents,omitempty"`
	// CowInode is a COW file on the volume's inode number: reopening it by
	// its name (to release or remove it) checks it is still that file.
	CowInode uint64 `json:"cow_inode,omitempty"`
	// CowRelative is the COW file's path relative to the mount point of
	// the volume it lives on (dattobd's reload takes it that way).
	CowRelative string `json:"cow_relative,omitempty"`
	// PrevCowExtents, in snapshot mode, are the extents of the previous COW
	// file (the change list update-img is about to use) when it is on the
	// volume: the snapshot shows them as zeros.
	PrevCowExtents []linux.Extent `json:"prev_cow_extents,omitempty"`
	// Frozen lists the filesystems the server froze and has not thawed yet:
	// a server that takes over after its death thaws them.
	Frozen []string `json:"frozen,omitempty"`
	// Live, when set, says the front device is inserted under a
	// device-mapper volume in use (BlockDevice names the volume): the
	// server serves the hidden device that carries its original table.
	Live *insert.Insertion `json:"live,omitempty"`
	// Failure, when set, is why the minor's tracking failed: its COW file
	// cannot be trusted, the next backup must be a full one, and only
	// destroy clears it.
	Failure *Failure `json:"failure,omitempty"`
	// Boot, when set, says the volume is attached at boot by the
	// initramfs (the root volume), which reads this record from the boot
	// record Boot locates (boot.go).
	Boot *Boot `json:"boot,omitempty"`
}

// Failure is a tracking failure as a record keeps it.
type Failure struct {
	Errno  int    `json:"errno"` // positive; dattobd's info shows it negated
	Reason string `json:"reason"`
}

// Path is the state file of minor.
func Path(m dattobd.Minor) string { return filepath.Join(Dir, m.String()+".json") }

// Write replaces r's record atomically and durably: its boot record first,
// if it has one (what the next boot trusts), then its state file.
func Write(r Record) error {
	if r.Boot != nil {
		if err := writeBoot(r.BlockDevice, r); err != nil {
			return err
		}
	}
	return WriteFile(r)
}

// WriteFile replaces r's state file atomically and durably, and nothing
// else: a boot copying its boot record into the initramfs's state
// directory, or a server catching up once the root is writable.
func WriteFile(r Record) error {
	if err := os.MkdirAll(Dir, 0o700); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	tmp := Path(r.Minor) + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(append(b, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, Path(r.Minor))
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return syncDir()
}

// Remove deletes minor's state file: it is not to come back.
func Remove(m dattobd.Minor) error {
	if err := os.Remove(Path(m)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return syncDir()
}

// syncDir makes a rename or removal in Dir durable.
func syncDir() error {
	d, err := os.Open(Dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// Load reads every state file, in minor order. A file that cannot be read
// or does not describe its minor is reported and skipped.
func Load() (records []Record, problems []error) {
	entries, err := os.ReadDir(Dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, []error{err}
	}
	for _, e := range entries {
		name := e.Name()
		if !strings.HasSuffix(name, ".json") {
			continue
		}
		path := filepath.Join(Dir, name)
		b, err := os.ReadFile(path)
		if err != nil {
			problems = append(problems, err)
			continue
		}
		var r Record
		if err := json.Unmarshal(b, &r); err != nil {
			problems = append(problems, fmt.Errorf("%s: %v", path, err))
			continue
		}
		if r.Minor.String()+".json" != name || r.BlockDevice == "" {
			problems = append(problems, fmt.Errorf("%s: does not describe minor %s", path, strings.TrimSuffix(name, ".json")))
			continue
		}
		if r.Live != nil && (r.Live.Volume == "" || r.Live.Hidden != insert.HiddenName(r.Minor)) {
			// The hidden device is found by this name and removed at
			// detach: never let a record name another device.
			problems = append(problems, fmt.Errorf("%s: its live insertion names %q, not minor %s's hidden device", path, r.Live.Hidden, r.Minor))
			continue
		}
		records = append(records, r)
	}
	sort.Slice(records, func(i, j int) bool { return records[i].Minor < records[j].Minor })
	return records, problems
}

// Find returns minor's record, if it has one that can be read.
func Find(m dattobd.Minor) (Record, bool) {
	records, _ := Load()
	for _, r := range records {
		if r.Minor == m {
			return r, true
		}
	}
	return Record{}, false
}

// OnVolume returns minor's record of a COW file on its own volume that
// path names (the absolute path it had, or its path relative to the
// volume's mount point), if there is one.
func OnVolume(m dattobd.Minor, path string) (Record, bool) {
	r, ok := Find(m)
	if !ok || len(r.CowExtents) == 0 {
		return Record{}, false
	}
	if path == r.CowFile || (r.CowRelative != "" && strings.TrimPrefix(path, "/") == r.CowRelative) {
		return r, true
	}
	return Record{}, false
}

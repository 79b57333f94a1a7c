package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/dbdublk/dbdublk/cow"
)

// StateDir holds one file per attached minor saying how to bring it back
// after a restart or a reboot (`dbdctl reload-all`, run by the boot unit).
var StateDir = envOr("DBDCTL_STATE_DIR", "/var/lib/dbdctl")

// Persisted is what a minor's state file records.
type Persisted struct {
	Minor       int    `json:"minor"`
	BlockDevice string `json:"block_device"`
	// Mode is passthrough, snapshot or incremental.
	Mode       string `json:"mode"`
	CowFile    string `json:"cow_file,omitempty"`
	CacheBytes int64  `json:"cache_bytes,omitempty"`
	FallocMiB  int64  `json:"falloc_mib,omitempty"`
	// CowExtents locate a COW file on the volume itself on the device, so
	// a reload opens it before its filesystem is mounted.
	CowExtents []cow.Extent `json:"cow_extents,omitempty"`
	// CowRelative is the COW file's path relative to the mount point of
	// the volume it lives on (dattobd's reload takes it that way).
	CowRelative string `json:"cow_relative,omitempty"`
	// PrevCowExtents: see snapshot.prevExtents.
	PrevCowExtents []cow.Extent `json:"prev_cow_extents,omitempty"`
}

// OnVolumeRecord returns the recorded COW file on minor's own volume that
// path names (the absolute path it had, or its path relative to the
// volume's mount point), if there is one.
func OnVolumeRecord(minor int, path string) (Persisted, bool) {
	states, _ := LoadStates()
	for _, p := range states {
		if p.Minor != minor || len(p.CowExtents) == 0 {
			continue
		}
		if path == p.CowFile || (p.CowRelative != "" && strings.TrimPrefix(path, "/") == p.CowRelative) {
			return p, true
		}
	}
	return Persisted{}, false
}

// StatePath is the state file of minor.
func StatePath(minor int) string { return filepath.Join(StateDir, strconv.Itoa(minor)+".json") }

// persist records the server's current configuration; a failure is logged
// (the device keeps working, only its return after a reboot is at stake).
// Caller holds s.mu.
func (s *Server) persist() {
	p := Persisted{Minor: s.cfg.Minor, BlockDevice: s.cfg.BlockDevice, Mode: s.mode().String()}
	if s.snap != nil {
		p.CowFile, p.CacheBytes, p.FallocMiB, p.CowExtents = s.snap.cowPath, s.snap.cacheBytes, s.snap.fallocMiB, s.snap.extents
		p.CowRelative, p.PrevCowExtents = s.snap.relative, s.snap.prevExtents
	}
	if err := writeState(p); err != nil {
		s.log.Printf("record state in %s: %v", StatePath(s.cfg.Minor), err)
	}
}

// forget removes minor's state file: it is not to come back.
func (s *Server) forget() {
	if err := os.Remove(StatePath(s.cfg.Minor)); err != nil && !errors.Is(err, os.ErrNotExist) {
		s.log.Printf("remove %s: %v", StatePath(s.cfg.Minor), err)
	}
}

// writeState replaces the state file atomically and durably.
func writeState(p Persisted) error {
	if err := os.MkdirAll(StateDir, 0o700); err != nil {
		return err
	}
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return err
	}
	tmp := StatePath(p.Minor) + ".tmp"
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
		err = os.Rename(tmp, StatePath(p.Minor))
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if d, err := os.Open(StateDir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// LoadStates reads every state file, in minor order. A file that cannot be
// read is reported and skipped.
func LoadStates() (states []Persisted, problems []error) {
	entries, err := os.ReadDir(StateDir)
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
		path := filepath.Join(StateDir, name)
		b, err := os.ReadFile(path)
		if err != nil {
			problems = append(problems, err)
			continue
		}
		var p Persisted
		if err := json.Unmarshal(b, &p); err != nil {
			problems = append(problems, fmt.Errorf("%s: %v", path, err))
			continue
		}
		if strconv.Itoa(p.Minor)+".json" != name || p.BlockDevice == "" {
			problems = append(problems, fmt.Errorf("%s: does not describe minor %s", path, strings.TrimSuffix(name, ".json")))
			continue
		}
		switch p.Mode {
		case "passthrough", "snapshot", "incremental":
		default:
			problems = append(problems, fmt.Errorf("%s: unknown mode %q", path, p.Mode))
			continue
		}
		states = append(states, p)
	}
	sort.Slice(states, func(i, j int) bool { return states[i].Minor < states[j].Minor })
	return states, problems
}

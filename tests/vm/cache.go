package vm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// CacheDir returns where fetched kernels are kept: $DBD_CACHE if set, else
// <repo root>/.cache/vm, the repo root being the nearest directory at or above
// the working directory that holds go.mod. Keeping the cache inside the tree
// lets a developer wipe it with the checkout and lets CI cache one path.
func CacheDir() (string, error) {
	if d := os.Getenv("DBD_CACHE"); d != "" {
		return filepath.Abs(d)
	}
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, ".cache", "vm"), nil
}

func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("vm: no go.mod above the working directory; set DBD_CACHE")
		}
		dir = parent
	}
}

// newStagingDir makes a private directory next to final, so that a finished
// result can be published with one rename on the same file system.
func newStagingDir(final string) (string, error) {
	parent := filepath.Dir(final)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return "", err
	}
	removeStaleStaging(parent)
	dir, err := os.MkdirTemp(parent, ".tmp-"+filepath.Base(final)+"-")
	if err != nil {
		return "", err
	}
	return dir, os.Chmod(dir, 0o755)
}

// publishDir renames staging to final. If another process published first,
// its copy wins and ours is discarded: both are built from the same inputs.
func publishDir(staging, final string) error {
	err := os.Rename(staging, final)
	if err == nil {
		return nil
	}
	if errors.Is(err, syscall.ENOTEMPTY) || errors.Is(err, syscall.EEXIST) {
		os.RemoveAll(staging)
		return nil
	}
	os.RemoveAll(staging)
	return fmt.Errorf("vm: publish %s: %w", final, err)
}

// removeStaleStaging deletes staging dirs left by killed processes. An hour is
// far longer than any fetch takes, so a live racer's dir is never touched.
func removeStaleStaging(parent string) {
	entries, err := os.ReadDir(parent)
	if err != nil {
		return
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), ".tmp-") {
			continue
		}
		if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > time.Hour {
			os.RemoveAll(filepath.Join(parent, e.Name()))
		}
	}
}

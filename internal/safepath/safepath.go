// Package safepath holds the rules a root daemon follows with paths that
// users give it: a file is created or opened in a directory no non-root
// user can rename or replace entries of, and no name is followed twice.
package safepath

import (
	"errors"
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// CheckDir refuses a directory (or any directory above it) in which a user
// other than root can rename or replace entries: owned by such a user, or
// writable by one without the sticky bit. Such a user could swap the names
// in it for files or links of their own between two uses.
// The path is resolved once; the refusal names the directory to fix.
func CheckDir(dir string) error {
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return fmt.Errorf("directory %s: %w", dir, unwrap(err))
	}
	real, err = filepath.Abs(real)
	if err != nil {
		return err
	}
	for d := real; ; d = filepath.Dir(d) {
		var st unix.Stat_t
		if err := unix.Lstat(d, &st); err != nil {
			return fmt.Errorf("directory %s: %w", d, err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			return fmt.Errorf("%s is not a directory", d)
		}
		if unsafeDir(st) {
			return fmt.Errorf("directory %s is writable by a user other than root and has no sticky bit; use a directory only root can change", d)
		}
		if d == "/" {
			return nil
		}
	}
}

// unsafeDir reports whether a user other than root may rename or replace
// entries of a directory with st: its owner when that is not root and may
// write (the sticky bit does not stop a directory's owner), or a non-root
// group or everyone with write permission and no sticky bit.
func unsafeDir(st unix.Stat_t) bool {
	if st.Uid != 0 && st.Mode&0o200 != 0 {
		return true
	}
	others := (st.Gid != 0 && st.Mode&0o020 != 0) || st.Mode&0o002 != 0
	return others && st.Mode&unix.S_ISVTX == 0
}

func unwrap(err error) error {
	var pe interface{ Unwrap() error }
	if errors.As(err, &pe) {
		if inner := pe.Unwrap(); inner != nil {
			return inner
		}
	}
	return err
}

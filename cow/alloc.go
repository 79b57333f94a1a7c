package cow

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

// preallocate reserves [off, off+n) of f. It is a variable so that tests
// can simulate ENOSPC or a sparse file without filling a real disk.
var preallocate = allocate

// allocate reserves [off, off+n) with fallocate(2) mode 0, which never
// changes existing data. Where the filesystem cannot fallocate, it writes
// zeros instead, as dattobd does; that is slow but keeps the promise that
// every byte of the file is allocated before the snapshot needs it.
func allocate(f *os.File, off, n int64) error {
	if n <= 0 {
		return nil
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) {
		for {
			ferr = unix.Fallocate(int(fd), 0, off, n)
			if ferr != unix.EINTR {
				return
			}
		}
	}); err != nil {
		return err
	}
	if ferr == nil {
		return nil
	}
	if !errors.Is(ferr, unix.EOPNOTSUPP) {
		return &os.PathError{Op: "fallocate", Path: f.Name(), Err: ferr}
	}
	return zeroFill(f, off, n)
}

// zeroFill writes n zero bytes at off.
func zeroFill(f *os.File, off, n int64) error {
	zero := make([]byte, 1<<20)
	for done := int64(0); done < n; {
		c := min(int64(len(zero)), n-done)
		if _, err := f.WriteAt(zero[:c], off+done); err != nil {
			return err
		}
		done += c
	}
	return nil
}

// nextData returns the offset of the first byte at or after off that is
// not in a hole (lseek SEEK_DATA), and false if there is none before the
// end of the file. Where SEEK_DATA is not supported it returns off.
func nextData(f *os.File, off int64) (int64, bool) {
	rc, err := f.SyscallConn()
	if err != nil {
		return off, true
	}
	next, serr := off, error(nil)
	if err := rc.Control(func(fd uintptr) {
		next, serr = unix.Seek(int(fd), off, unix.SEEK_DATA)
	}); err != nil {
		return off, true
	}
	switch {
	case serr == nil && next >= off:
		return next, true
	case errors.Is(serr, unix.ENXIO):
		return 0, false
	}
	return off, true
}

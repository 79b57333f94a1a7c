package ublk

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"syscall"
	"testing"
)

func TestErrnoResult(t *testing.T) {
	tests := []struct {
		name string
		n    int
		err  error
		want int32
	}{
		{"bytes", 4096, nil, 4096},
		{"zero bytes", 0, nil, 0},
		{"errno", 0, syscall.EINVAL, -int32(syscall.EINVAL)},
		{"errno ignores n", 512, syscall.ENOSPC, -int32(syscall.ENOSPC)},
		{"wrapped errno", 0, fmt.Errorf("pwrite at 4096: %w", syscall.EROFS), -int32(syscall.EROFS)},
		{"doubly wrapped errno", 0, fmt.Errorf("outer: %w", fmt.Errorf("inner: %w", syscall.ENODEV)), -int32(syscall.ENODEV)},
		{"path error", 0, &fs.PathError{Op: "read", Path: "/x", Err: syscall.ENXIO}, -int32(syscall.ENXIO)},
		{"joined errors", 0, errors.Join(errors.New("a"), syscall.EAGAIN), -int32(syscall.EAGAIN)},
		{"plain error", 0, errors.New("backend exploded"), -int32(syscall.EIO)},
		{"io.EOF", 100, io.EOF, -int32(syscall.EIO)},
		{"errno zero is not success", 0, syscall.Errno(0), -int32(syscall.EIO)},
	}
	for _, tt := range tests {
		if got := errnoResult(tt.n, tt.err); got != tt.want {
			t.Errorf("%s: errnoResult(%d, %v) = %d, want %d", tt.name, tt.n, tt.err, got, tt.want)
		}
	}
}

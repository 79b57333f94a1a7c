package ublk

import (
	"syscall"
	"testing"

	"github.com/dbdublk/dbdublk/ublk/uapi"
)

func desc(op uapi.IOOp, flags uint32, startSector uint64, sectors uint32) *uapi.IODesc {
	return &uapi.IODesc{OpFlags: uint32(op) | flags, StartSector: startSector, NrSectors: sectors}
}

func errno(e syscall.Errno) int32 { return -int32(e) }

// prepare's rules, one request kind per row.
func TestPrepare(t *testing.T) {
	const buf = 64 << 10
	tests := []struct {
		name       string
		d          *uapi.IODesc
		canDiscard bool
		want       fileOp
	}{
		{"read", desc(uapi.IOOpRead, 0, 8, 16), false, fileOp{opcode: uapi.OpRead, off: 4096, n: 8192}},
		{"read ignores failfast", desc(uapi.IOOpRead, uapi.IOFlagFailfastDev, 8, 16), false, fileOp{opcode: uapi.OpRead, off: 4096, n: 8192}},
		{"whole-buffer read", desc(uapi.IOOpRead, 0, 0, buf>>9), false, fileOp{opcode: uapi.OpRead, n: buf}},
		{"read past the buffer", desc(uapi.IOOpRead, 0, 0, buf>>9+1), false, done(errno(syscall.EINVAL))},
		{"write", desc(uapi.IOOpWrite, 0, 100, 8), false, fileOp{opcode: uapi.OpWrite, off: 51200, n: 4096}},
		{"FUA write is a dsync write", desc(uapi.IOOpWrite, uapi.IOFlagFUA, 2, 1), false, fileOp{opcode: uapi.OpWrite, off: 1024, n: 512, rwFlags: uapi.RWFDsync}},
		{"write past the buffer", desc(uapi.IOOpWrite, 0, 0, buf>>9+1), false, done(errno(syscall.EINVAL))},
		{"flush is fdatasync", desc(uapi.IOOpFlush, 0, 0, 0), false, fileOp{opcode: uapi.OpFsync, fsync: uapi.FsyncDatasync}},
		{"discard punches a hole", desc(uapi.IOOpDiscard, 0, 2048, 4096), true,
			fileOp{opcode: uapi.OpFallocate, off: 2048 * 512, n: 4096 * 512, falloc: uapi.FallocPunchHole | uapi.FallocKeepSize}},
		{"discard without a discarding device", desc(uapi.IOOpDiscard, 0, 0, 8), false, done(0)},
		{"write-zeroes is a zero range", desc(uapi.IOOpWriteZeroes, 0, 16, 1<<20), false,
			fileOp{opcode: uapi.OpFallocate, off: 16 * 512, n: (1 << 20) * 512, falloc: uapi.FallocZeroRange | uapi.FallocKeepSize}},
		{"write-zeroes NOUNMAP too", desc(uapi.IOOpWriteZeroes, uapi.IOFlagNoUnmap, 8, 8), true,
			fileOp{opcode: uapi.OpFallocate, off: 4096, n: 4096, falloc: uapi.FallocZeroRange | uapi.FallocKeepSize}},
		{"write-same", desc(uapi.IOOpWriteSame, 0, 0, 8), true, done(errno(syscall.EOPNOTSUPP))},
		{"unknown op 6", desc(6, 0, 0, 8), true, done(errno(syscall.EOPNOTSUPP))},
		{"unknown op 0xff", desc(0xff, 0, 0, 8), true, done(errno(syscall.EOPNOTSUPP))},
	}
	for _, tt := range tests {
		if got := prepare(tt.d, buf, tt.canDiscard); got != tt.want {
			t.Errorf("%s: prepare = %+v, want %+v", tt.name, got, tt.want)
		}
	}
}

// settle's rules for a file operation's result.
func TestSettle(t *testing.T) {
	tests := []struct {
		name string
		d    *uapi.IODesc
		res  int32
		want int32
	}{
		{"read bytes", desc(uapi.IOOpRead, 0, 0, 16), 8192, 8192},
		{"short read passes through", desc(uapi.IOOpRead, 0, 0, 8), 1024, 1024},
		{"zero-byte read is EIO", desc(uapi.IOOpRead, 0, 0, 8), 0, errno(syscall.EIO)},
		{"zero-byte write is EIO", desc(uapi.IOOpWrite, 0, 0, 8), 0, errno(syscall.EIO)},
		{"read error", desc(uapi.IOOpRead, 0, 0, 8), errno(syscall.ENXIO), errno(syscall.ENXIO)},
		{"write error", desc(uapi.IOOpWrite, 0, 0, 8), errno(syscall.EROFS), errno(syscall.EROFS)},
		{"flush ok", desc(uapi.IOOpFlush, 0, 0, 0), 0, 0},
		{"flush error", desc(uapi.IOOpFlush, 0, 0, 0), errno(syscall.EIO), errno(syscall.EIO)},
		{"discard unsupported is a no-op", desc(uapi.IOOpDiscard, 0, 0, 8), errno(syscall.EOPNOTSUPP), 0},
		{"discard error", desc(uapi.IOOpDiscard, 0, 0, 8), errno(syscall.EIO), errno(syscall.EIO)},
		{"write-zeroes unsupported stays an error", desc(uapi.IOOpWriteZeroes, 0, 0, 8), errno(syscall.EOPNOTSUPP), errno(syscall.EOPNOTSUPP)},
		{"write-zeroes ok", desc(uapi.IOOpWriteZeroes, 0, 0, 8), 0, 0},
	}
	for _, tt := range tests {
		if got := settle(tt.d, tt.res); got != tt.want {
			t.Errorf("%s: settle(%d) = %d, want %d", tt.name, tt.res, got, tt.want)
		}
	}
	if skipped(desc(uapi.IOOpWrite, 0, 0, 8)) != 4096 || skipped(desc(uapi.IOOpDiscard, 0, 0, 8)) != 0 {
		t.Error("a skipped request does not complete as success")
	}
}

func TestCount(t *testing.T) {
	var c queueCounters
	c.count(uapi.IOOpRead, 4096)
	c.count(uapi.IOOpRead, errno(syscall.EIO))
	c.count(uapi.IOOpWrite, 512)
	c.count(uapi.IOOpFlush, 0)
	c.count(uapi.IOOpDiscard, 0)
	c.count(uapi.IOOpWriteZeroes, errno(syscall.EOPNOTSUPP))
	c.count(uapi.IOOpWriteSame, errno(syscall.EOPNOTSUPP))
	want := QueueStats{Reads: 2, Writes: 1, Flushes: 1, Discards: 1, WriteZeroes: 1, Errors: 3, BytesRead: 4096, BytesWritten: 512}
	if got := c.snapshot(); got != want {
		t.Errorf("counters = %+v, want %+v", got, want)
	}
	d := &Device{queues: []*queue{{}, {}}}
	d.queues[0].stats.count(uapi.IOOpRead, 8)
	d.queues[1].stats.count(uapi.IOOpRead, 16)
	if got := d.Stats(); got.Reads != 2 || got.BytesRead != 24 {
		t.Errorf("Device.Stats does not sum the queues: %+v", got)
	}
}

func TestUserData(t *testing.T) {
	for _, kind := range []int{kindUblk, kindTarget, kindWake} {
		for _, tag := range []int{0, 1, 127, uapi.MaxQueueDepth - 1, 0xffff} {
			ud := userData(kind, tag)
			if got := int(ud & 0xffff); got != tag {
				t.Errorf("userData(%d, %d): tag decodes as %d", kind, tag, got)
			}
			if got := int(ud >> 16); got != kind {
				t.Errorf("userData(%d, %d): kind decodes as %d", kind, tag, got)
			}
		}
	}
}

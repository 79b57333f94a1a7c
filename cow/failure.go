package cow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The failure record: once tracking into a file has failed (a snapshot's
// store filled, a change-list write failed, a crash could not be
// recovered), the file says so for good, in the header's reserved space,
// so no reload, recovery or update-img after any restart can take it for
// an intact file. A failed file is never closed clean, so dattobd's own
// tools see it as "not left in clean state" too.
//
//	0x300  8  magic "DBDFAILD"
//	0x308  4  errno (positive; dattobd's info shows it negated)
//	0x30C  4  CRC-32C of 0x300..0x3FF with this field zero
//	0x310  8  when, Unix seconds
//	0x318  …  reason, UTF-8, NUL padded, up to 0x400
const (
	failureOff    = 0x300
	failureEnd    = 0x400
	failureMagic  = 0x444C494146444244 // "DBDFAILD" little-endian
	failureCRCOff = failureOff + 0x0C
	reasonOff     = failureOff + 0x18
	maxReason     = failureEnd - reasonOff
)

// ErrFailed reports a file whose tracking failed: its snapshot or change
// list cannot be trusted, and the next backup must be a full one.
var ErrFailed = errors.New("cow file tracking failed")

// Failure is what a failure record says.
type Failure struct {
	Errno  syscall.Errno
	Reason string
	At     time.Time
}

// String names the failure in one line.
func (x Failure) String() string {
	return fmt.Sprintf("%s (%v, %s)", x.Reason, x.Errno, x.At.UTC().Format(time.RFC3339))
}

// putFailure writes x into the header block b.
func putFailure(b []byte, x *Failure) {
	r := b[failureOff:failureEnd]
	clear(r)
	le := binary.LittleEndian
	le.PutUint64(r[0:], failureMagic)
	le.PutUint32(r[8:], uint32(x.Errno))
	le.PutUint64(r[0x10:], uint64(x.At.Unix()))
	reason := x.Reason
	if len(reason) > maxReason {
		reason = reason[:maxReason]
	}
	copy(r[0x18:], reason)
	le.PutUint32(r[0x0C:], crc32.Checksum(r, castagnoli))
}

// parseFailure reads the failure record of header block b: nil when there
// is none; ErrCorrupt when one is there but torn.
func parseFailure(b []byte) (*Failure, error) {
	r := b[failureOff:failureEnd]
	le := binary.LittleEndian
	if le.Uint64(r[0:]) != failureMagic {
		return nil, nil
	}
	crc := le.Uint32(r[0x0C:])
	c := append([]byte(nil), r...)
	le.PutUint32(c[0x0C:], 0)
	if crc32.Checksum(c, castagnoli) != crc {
		return nil, corrupt("its failure record is torn")
	}
	reason := r[0x18:]
	for i, ch := range reason {
		if ch == 0 {
			reason = reason[:i]
			break
		}
	}
	return &Failure{
		Errno:  syscall.Errno(le.Uint32(r[8:])),
		Reason: string(reason),
		At:     time.Unix(int64(le.Uint64(r[0x10:])), 0),
	}, nil
}

// failedErr is Open's refusal of a failed file.
func failedErr(path string, x *Failure) error {
	return &wrapErr{msg: fmt.Sprintf("cow file %s records a tracking failure: %s; a full backup is required", path, x), target: ErrFailed}
}

// RecordFailure writes a failure record into the file and fsyncs it before
// it returns: from then on the file is failed for good, whoever opens it,
// and it is never closed clean. The first failure is kept. A record that
// could not be written (the file's storage failing) is written again by
// the next call, so a caller retries once the storage may be back; once
// on disk, later calls return at once. errno 0 is taken as EIO.
func (f *File) RecordFailure(errno syscall.Errno, reason string) error {
	if errno == 0 {
		errno = unix.EIO
	}
	f.opMu.Lock()
	defer f.opMu.Unlock()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failure != nil && f.failureDurable {
		return nil
	}
	if err := f.writable(); err != nil {
		return err
	}
	if f.failure == nil {
		f.failure = &Failure{Errno: errno, Reason: reason, At: time.Now()}
	}
	f.hdr.Flags &^= FlagClean
	err := f.writeHeaderSync()
	f.failureDurable = err == nil
	return err
}

// Failed returns the file's failure record, or nil.
func (f *File) Failed() *Failure {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failure == nil {
		return nil
	}
	x := *f.failure
	return &x
}

// MarkFailed writes a failure record into the COW file whose bytes s holds
// without opening it for tracking (a file whose tracking could not be
// resumed), so that no later reload takes it for intact. A record already
// there is kept. It closes s.
func MarkFailed(path string, s Storage, errno syscall.Errno, reason string) error {
	defer s.Close()
	if errno == 0 {
		errno = unix.EIO
	}
	b := make([]byte, HeaderSize)
	if _, err := s.ReadAt(b, 0); err != nil {
		return fmt.Errorf("cow file %s: read header: %w", path, unwrapPath(err))
	}
	if _, err := parseHeader(b); err != nil {
		return fmt.Errorf("cow file %s: %w", path, err)
	}
	if x, _ := parseFailure(b); x != nil {
		return nil
	}
	le := binary.LittleEndian
	le.PutUint32(b[offFlags:], le.Uint32(b[offFlags:])&^FlagClean)
	putFailure(b, &Failure{Errno: errno, Reason: reason, At: time.Now()})
	if _, err := s.WriteAt(b, 0); err != nil {
		return fmt.Errorf("cow file %s: write its failure record: %w", path, unwrapPath(err))
	}
	if err := s.Sync(); err != nil {
		return fmt.Errorf("cow file %s: fsync: %w", path, unwrapPath(err))
	}
	return nil
}

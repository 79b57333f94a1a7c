package track

import (
	"fmt"
	"syscall"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/ublk"
)

// A first write in snapshot mode is prepared on the queue's own ring when
// it can be (stagedCopy): the old blocks are read and stored, and their
// index entries written through, as I/O on the ring, with no hop to
// the copy-on-write workers and no blocking call on any thread. The
// workers remain the path for what the ring cannot do without waiting:
// blocks another copy has in flight, a full store (auto-expansion), a COW
// file on the device itself, and failures, which must be made durable off
// the queue thread.

// stagedCopy is one first write's copy-on-write as a ublk.Stage, in three
// rounds: read the old blocks, write them to their COW slots, then publish
// and write through their index entries (never an entry before its data).
// The data write is its own round, marked Gather, so that the queue merges
// the data of concurrent copies whose slots are adjacent into one write:
// a write into the store's fresh slots costs per call, not per byte.
type stagedCopy struct {
	t           *Tracker
	st          *State
	rc          *cow.RangeCopy
	buf         *[]byte
	data        ublk.StageIO // the data write, once the reads are done
	first, last uint64
	resume      func(error)
	stage       *ublk.Stage
	phase       copyPhase
}

// copyPhase is the round of a stagedCopy that is running.
type copyPhase uint8

const (
	readingOld copyPhase = iota
	writingData
	writingIndex
)

// stage prepares the copy-on-write of blocks [first, last) as s and
// answers WriteStaged, or WriteProceed when every block is preserved
// already; ok is false when the write must take the workers' path.
func (t *Tracker) stage(st *State, first, last uint64, resume func(error), s *ublk.Stage) (action ublk.WriteAction, ok bool) {
	if last-first > maxBulkBlocks || !st.Cow.Stageable() {
		return 0, false
	}
	rc, err := st.Cow.BeginRange(first, last-first)
	if err != nil {
		return 0, false // busy, full or failing: the workers wait, expand or fail
	}
	blocks := rc.Blocks()
	if len(blocks) == 0 {
		rc.Finish(nil)
		if st.Bits != nil {
			st.Bits.SetRange(first, last-first)
		}
		return ublk.WriteProceed, true
	}
	buf := copies.tryGet(len(blocks) * cow.BlockSize)
	if buf == nil {
		rc.Finish(errStagingBudget)
		return 0, false
	}
	data := (*buf)[:len(blocks)*cow.BlockSize]
	io := s.IO[:0]
	for i := 0; i < len(blocks); {
		j := i + 1
		for j < len(blocks) && blocks[j] == blocks[j-1]+1 {
			j++
		}
		if len(io) == ublk.MaxStageIO { // one more read would not fit the round
			copies.put(buf)
			rc.Finish(errStagingScattered)
			return 0, false
		}
		part := data[i*cow.BlockSize : j*cow.BlockSize]
		off := int64(blocks[i]) * cow.BlockSize
		n := min(int64(len(part)), t.Size()-off)
		clear(part[max(n, 0):]) // past the device's end reads as zeros
		if n > 0 {
			io = append(io, ublk.StageIO{FD: t.FD(), Off: off, Buf: part[:n]})
		}
		i = j
	}
	fd, at := rc.DataTarget()
	c := &stagedCopy{t: t, st: st, rc: rc, buf: buf, first: first, last: last, resume: resume, stage: s,
		data: ublk.StageIO{Write: true, Gather: true, FD: fd, Off: at, Buf: data}}
	if len(io) == 0 { // every block lies past the device's end: nothing to read
		io, c.phase = append(io, c.data), writingData
	}
	s.IO, s.Done = io, c.done
	return ublk.WriteStaged, true
}

// done advances the copy when a round of its I/O has run: after the reads,
// write the data; after the data, publish the entries and write them
// through; after those, release the blocks and let the write go.
func (c *stagedCopy) done(err error) (more bool, verdict error) {
	if err == nil && c.phase == readingOld {
		c.phase = writingData
		c.stage.IO = append(c.stage.IO[:0], c.data)
		return true, nil
	}
	if err == nil && c.phase == writingData {
		c.phase = writingIndex
		index, perr := c.rc.Publish()
		if perr == nil {
			io := c.stage.IO[:0]
			for _, w := range index {
				io = append(io, ublk.StageIO{Write: true, FD: w.FD, Off: w.Off, Buf: w.Buf})
			}
			if len(io) <= ublk.MaxStageIO {
				c.stage.IO = io
				return true, nil
			}
			// Runs of the range's blocks, split at most once more at a
			// section's end: never more than a round holds.
			perr = fmt.Errorf("%d index writes for one copy", len(io))
		}
		err = perr
	}
	ferr := c.rc.Finish(err)
	copies.put(c.buf)
	c.buf = nil
	if ferr != nil {
		// The snapshot fails closed and the write then proceeds, as on
		// the workers' path; the failure is made durable off this thread
		// first (it writes files, which may live on this very device).
		go func() {
			c.t.Fail(syscall.EIO, ferr)
			c.resume(nil)
		}()
		return false, ublk.ErrResumeLater
	}
	if c.st.Bits != nil {
		c.st.Bits.SetRange(c.first, c.last-c.first)
	}
	return false, nil
}

var (
	errStagingBudget    = fmt.Errorf("copy memory budget reached")
	errStagingScattered = fmt.Errorf("too many runs of unpreserved blocks for one ring chain")
)

// Package bitmap is the in-memory fast filter in front of the COW file's
// index: one bit per 4 KiB block of the tracked device, set once the block
// is recorded in the index (preserved in snapshot mode, marked changed in
// incremental mode).
//
// The authoritative record of changed blocks is the COW file's index, which
// is slow to consult (locks, I/O). Every write first asks the bitmap; only
// a write to a block whose bit is clear has to go to the index, and the
// bits are set once the index holds the blocks:
//
//	if !bits.TestRange(first, count) {
//		// record blocks [first, first+count) in the COW file
//		bits.SetRange(first, count)
//	}
//
// A bit must be set only after its block is recorded: a writer that finds
// the bit set lets its write through without touching the index.
//
// # Concurrency
//
// All methods may be called from any number of goroutines at once. The
// write path is lock-free: each 64-bit word is read with an atomic load and
// updated with an atomic OR, so exactly one caller observes each bit
// becoming set (SetRange counts it in exactly one call). A bit that is
// already set costs one atomic load and no write, so the hot path does not
// bounce cache lines between queue threads.
//
// TestRange reads each word atomically but not the range as a whole: under
// concurrent writes it may miss bits set during the scan, never report a
// bit that was not set. Bits are never cleared.
//
// # Out-of-range indexes
//
// Bit indexes are uint64 and the caller is expected to validate them
// against the device size. The bitmap never panics or touches memory
// outside its words on a bad index: SetRange clamps to the bitmap's size,
// and TestRange of a range that extends past it reports false (bits past
// the end are never set).
package bitmap

// Package bitmap is the in-memory fast filter for incremental mode: one bit
// per 4 KiB block of the tracked device, set when the block is written.
//
// The authoritative record of changed blocks is the COW file's index, which
// is slow to update (locks, I/O). Every write first goes through the bitmap;
// only a block whose bit was newly set has to be recorded in the index:
//
//	bits.NewlySet(first, count, func(b uint64) { cowFile.MarkChanged(b) })
//
// # Concurrency
//
// All methods except [Bitmap.UnmarshalBinary] on an empty (zero-length)
// receiver may be called from any number of goroutines at once. The write
// path is lock-free: each 64-bit word is read with an atomic load and
// updated with an atomic OR, so exactly one caller observes each bit
// becoming set, whichever way (Set, SetRange, NewlySet) it was set. A bit
// that is already set costs one atomic load and no write, so the hot path
// does not bounce cache lines between queue threads.
//
// Readers that scan many words (Count, Runs, TestRange, MarshalBinary) read
// each word atomically but not the bitmap as a whole: under concurrent
// writes they see some bits that were set before or during the scan, never
// a bit that was not set. Clear is likewise word by word.
//
// Note for callers of NewlySet: the bit is set before fn runs, so a second
// writer of the same block can see the bit set, skip the index, and
// complete its write before the first writer's fn has recorded the block.
// If fn fails, the block is in the bitmap but not in the index and later
// writes of it will be filtered out; the caller must then treat the whole
// tracking state as failed (as dattobd does), not just retry the block.
//
// # Out-of-range indexes
//
// Bit indexes are uint64 and the caller is expected to validate them
// against the device size. The bitmap never panics or touches memory
// outside its words on a bad index: Set and Test of i >= Len() return false
// and do nothing, range operations clamp to [0, Len()), and TestRange of a
// range that extends past Len() reports false (bits past the end are never
// set).
//
// # Encoding
//
// MarshalBinary produces a versioned, little-endian encoding that carries
// the bit count and a CRC32C (Castagnoli) checksum, and picks whichever of
// two payloads is smaller: the raw words, or a run-length list of the set
// bits (so an almost empty or almost full map of a large device is a few
// bytes). See the format description in encoding.go.
package bitmap

// Package track is the snapshot and change-tracking engine: the backend of
// a front device (Tracker), which sees every modifying request before it
// reaches the real device, and the backend of its snapshot device (View).
//
// A Tracker is in one of dattobd's modes at a time. In snapshot mode a
// first write to a block waits (off the queue thread, in a pool of
// copy-on-write workers) until the block's old data is in the COW file; in
// incremental mode a write into a region not yet recorded waits until the
// region's write intent is on disk. A mode change (Swap) installs the new
// state at one instant and returns once every write admitted under the old
// one has completed, so a snapshot never shows a write that was still in
// flight at its instant.
//
// It depends on the COW store (cow), its bitmap filter (bitmap) and the
// ublk backend contract only, and is tested on the host on plain files.
package track

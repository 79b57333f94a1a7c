// Package cow is the copy-on-write store of live snapshots and the
// changed-block list of incremental tracking: a COW file in dattobd's
// on-disk format (a 4 KiB header, a flat index of one little-endian u64 per
// 4 KiB block of the device, then 4 KiB data slots), so that a cleanly
// closed file is a valid dattobd COW file. docs/cow-format.md describes the
// format, the choices made here and the clean/dirty protocol.
//
// Create makes a new file; Open reopens one, in a Mode (ReadOnly,
// ReloadSnapshot, ResumeSnapshot, ReloadIncremental), from a Storage: the
// file through its filesystem (FileStorage) or the file's extents on the
// snapshotted device (DeviceStorage, a COW file on the volume itself).
//
// A File is safe for concurrent use. CopyOnWriteRange is first-write-wins
// and does its data I/O outside the file's lock; the index is cached in
// 32 KiB sections within a fixed memory budget, whatever the device size.
package cow

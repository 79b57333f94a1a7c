// Package frontfs does a server's work on the filesystems that live on
// its own front device — freezing and thawing them, checking a COW file's
// path, creating, truncating, releasing and removing a COW file kept on
// the volume — in a helper process, never in the server.
//
// Such a call waits in the kernel, uninterruptibly, for I/O that the
// server itself serves: a freeze waits for the journal to commit, a
// truncate or a stat may have to read the device. If the server is killed
// meanwhile, the thread in that call cannot end, so the process never
// finishes exiting, the kernel never lets a new server take the ublk
// device over, and the filesystem on it hangs for good (a kill storm in
// the VM tests found exactly that, in FIFREEZE). In a helper, the same
// call just completes once the next server serves the device; the helper
// then sees the end of its input (its server is gone), thaws whatever it
// froze and exits.
//
// The server talks to the helper (Start, then the Helper's methods) over
// its standard input and output, one JSON request and one JSON answer per
// line; Serve is the helper's side. The helper is the server's own
// executable run with the hidden command Command.
package frontfs

// Package ublk serves block devices from userspace through the kernel's
// ublk driver (Linux ≥ 6.0): it sends the control commands
// (/dev/ublk-control), runs each hardware queue's FETCH / COMMIT_AND_FETCH
// loop on an io_uring of its own, and hands every request to a Backend.
//
// # Life cycle
//
// A DeviceSpec is plain data, checked by Validate without a kernel. Create
// adds the device and sets its parameters; Start runs the queues and makes
// /dev/ublkb<id> appear; Stop removes the block device (the kernel writes
// back and drains it through the still-running queues); Delete frees the
// id. Only the creator deletes. A device created with FeatUserRecovery
// outlives its server: the kernel holds its I/O until a new process calls
// Recover and Start.
//
// # The request path
//
// A Backend is a file (or block device) opened for O_DIRECT and mapped 1:1
// onto the device. Each request becomes one io_uring operation on that file,
// issued on the queue's own ring: a read or write into the tag's buffer, an
// fdatasync for FLUSH, a hole punch for DISCARD (when the backend can
// discard), a zero range for WRITE_ZEROES. A WriteInterceptor sees every
// modifying request first and may defer it; a ReadFinisher post-processes
// what was read. errnoResult is the one place a Go error becomes a kernel
// errno.
//
// # Rules a server must keep
//
//   - Queue threads: each queue is one goroutine locked to its OS thread for
//     its whole life (the kernel binds the queue to the thread that fetched
//     its tags, and the ring is SINGLE_ISSUER). Code the queue calls
//     (WriteInterceptor.BeforeWrite, ReadFinisher.FinishRead) runs on that
//     thread and must never wait for another request of the device: the
//     thread that would complete it is the one waiting. Slow work goes to
//     other goroutines and comes back through WritePending and resume; I/O
//     a write must wait for can run on the queue's own ring as a Stage
//     (Stager), with no thread hop at all.
//   - No I/O on your own device: a server that reads or writes its own
//     /dev/ublkb<id> (or a filesystem mounted from it) from a queue thread,
//     or from anything a queue thread waits for, deadlocks. Queue threads
//     set PR_SET_IO_FLUSHER so memory reclaim on them never issues I/O that
//     could need them.
//   - Mount namespaces: a server that shares a mount namespace with users of
//     its device must not hold a mount of that device past its own exit
//     (a private namespace torn down at exit would flush through a device
//     nobody serves any more). This project's server stays in the host's
//     namespace and never mounts its own device.
//   - Buffers handed to the kernel (tag buffers, descriptors, control
//     payloads) are off the Go heap (mmap), since the kernel reads and writes
//     them asynchronously.
package ublk

// Package uring is a small io_uring ring over the raw syscalls, sized for a
// ublk server: one ring per OS thread, SQE128 for ublk control commands, and
// an allocation-free hot path (NextSQE, Submit, SubmitAndWait, ReapCQEs).
//
// # Ownership and threads
//
// A [Ring] is not safe for concurrent use; one goroutine owns it. With
// uapi.SetupSingleIssuer (and uapi.SetupDeferTaskrun, which needs it) the
// kernel binds the ring to the OS thread that created it: call
// runtime.LockOSThread before [New] and keep the goroutine locked for the
// ring's whole life. io_uring_enter or io_uring_register from any other
// thread then fails with EEXIST. Under DEFER_TASKRUN completions are posted
// only while the owner thread is inside io_uring_enter with GETEVENTS
// ([Ring.SubmitAndWait]); [Ring.ReapCQEs] alone never makes new ones
// appear, and waiting on an eventfd or epoll instead does not work. To wake
// an owner waiting in SubmitAndWait from another thread, keep a read of an
// eventfd in flight on its ring ([PrepRead]) and write to the eventfd.
//
// # Memory rules for SQEs
//
// The kernel reads SQE addresses (buffers) after the Go call that placed
// them returns, and for reads and writes it keeps using a buffer until the
// CQE arrives. Every address put into an SQE must therefore point to memory
// the Go runtime will neither move nor free while the operation is in
// flight: memory from unix.Mmap (the usual choice), or Go heap memory held
// by a runtime.Pinner until the CQE is reaped. Never use stack memory (Go
// stacks move) and never rely on runtime.KeepAlive, which only covers a
// synchronous call.
//
// # Memory ordering
//
// The ring indices live in memory shared with the kernel and are accessed
// only through sync/atomic (sequentially consistent in Go, so at least as
// strong as liburing's acquire/release pairs):
//
//   - sq.tail is stored after all SQE bytes of a batch are written (release),
//     so the kernel never sees a half-written SQE;
//   - sq.head is loaded before a slot is reused (acquire);
//   - cq.tail is loaded before any CQE below it is read (acquire);
//   - cq.head is stored only after the CQEs have been copied out (release),
//     so the kernel never overwrites a CQE still being read.
//
// Plain loads and stores are not moved across sync/atomic calls by the Go
// compiler, which is what makes the plain SQE writes and CQE reads safe.
//
// # Signals
//
// The Go runtime preempts goroutines with SIGURG, so a blocking
// io_uring_enter returns EINTR routinely. Every call here retries EINTR and
// recomputes the number of SQEs to submit from the kernel's sq.head rather
// than trusting a return value.
package uring

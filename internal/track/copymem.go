package track

import (
	"math/bits"
	"sync"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/dio"
)

// CopyBudget bounds the old blocks held by copies in flight: staged copies
// on the queues' rings and the copy-on-write workers' copies draw from it
// together, so that the server's memory grows neither with the queues'
// depth nor with the number of workers (README's bound).
const CopyBudget = 8 << 20

// copyMemory hands out the aligned buffers of copies in flight, in
// power-of-two size classes from one block to maxBulkBlocks. It keeps the
// buffers that return for the next copies instead of leaving them to the
// garbage collector, whose heap goal would double them, and everything it
// holds, handed out or kept, stays within CopyBudget.
type copyMemory struct {
	mu    sync.Mutex
	freed sync.Cond // signalled when buffers return
	held  int64     // bytes of buffers handed out or kept
	free  [copyClasses][]*[]byte
}

const copyClasses = 9 // 4 KiB .. 1 MiB

// copies is the server's copy memory (one device per server).
var copies = newCopyMemory()

func newCopyMemory() *copyMemory {
	m := &copyMemory{}
	m.freed.L = &m.mu
	return m
}

func copyClass(n int) int { return bits.Len(uint((n - 1) / cow.BlockSize)) }

// tryGet returns a buffer of at least n bytes (n at most maxBulkBlocks
// blocks), or nil when the budget is spent: a queue thread must not wait.
func (m *copyMemory) tryGet(n int) *[]byte { return m.take(n, false) }

// get is tryGet for a worker: it waits for buffers to return. Holders
// never wait for the budget themselves (a staged copy's I/O completes on
// its ring; a worker holds one buffer at a time), so the wait ends.
func (m *copyMemory) get(n int) *[]byte { return m.take(n, true) }

func (m *copyMemory) take(n int, wait bool) *[]byte {
	class := copyClass(n)
	size := int64(cow.BlockSize) << class
	m.mu.Lock()
	defer m.mu.Unlock()
	for {
		if k := len(m.free[class]); k > 0 {
			b := m.free[class][k-1]
			m.free[class] = m.free[class][:k-1]
			return b
		}
		m.dropFree(size)
		if m.held+size <= CopyBudget {
			m.held += size
			b := dio.AlignedBuf(int(size))
			return &b
		}
		if !wait {
			return nil
		}
		m.freed.Wait()
	}
}

// dropFree lets kept buffers of other classes go until size fits the
// budget, or none is left; it happens only when the sizes of copies
// change. Caller holds mu.
func (m *copyMemory) dropFree(size int64) {
	for c := copyClasses - 1; c >= 0 && m.held+size > CopyBudget; c-- {
		for len(m.free[c]) > 0 && m.held+size > CopyBudget {
			m.free[c] = m.free[c][:len(m.free[c])-1]
			m.held -= int64(cow.BlockSize) << c
		}
	}
}

// put returns a buffer from tryGet or get.
func (m *copyMemory) put(b *[]byte) {
	class := copyClass(len(*b))
	m.mu.Lock()
	m.free[class] = append(m.free[class], b)
	m.mu.Unlock()
	m.freed.Broadcast()
}

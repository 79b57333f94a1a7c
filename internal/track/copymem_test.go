package track

import (
	"sync"
	"testing"
	"time"

	"github.com/dbdublk/dbdublk/cow"
)

// TestCopyMemoryBudget: the queues' tryGet and the workers' get draw from
// one budget: tryGet refuses once it is spent, get waits for a buffer to
// return (and takes its memory for another size), returned buffers serve
// the next copies, and however many copies want memory at once, what is
// held never passes CopyBudget.
func TestCopyMemoryBudget(t *testing.T) {
	m := newCopyMemory()
	const big = maxBulkBlocks * cow.BlockSize
	var held []*[]byte
	for i := 0; i < CopyBudget/big; i++ {
		b := m.tryGet(big)
		if b == nil {
			t.Fatalf("tryGet refused copy %d of %d", i+1, CopyBudget/big)
		}
		held = append(held, b)
	}
	if b := m.tryGet(cow.BlockSize); b != nil {
		t.Fatal("tryGet handed out a block past the budget")
	}
	got := make(chan *[]byte)
	go func() { got <- m.get(3 * cow.BlockSize) }()
	select {
	case <-got:
		t.Fatal("get did not wait for the budget")
	case <-time.After(50 * time.Millisecond):
	}
	m.put(held[0])
	if b := <-got; len(*b) != 4*cow.BlockSize {
		t.Errorf("get(3 blocks) gave %d bytes, want its class, 4 blocks", len(*b))
	} else {
		m.put(b)
	}
	for _, b := range held[1:] {
		m.put(b)
	}
	if b := m.tryGet(big); b != held[1] && b != held[len(held)-1] {
		t.Error("a returned buffer was not kept for the next copy")
	} else {
		m.put(b)
	}

	// Many workers at once: the memory held stays within the budget.
	var wg sync.WaitGroup
	var mu sync.Mutex
	peak := int64(0)
	for w := 0; w < 64; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				b := m.get(big >> (i % 4))
				m.mu.Lock()
				now := m.held
				m.mu.Unlock()
				mu.Lock()
				peak = max(peak, now)
				mu.Unlock()
				time.Sleep(time.Millisecond)
				m.put(b)
			}
		}()
	}
	wg.Wait()
	if peak > CopyBudget || m.held > CopyBudget {
		t.Errorf("workers held up to %d bytes (budget %d), %d at the end", peak, CopyBudget, m.held)
	}
}

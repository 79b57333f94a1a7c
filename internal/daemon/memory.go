package daemon

import (
	"runtime/debug"

	"github.com/dbdublk/dbdublk/internal/track"
)

// goMemoryBase is the Go memory a server needs beside its COW index and
// its copies in flight: queues, control, the tracker's bookkeeping.
const goMemoryBase = 12 << 20

// limitGoMemory sets the Go runtime's soft memory limit to what the
// server's budgets add up to, with indexBudget the index's (-c; 0 when
// not tracking). Without it the collector lets garbage grow as large as
// the live heap before it runs, and the index cache and the copies'
// buffers would count twice in the resident set (README's bound).
func limitGoMemory(indexBudget int64) {
	debug.SetMemoryLimit(goMemoryBase + indexBudget + track.CopyBudget)
}

package cow

import (
	"cmp"
	"slices"
)

// flight is a run of adjacent blocks [first, end) that one range copy has
// in flight; ch closes when the copy finishes. A 1 MiB copy is one flight
// instead of 256 map entries, and there are only as many flights as
// copies running (a queue depth's worth), so scanning them all is cheaper
// than hashing every block.
type flight struct {
	first, end uint64
	ch         chan struct{}
}

// flights is the set of blocks in flight, as disjoint runs in no order.
// All of it is guarded by File.mu.
type flights []flight

// add puts blocks (ascending, none in flight) in flight under ch, one run
// per stretch of adjacent blocks.
func (fl *flights) add(blocks []uint64, ch chan struct{}) {
	for i := 0; i < len(blocks); {
		j := i + 1
		for j < len(blocks) && blocks[j] == blocks[j-1]+1 {
			j++
		}
		*fl = append(*fl, flight{first: blocks[i], end: blocks[j-1] + 1, ch: ch})
		i = j
	}
}

// remove takes out the runs added under ch.
func (fl *flights) remove(ch chan struct{}) {
	*fl = slices.DeleteFunc(*fl, func(x flight) bool { return x.ch == ch })
}

func (fl flights) empty() bool { return len(fl) == 0 }

// meets reports whether any block of [first, end) is in flight.
func (fl flights) meets(first, end uint64) bool {
	for _, x := range fl {
		if x.first < end && first < x.end {
			return true
		}
	}
	return false
}

// overlapping returns the runs that meet [first, end), sorted by first,
// in buf's storage.
func (fl flights) overlapping(first, end uint64, buf []flight) []flight {
	buf = buf[:0]
	for _, x := range fl {
		if x.first < end && first < x.end {
			buf = append(buf, x)
		}
	}
	slices.SortFunc(buf, func(a, b flight) int { return cmp.Compare(a.first, b.first) })
	return buf
}

// flightCursor answers "is block b in flight, and under which copy" for
// ascending b over runs from overlapping, in one pass.
type flightCursor struct {
	runs []flight
}

func (c *flightCursor) at(b uint64) (chan struct{}, bool) {
	for len(c.runs) > 0 && c.runs[0].end <= b {
		c.runs = c.runs[1:]
	}
	if len(c.runs) > 0 && c.runs[0].first <= b {
		return c.runs[0].ch, true
	}
	return nil, false
}

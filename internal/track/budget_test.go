package track

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/cow"
	"github.com/dbdublk/dbdublk/internal/dattobd"
)

// sparseDevice is a Device over a sparse file of size bytes.
func sparseDevice(t *testing.T, size int64) *fileDevice {
	t.Helper()
	path := filepath.Join(t.TempDir(), "dev")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return &fileDevice{fd: fd, size: size}
}

// touchEverySection marks one block in each index section, so the cache
// would hold them all if its limit let it.
func touchEverySection(t *testing.T, c *cow.File) {
	t.Helper()
	for b := uint64(0); b < c.Blocks(); b += cow.SectionEntries {
		if _, err := c.MarkRange(b, b+1); err != nil {
			t.Fatal(err)
		}
	}
}

// TestBudgetIndex: the index cache and the filter in front of the index
// share one budget (-c), so that together they never hold more than it,
// however many sections the device has; reconfigure keeps that true.
func TestBudgetIndex(t *testing.T) {
	const sections = 64
	dev := sparseDevice(t, sections*cow.SectionEntries*cow.BlockSize) // 1 GiB: 64 sections, a 32 KiB filter
	c, err := cow.Create(filepath.Join(t.TempDir(), "inc"), cow.Options{DeviceSize: dev.Size(), IndexOnly: true, CacheBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(false)
	trk := newTracker(t, dev)

	// A budget of 8 sections: the filter (32 KiB and a header) fits a
	// quarter of it, so the cache gets what it leaves: 6 whole sections.
	budget := int64(8 * cow.SectionBytes)
	bits := BudgetIndex(c, budget)
	if bits == nil {
		t.Fatal("no filter, though it fits a quarter of the budget")
	}
	if err := trk.Swap(dattobd.Incremental, c, bits, nil); err != nil {
		t.Fatal(err)
	}
	touchEverySection(t, c)
	if got, want := c.CacheBytes(), int64(6*cow.SectionBytes); got != want {
		t.Errorf("cache holds %d bytes beside a %d-byte filter, want %d", got, bits.Bytes(), want)
	}
	if m := trk.IndexMemory(); m > budget || m != c.CacheBytes()+int64(bits.Bytes()) {
		t.Errorf("index memory %d: want cache %d + filter %d, within the budget %d", m, c.CacheBytes(), bits.Bytes(), budget)
	}

	// reconfigure to 4 sections: the filter stays, the cache shrinks to
	// the 2 whole sections it leaves.
	budget = 4 * cow.SectionBytes
	trk.SetIndexBudget(budget)
	touchEverySection(t, c)
	if got, want := c.CacheBytes(), int64(2*cow.SectionBytes); got != want {
		t.Errorf("after reconfigure the cache holds %d bytes, want %d", got, want)
	}
	if m := trk.IndexMemory(); m > budget {
		t.Errorf("index memory %d after reconfigure, over the budget %d", m, budget)
	}

	// A budget whose quarter the filter does not fit: no filter, and the
	// cache gets all of it.
	if bits := BudgetIndex(c, 3*cow.SectionBytes); bits != nil {
		t.Errorf("a %d-byte filter for a budget of %d", bits.Bytes(), 3*cow.SectionBytes)
	}
	touchEverySection(t, c)
	if got, want := c.CacheBytes(), int64(3*cow.SectionBytes); got != want {
		t.Errorf("cache without a filter holds %d bytes, want %d", got, want)
	}
}

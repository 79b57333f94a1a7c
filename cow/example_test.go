package cow_test

import (
	"bytes"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/dbdublk/dbdublk/cow"
)

// The life of a COW file: a snapshot preserves the old data of the blocks
// written after its instant; the transition to incremental drops that data
// and keeps the list of changed blocks, which a reload picks up again.
func Example() {
	dir, err := os.MkdirTemp("", "cow-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "cow1")
	const deviceSize = 64 << 20 // 16384 blocks of 4 KiB

	// setup-snapshot: a new COW file with a 1 MiB data store.
	f, err := cow.Create(path, cow.Options{DeviceSize: deviceSize, FileSize: cow.DataOffset(cow.Blocks(deviceSize)) + 1<<20})
	if err != nil {
		log.Fatal(err)
	}

	// A write to blocks 10 and 11 is about to land: preserve what they hold
	// now. A later write finds them preserved and copies nothing: first
	// write wins.
	old := bytes.Repeat([]byte("old."), 2*cow.BlockSize/4)
	n, err := f.CopyOnWriteRange(10, old)
	fmt.Println("copied:", n, err)
	n, err = f.CopyOnWriteRange(10, bytes.Repeat([]byte("new."), 2*cow.BlockSize/4))
	fmt.Println("copied again:", n, err)

	// A read of the snapshot finds block 11's old data in the store.
	slot, err := f.Lookup(11)
	if err != nil {
		log.Fatal(err)
	}
	p := make([]byte, cow.BlockSize)
	if err := f.ReadBlock(slot, p); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("block 11 in the snapshot: %s...\n", p[:8])

	// transition-to-incremental: the data store goes, the list stays, and
	// writes from now on are only marked.
	if err := f.TruncateToIndex(); err != nil {
		log.Fatal(err)
	}
	if _, err := f.MarkRange(100, 104); err != nil {
		log.Fatal(err)
	}
	if err := f.Close(true); err != nil { // clean: a valid dattobd COW file
		log.Fatal(err)
	}

	// reload-incremental, after a reboot: the file through its filesystem.
	s, err := cow.FileStorage(path, false)
	if err != nil {
		log.Fatal(err)
	}
	g, rec, err := cow.Open(path, s, cow.ReloadIncremental, deviceSize, 0)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("crashed:", rec.Crashed, "changed blocks:", g.NrChangedBlocks())
	g.ChangedRuns(func(first, count uint64) error {
		fmt.Printf("changed: blocks %d..%d\n", first, first+count-1)
		return nil
	})
	if err := g.Close(true); err != nil {
		log.Fatal(err)
	}
	// Output:
	// copied: 2 <nil>
	// copied again: 0 <nil>
	// block 11 in the snapshot: old.old....
	// crashed: false changed blocks: 6
	// changed: blocks 10..11
	// changed: blocks 100..103
}

// update-img reads the changed-block list of the previous snapshot's COW
// file, read-only, without knowing more than the file tells.
func ExampleOpen_readOnly() {
	dir, err := os.MkdirTemp("", "cow-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "cow1")
	f, err := cow.Create(path, cow.Options{DeviceSize: 64 << 20, IndexOnly: true})
	if err != nil {
		log.Fatal(err)
	}
	f.MarkRange(7, 9)
	f.Close(true)

	s, err := cow.FileStorage(path, true)
	if err != nil {
		log.Fatal(err)
	}
	c, _, err := cow.Open(path, s, cow.ReadOnly, 0, 0)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(false)
	if err := c.SetDeviceSize(64 << 20); err != nil { // the snapshot's size must match
		log.Fatal(err)
	}
	c.ChangedRuns(func(first, count uint64) error {
		fmt.Println("copy blocks", first, "to", first+count-1)
		return nil
	})
	// Output:
	// copy blocks 7 to 8
}

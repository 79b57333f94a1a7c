package ublk_test

import (
	"fmt"
	"log"
	"os"
	"syscall"

	"github.com/dbdublk/dbdublk/ublk"
)

// A spec is checked, and its defaults filled in, without a kernel.
func ExampleDeviceSpec_Validate() {
	spec := ublk.DeviceSpec{ID: 0, Size: 1 << 30, LogicalBlockSize: 512, PhysicalBlockSize: 4096}
	if err := spec.Validate(); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(spec.Queues, "queues of", spec.Depth, "tags, requests up to", spec.MaxIOBytes, "bytes")

	spec.LogicalBlockSize = 1000
	fmt.Println(spec.Validate())
	// Output:
	// 2 queues of 128 tags, requests up to 1048576 bytes
	// logical block size 1000 must be a power of two in 512..4096
}

// imageBackend serves a disk image opened with O_DIRECT.
type imageBackend struct{ f *os.File }

func (b imageBackend) FD() int          { return int(b.f.Fd()) }
func (b imageBackend) CanDiscard() bool { return true }

// Serving a disk image as /dev/ublkb7: create the device, start its queues,
// and stop and delete it when done. (Needs root and the ublk_drv module,
// so this example is compiled but not run.)
func ExampleCreate() {
	f, err := os.OpenFile("/var/lib/images/disk.img", os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		log.Fatal(err)
	}
	st, _ := f.Stat()
	ctrl, err := ublk.OpenControl()
	if err != nil {
		log.Fatal(err) // ublk.ErrNoUblk without the driver
	}
	defer ctrl.Close()
	dev, err := ublk.Create(ctrl, ublk.DeviceSpec{ID: 7, Size: st.Size(), VolatileCache: true}, imageBackend{f}, log.Printf)
	if err != nil {
		log.Fatal(err)
	}
	if err := dev.Start(); err != nil {
		log.Fatal(err)
	}
	fmt.Println("serving", dev.BlockPath())
	// ... until done:
	dev.Stop()
	dev.Delete()
}

// Command fetch-rootimage builds and caches the Debian root image that
// vm.Machine boots, so CI can build it in a step of its own before running
// the tests. It needs root, mmdebstrap, sfdisk (Debian package fdisk) and
// mke2fs.
//
//	go run ./tests/vm/cmd/fetch-rootimage
//
// It prints the path of the cached disk image.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/dbdublk/dbdublk/tests/vm"
)

func main() {
	img, err := vm.EnsureRootImage(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "root image: Debian with kernel %s, root file system UUID %s\n", img.Release, img.FSUUID)
	fmt.Println(img.Disk)
}

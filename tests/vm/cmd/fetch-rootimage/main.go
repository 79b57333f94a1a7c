// Command fetch-rootimage builds and caches the Debian root images that
// vm.Machine boots, one per initramfs builder dbdctl ships a boot hook for
// (initramfs-tools and dracut), so CI can build them in a step of its own
// before running the tests. It needs root, mmdebstrap, sfdisk (Debian
// package fdisk) and mke2fs.
//
//	go run ./tests/vm/cmd/fetch-rootimage [-initramfs initramfs-tools|dracut]
//
// It prints the path of each cached disk image.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/dbdublk/dbdublk/tests/vm"
)

func main() {
	only := flag.String("initramfs", "", "build only the image whose initramfs this tool builds: initramfs-tools or dracut (default both)")
	flag.Parse()
	kinds := []vm.Initramfs{vm.InitramfsTools, vm.Dracut}
	if *only != "" {
		kinds = []vm.Initramfs{vm.Initramfs(*only)}
	}
	for _, k := range kinds {
		img, err := vm.EnsureRootImage(context.Background(), k)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Fprintf(os.Stderr, "root image (%s): Debian with kernel %s, root file system UUID %s\n", k, img.Release, img.FSUUID)
		fmt.Println(img.Disk)
	}
}

// Command fetch-kernel downloads and caches a guest kernel for the VM tests,
// so CI can fetch it in a step of its own before running them.
//
//	go run ./tests/vm/cmd/fetch-kernel [-kernel 6.12]
//
// It prints the path of the cached vmlinuz.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/dbdublk/dbdublk/tests/vm"
)

func main() {
	version := flag.String("kernel", "", "kernel series (default $DBD_KERNEL or "+vm.DefaultKernel+")")
	flag.Parse()
	k, err := vm.EnsureKernel(context.Background(), *version)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "kernel %s (%s), modules in %s\n", k.Version, k.Release, k.ModulesDir)
	fmt.Println(k.Vmlinuz)
}

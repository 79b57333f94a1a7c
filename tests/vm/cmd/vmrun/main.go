// Command vmrun boots the test VM by hand and runs one script in it:
//
//	go run ./tests/vm/cmd/vmrun -script 'uname -a; ls /dev'
//	go run ./tests/vm/cmd/vmrun -disk /tmp/a.img:64M -prog mkfs.ext4 -mod xfs -script-file t.sh
//
// The script's output goes to stdout and vmrun exits with its exit code.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/dbdublk/dbdublk/tests/vm"
)

// listFlag collects a repeatable, comma-separable flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error {
	for _, v := range strings.Split(s, ",") {
		if v != "" {
			*l = append(*l, v)
		}
	}
	return nil
}

func main() {
	var (
		cfg                     vm.Config
		progs, mods, disks, fls listFlag
	)
	script := flag.String("script", "", "shell script to run in the guest")
	scriptFile := flag.String("script-file", "", "file holding the script (instead of -script)")
	showConsole := flag.Bool("console", false, "print the kernel console to stderr afterwards")
	flag.StringVar(&cfg.Kernel, "kernel", "", "kernel series (default $DBD_KERNEL or "+vm.DefaultKernel+")")
	flag.IntVar(&cfg.CPUs, "cpus", 2, "vCPUs")
	flag.IntVar(&cfg.MemoryMiB, "mem", 2048, "guest memory in MiB")
	flag.DurationVar(&cfg.Timeout, "timeout", 10*time.Minute, "limit for the whole run")
	flag.Var(&progs, "prog", "host program to copy in (repeatable, comma-separated)")
	flag.Var(&mods, "mod", "kernel module to ship (repeatable, comma-separated)")
	flag.Var(&disks, "disk", "PATH:SIZE disk image, SIZE like 64M or 1G (repeatable)")
	flag.Var(&fls, "file", "GUEST=HOST file or directory to copy in (repeatable)")
	flag.Parse()

	cfg.Script = *script
	if *scriptFile != "" {
		b, err := os.ReadFile(*scriptFile)
		if err != nil {
			fail(err)
		}
		cfg.Script = string(b)
	}
	cfg.Programs, cfg.Modules = progs, mods
	for _, d := range disks {
		disk, err := parseDisk(d)
		if err != nil {
			fail(err)
		}
		cfg.Disks = append(cfg.Disks, disk)
	}
	cfg.Files = map[string]string{}
	for _, f := range fls {
		g, h, ok := strings.Cut(f, "=")
		if !ok {
			fail(fmt.Errorf("-file %q: want GUEST=HOST", f))
		}
		cfg.Files[g] = h
	}
	cfg.Logf = func(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }

	res, err := vm.Run(context.Background(), cfg)
	if res != nil {
		os.Stdout.WriteString(res.Output)
		if *showConsole {
			fmt.Fprintf(os.Stderr, "---- console ----\n%s", res.Console)
		}
	}
	if err != nil {
		fail(err)
	}
	os.Exit(res.ExitCode)
}

// parseDisk reads PATH:SIZE; SIZE takes K, M, G suffixes (powers of 1024).
func parseDisk(s string) (vm.Disk, error) {
	i := strings.LastIndex(s, ":")
	if i < 0 {
		return vm.Disk{Path: s}, nil
	}
	num, mult := s[i+1:], int64(1)
	if n := len(num); n > 0 {
		switch num[n-1] {
		case 'K', 'k':
			mult = 1 << 10
		case 'M', 'm':
			mult = 1 << 20
		case 'G', 'g':
			mult = 1 << 30
		}
		if mult > 1 {
			num = num[:n-1]
		}
	}
	v, err := strconv.ParseInt(num, 10, 64)
	if err != nil {
		return vm.Disk{}, fmt.Errorf("-disk %q: bad size: %v", s, err)
	}
	return vm.Disk{Path: s[:i], Size: v * mult}, nil
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "vmrun:", err)
	os.Exit(125)
}

// Command snapbench measures what snapshots and incremental tracking cost,
// inside the VM rig, in one boot: the first write to a block in snapshot
// mode, the rewrite of an already-copied block and incremental mode, each
// against passthrough on the same front device and against the raw disk
// (fio on a file in ext4); snapshot device reads against the raw disk;
// update-img against a raw sequential read of the same bytes;
// setup-snapshot latency on a 1 TiB sparse device; and the server's memory
// under sustained random writes. Runs are interleaved round by round and
// reported as medians. With -record it appends the tables to
// bench/RESULTS.md.
package main

import (
	"context"
	_ "embed"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/dbdublk/dbdublk/tests/vm"
)

//go:embed bench.sh
var script string

var (
	rounds  = flag.Int("rounds", 3, "interleaved rounds")
	runtime = flag.Int("runtime", 5, "seconds per timed fio run")
	rssTime = flag.Int("rsstime", 25, "seconds of random writes for each server-memory run")
	fileMB  = flag.Int("filemb", 256, "MiB of the fio file in ext4")
	updMB   = flag.Int("updmb", 128, "MiB changed contiguously before update-img")
	scatMB  = flag.Int("scatmb", 16, "MiB changed in scattered 4 KiB blocks before update-img")
	record  = flag.String("record", "", "append the tables to this markdown file (e.g. bench/RESULTS.md)")
	keep    = flag.String("keep", filepath.Join(os.TempDir(), "snapbench-output.txt"), "where to keep the guest's raw output")
	kernel  = flag.String("kernel", "", "kernel series of the VM rig (default $DBD_KERNEL or "+vm.DefaultKernel+")")
	from    = flag.String("from", "", "render the tables from a kept guest output instead of running (the other flags must match that run)")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "snapbench:", err)
		os.Exit(1)
	}
}

func run() error {
	if *rounds < 1 || *runtime < 1 || *rssTime < 1 || *fileMB < 16 || *updMB < 1 || *scatMB < 1 || *updMB > *fileMB || *scatMB > *fileMB {
		return fmt.Errorf("bad flags: rounds, runtime, rsstime must be positive; filemb >= 16; updmb and scatmb in 1..filemb")
	}
	if *from != "" {
		out, err := os.ReadFile(*from)
		if err != nil {
			return err
		}
		d, err := parse(string(out))
		if err != nil {
			return err
		}
		return report(render(d))
	}
	work, err := os.MkdirTemp("", "snapbench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	dbdctl := filepath.Join(work, "dbdctl")
	if err := vm.GoBuild("build", "-o", dbdctl, "./ctl/dbdctl"); err != nil {
		return err
	}
	sh := filepath.Join(work, "bench.sh")
	if err := os.WriteFile(sh, []byte(script), 0o755); err != nil {
		return err
	}
	// The raw disk, its twin under the front device and the scratch disk
	// for COW files are written through once on the host, so no side reads
	// or writes host-file holes; the 1 TiB disk stays sparse.
	disks := []vm.Disk{
		{Path: filepath.Join(work, "raw.img"), Size: 1 << 30},
		{Path: filepath.Join(work, "front.img"), Size: 1 << 30},
		{Path: filepath.Join(work, "scratch.img"), Size: 8 << 30},
		{Path: filepath.Join(work, "big.img"), Size: 1 << 40},
	}
	fmt.Println("writing the disk images")
	for _, d := range disks[:3] {
		out, err := exec.Command("dd", "if=/dev/zero", "of="+d.Path, "bs=4M", fmt.Sprint("count=", d.Size>>22),
			"oflag=direct", "status=none").CombinedOutput()
		if err != nil {
			return fmt.Errorf("write %s: %v: %s", d.Path, err, out)
		}
	}
	fmt.Printf("booting the VM; %d rounds, %d s per fio run (a default run takes about 11 minutes)\n", *rounds, *runtime)
	t0 := time.Now()
	res, err := vm.Run(context.Background(), vm.Config{
		Kernel:    *kernel,
		MemoryMiB: 3072,
		Disks:     disks,
		Files:     map[string]string{"/usr/local/bin/dbdctl": dbdctl, "/usr/local/bin/bench.sh": sh},
		Programs:  []string{"fio", "mkfs.ext4", "mke2fs", "date"}, // GNU date: busybox's has no %N
		Modules:   []string{"ublk_drv"},
		Script: fmt.Sprintf("ROUNDS=%d RUNTIME=%d RSSTIME=%d FILEMB=%d UPDMB=%d SCATMB=%d /bin/sh /usr/local/bin/bench.sh",
			*rounds, *runtime, *rssTime, *fileMB, *updMB, *scatMB),
		Timeout: 90 * time.Minute,
		Logf:    func(f string, a ...any) { fmt.Printf("[vm] "+f+"\n", a...) },
	})
	if res != nil && *keep != "" {
		os.WriteFile(*keep, []byte(res.Output), 0o644)
	}
	if err != nil {
		return err
	}
	if res.ExitCode != 0 || !strings.Contains(res.Output, "@@DONE") {
		return fmt.Errorf("bench script failed (status %d); guest output kept in %s; tail:\n%s", res.ExitCode, *keep, tail(res.Output, 4000))
	}
	fmt.Printf("guest ran %v\n", time.Since(t0).Round(time.Second))
	d, err := parse(res.Output)
	if err != nil {
		return fmt.Errorf("%w (guest output kept in %s)", err, *keep)
	}
	return report(render(d))
}

// report prints the tables and, with -record, appends them with the date.
func report(table string) error {
	fmt.Print(table)
	if *record != "" {
		f, err := os.OpenFile(*record, os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := fmt.Fprintf(f, "\n## %s — snapshots, incremental tracking, update-img, kernel %s\n\n%s",
			time.Now().UTC().Format("2006-01-02"), vm.KernelSeries(*kernel), table); err != nil {
			return err
		}
	}
	return nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

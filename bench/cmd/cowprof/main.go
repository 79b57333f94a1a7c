// Command cowprof profiles the server during first writes in snapshot mode
// (the slowest path of issue 3): it boots the VM, runs fio on the front
// device with a snapshot open, and prints the server's CPU profile.
//
//	go run ./bench/cmd/cowprof [4k] [pass|inc|snapread] [upd|scatter] [fs] [xfs] [perf]
//
// 4k: random 4 KiB writes at QD32 (default: sequential 1 MiB at QD8);
// pass: no snapshot, the passthrough baseline of the same job;
// inc: the same writes in incremental mode;
// snapread: the job reads the snapshot device instead (nothing copied);
// upd, scatter: update-img after 128 MiB changed in one run, or 16 MiB in
// scattered 4 KiB blocks ($UPDMB: another size, up to 896), beside raw
// reads and writes of as many bytes and both at once ($UPDARGS: extra
// update-img flags, e.g. "--workers 32");
// fs: the job writes a file in ext4 on the front device (as snapbench
// does) instead of the device itself;
// xfs: the COW file in xfs (which takes buffered writes from io_uring
// without blocking) instead of ext4 (whose buffered writes io_uring hands
// to its io-wq workers);
// perf: also profile the whole guest, kernel included, with the host's
// perf (the Go profile sees only the server's own threads, not the
// kernel's io-wq workers that run its buffered writes).
package main

import (
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/dbdublk/dbdublk/tests/vm"
)

// updScript profiles update-img instead: UPDMB MiB changed (SCAT=1: in
// scattered 4 KiB blocks) between two snapshots, then update-img into an
// allocated image, beside a raw O_DIRECT read of as many bytes and a raw
// O_DIRECT write of them to the image's disk.
const updScript = `
set -e
modprobe ublk_drv
mkdir -p /scratch && mkfs.ext4 -q -F /dev/vdb && mount /dev/vdb /scratch
dd if=/dev/zero of=/scratch/image.raw bs=1M count=1024 conv=fsync 2>/dev/null
DBDCTL_CPUPROFILE=/scratch/cpu.prof dbdctl attach /dev/vda 1 >/dev/null
dbdctl setup-snapshot /dev/vda /scratch/cow0 1 >/dev/null
dbdctl transition-to-incremental 1 >/dev/null
if [ "$SCAT" = 1 ]; then
	fio --name=change --filename=/dev/ublkb1 --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k --iodepth=32 --size=900M --io_size=${UPDMB}M >/dev/null
else
	fio --name=change --filename=/dev/ublkb1 --direct=1 --ioengine=io_uring --rw=write --bs=1M --iodepth=8 --offset=64M --io_size=${UPDMB}M --size=${UPDMB}M >/dev/null
fi
dbdctl transition-to-snapshot /scratch/cow1 1 >/dev/null
dbdctl update-img $UPDARGS /dev/datto1 /scratch/cow0 /scratch/image.raw 2>&1 | tail -1
fio --name=bothread --filename=/dev/vda --direct=1 --ioengine=io_uring --rw=read --bs=1M --iodepth=8 --offset=64M --size=${UPDMB}M --name=bothwrite --filename=/scratch/write.raw --direct=1 --ioengine=io_uring --rw=write --bs=1M --iodepth=8 --size=${UPDMB}M --output-format=terse --terse-version=3 | awk -F';' '{print "both: read KB/s", $7, "write KB/s", $48}'
fio --name=rawread --filename=/dev/vda --readonly --direct=1 --ioengine=io_uring --rw=read --bs=1M --iodepth=8 --size=${UPDMB}M --output-format=terse --terse-version=3 | awk -F';' '{print "raw read KB/s", $7}'
fio --name=rawwrite --filename=/scratch/image.raw --direct=1 --ioengine=io_uring --rw=write --bs=1M --iodepth=8 --size=${UPDMB}M --end_fsync=1 --output-format=terse --terse-version=3 | awk -F';' '{print "raw image write KB/s", $48}'
dbdctl destroy 1 >/dev/null
dbdctl detach 1 >/dev/null
sleep 1
echo @@PROF
base64 /scratch/cpu.prof
echo @@END
`

const script = `
set -e
modprobe ublk_drv
mkdir -p /scratch
if [ "$COWFS" = xfs ]; then
	modprobe xfs && mkfs.xfs -q -f /dev/vdb && mount /dev/vdb /scratch
else
	mkfs.ext4 -q -F /dev/vdb && mount /dev/vdb /scratch
fi
DBDCTL_CPUPROFILE=/scratch/cpu.prof dbdctl attach /dev/vda 1 >/dev/null
target=/dev/ublkb1
if [ "$ONFS" = 1 ]; then # a file in ext4 on the front device, written once before
	mkfs.ext4 -q -F /dev/ublkb1 && mkdir -p /mnt/front && mount /dev/ublkb1 /mnt/front
	target=/mnt/front/bench.dat
	fio --name=prep --filename=$target --size=900M --rw=write --bs=1M --direct=1 --ioengine=io_uring --iodepth=8 >/dev/null
fi
# -f 1000: every first write of the 900 MiB job fits (the default store, a
# tenth of the device, fills within seconds and fails the snapshot, after
# which the writes run at passthrough's speed).
[ "$PASS" = 1 ] || dbdctl setup-snapshot -f 1000 /dev/vda /scratch/cow 1 >/dev/null
[ "$INC" = 1 ] && dbdctl transition-to-incremental 1 >/dev/null
if [ "$SNAPREAD" = 1 ]; then # reads of the snapshot device, nothing copied
	$PERFREC fio --name=snapread --filename=/dev/datto1 --readonly --direct=1 --ioengine=io_uring --rw=read --bs=$BS --iodepth=$QD --size=900M --runtime=8 --output-format=terse --terse-version=3 | awk -F';' '{print "read KB/s", $7, "IOPS", $8}'
else
	$PERFREC fio --name=first --filename=$target --direct=1 --ioengine=io_uring --rw=$RW --bs=$BS --iodepth=$QD --size=900M --runtime=8 --output-format=terse --terse-version=3 | awk -F';' '{print "write KB/s", $48, "IOPS", $49}'
fi
[ "$PASS" = 1 ] || dbdctl info 1 | grep -o '"cow_writes_merged": *[0-9]*\|"error": *-*[0-9]*' || true
if [ -n "$PERFREC" ]; then
	echo "kernel and user profile of the whole guest during the fio run (perf, cpu-clock):"
	rep() { perf report -i /scratch/perf.data --stdio "$@" 2>/dev/null | grep -v '^#' | grep -v '^$'; }
	echo "by thread (iou-wrk-*: io_uring's io-wq workers; swapper: idle):"
	rep --sort comm | head -15
	echo "the server's threads, by symbol:"
	rep --comms dbdctl --sort sym | head -30
	echo "io-wq workers, by symbol:"
	wrk=$(rep --sort comm | awk '$2 ~ /^iou-wrk/ {l = l (l ? "," : "") $2} END {print l}')
	[ -z "$wrk" ] || rep --comms "$wrk" --sort sym | head -20
fi
[ "$ONFS" = 1 ] && umount /mnt/front
[ "$PASS" = 1 ] || dbdctl destroy 1 >/dev/null
dbdctl detach 1 >/dev/null
sleep 1
echo @@PROF
base64 /scratch/cpu.prof
echo @@END
`

func main() {
	rw, bs, qd, pass := "write", "1M", "8", 0
	upd, scat, perf, cowfs, onfs, inc, snapread := false, 0, "", "ext4", 0, 0, 0
	for _, a := range os.Args[1:] {
		switch a {
		case "4k":
			rw, bs, qd = "randwrite", "4k", "32"
		case "pass": // no snapshot: the passthrough baseline
			pass = 1
		case "inc": // incremental mode: the change list only
			inc = 1
		case "snapread": // reads of the snapshot device instead of writes
			snapread = 1
		case "upd": // update-img after 128 MiB changed in one run
			upd = true
		case "scatter": // update-img after 16 MiB changed in 4 KiB blocks
			upd, scat = true, 1
		case "fs": // on a file in ext4 on the front device, as snapbench writes
			onfs = 1
		case "xfs": // the COW file in xfs instead of ext4
			cowfs = "xfs"
		case "perf": // the whole guest's profile too, kernel included
			perf = "perf record -a -q -o /scratch/perf.data --"
		}
	}
	run := fmt.Sprintf("RW=%s BS=%s QD=%s PASS=%d INC=%d SNAPREAD=%d PERFREC='%s' COWFS=%s ONFS=%d\n%s", rw, bs, qd, pass, inc, snapread, perf, cowfs, onfs, script)
	if upd {
		mb := 128
		if scat == 1 {
			mb = 16
		}
		if v, err := strconv.Atoi(os.Getenv("UPDMB")); err == nil && v > 0 && v <= 896 {
			mb = v
		}
		run = fmt.Sprintf("UPDMB=%d SCAT=%d UPDARGS='%s'\n%s", mb, scat, os.Getenv("UPDARGS"), updScript)
	}
	// Optional tools only when asked for: `just setup bench` installs fio
	// alone; xfs wants xfsprogs and perf linux-perf on the host.
	programs := []string{"fio", "mkfs.ext4", "mke2fs", "base64"}
	if cowfs == "xfs" {
		programs = append(programs, "mkfs.xfs")
	}
	if perf != "" {
		programs = append(programs, "perf")
	}
	work, _ := os.MkdirTemp("", "cowprof-")
	defer os.RemoveAll(work)
	dbdctl := filepath.Join(work, "dbdctl")
	if err := vm.GoBuild("build", "-o", dbdctl, "./ctl/dbdctl"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	res, err := vm.Run(context.Background(), vm.Config{
		Disks: []vm.Disk{
			{Path: filepath.Join(work, "front.img"), Size: 1 << 30},
			{Path: filepath.Join(work, "scratch.img"), Size: 2 << 30},
		},
		Files:    map[string]string{"/usr/local/bin/dbdctl": dbdctl},
		Programs: programs,
		Modules:  []string{"ublk_drv", "ext4", "xfs"},
		Script:   run,
		Timeout:  10 * time.Minute,
	})
	if err != nil || res.ExitCode != 0 {
		fmt.Fprintln(os.Stderr, err)
		if res != nil {
			fmt.Fprintln(os.Stderr, res.Output)
		}
		os.Exit(1)
	}
	out := res.Output
	i, j := strings.Index(out, "@@PROF\n"), strings.Index(out, "@@END")
	fmt.Print(out[:i])
	prof, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(out[i+7:j]), ""))
	if err != nil {
		fmt.Fprintln(os.Stderr, "decode profile:", err)
		os.Exit(1)
	}
	p := filepath.Join(os.TempDir(), "cowprof.pprof")
	os.WriteFile(p, prof, 0o644)
	cmd := exec.Command("go", "tool", "pprof", "-top", "-nodecount=40", dbdctl, p)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.Run()
}

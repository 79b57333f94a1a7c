package guest

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/internal/dio"
)

// TestNoUblkDriver: attach loads ublk_drv itself where it is not loaded,
// and on a kernel that has no ublk driver names the way out and changes
// nothing.
func TestNoUblkDriver(t *testing.T) {
	unload := func() {
		if _, err := os.Stat("/dev/ublk-control"); err == nil {
			must(t, "rmmod", "ublk_drv") // nothing is attached yet
		}
	}
	// Not loaded: attach loads it, as modprobe would.
	unload()
	dumpLogOnFailure(t, 0)
	must(t, dbdctl, "attach", diskExt4, "0") // not attach(): it loads the driver first
	if _, err := os.Stat("/dev/ublk-control"); err != nil {
		t.Fatalf("attach succeeded without loading ublk_drv: %v", err)
	}
	detach(t, 0)

	// A kernel that does not have it (its modules hidden, as on Debian 12's
	// 6.1): one line naming the kernel and the way out, nothing left.
	unload()
	release := strings.TrimSpace(must(t, "uname", "-r"))
	mods := "/lib/modules/" + release
	must(t, "mount", "-t", "tmpfs", "none", mods)
	r := run(t, dbdctl, "attach", diskExt4, "0")
	must(t, "umount", mods)
	if r.code == 0 {
		t.Fatalf("attach on a kernel without ublk_drv succeeded: %s", r.stdout)
	}
	checkOneLineError(t, r, "has no ublk driver")
	for _, want := range []string{release, "6.4", "backports"} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("message does not name %q: %q", want, r.stderr)
		}
	}
	if _, err := os.Stat("/run/dbdctl/0.sock"); err == nil {
		t.Errorf("a failed attach left a control socket behind")
	}
	ensureUblk(t)
}

// TestDataPath checks the front device runs zero copy exactly where the
// kernel offers AUTO_BUF_REG and SUPPORT_ZERO_COPY (7.3, not 6.12), that
// info says so, and that attach --copy asks for copy mode anyway. The
// other tests then exercise whichever path the kernel gave.
func TestDataPath(t *testing.T) {
	attach(t, diskFio, 3)
	dev := info(t, "3").Devices[0]
	var kernel uint64
	fmt.Sscanf(dev.KernelFeat, "0x%x", &kernel)
	want := "copy"
	if kernel&(1<<11) != 0 && kernel&1 != 0 {
		want = "zero-copy"
	}
	if dev.DataPath != want {
		t.Errorf("kernel features %s: data path %q, want %q", dev.KernelFeat, dev.DataPath, want)
	}
	t.Logf("@@DATAPATH kernel ublk features %s: front device served %s", dev.KernelFeat, dev.DataPath)
	detach(t, 3)
	ensureUblk(t)
	out := must(t, dbdctl, "attach", "--copy", diskFio, "3")
	if !strings.Contains(out, "/dev/ublkb3") {
		t.Fatalf("attach --copy: %q", out)
	}
	if got := info(t, "3").Devices[0].DataPath; got != "copy" {
		t.Errorf("attach --copy: data path %q", got)
	}
	detach(t, 3)
}

// TestExt4OnFrontDevice runs a filesystem's whole life through the front
// device, then checks that detach left every byte on the real device.
func TestExt4OnFrontDevice(t *testing.T) {
	front := attach(t, diskExt4, 0)
	if got, want := sizeOf(t, front), sizeOf(t, diskExt4); got != want {
		t.Fatalf("%s is %d bytes, real device %d", front, got, want)
	}
	must(t, "mkfs.ext4", "-q", "-F", front)
	must(t, "mount", "-t", "ext4", front, "/mnt")
	sh(t, `
		dd if=/dev/urandom of=/tmp/big bs=1M count=24 2>/dev/null
		cp /tmp/big /mnt/big
		mkdir /mnt/many
		i=0; while [ $i -lt 200 ]; do echo "file $i $(date +%N)" > /mnt/many/f$i; i=$((i+1)); done
		sync
		(cd /mnt && sha256sum big many/* > /tmp/sums)
	`)
	must(t, "umount", "/mnt")
	must(t, "e2fsck", "-fn", front)
	// Remount through the front device and verify contents.
	must(t, "mount", "-t", "ext4", front, "/mnt")
	sh(t, `cd /mnt && sha256sum -c /tmp/sums >/dev/null`)
	// Leave dirty data in the page cache: umount + detach must flush it.
	sh(t, `dd if=/dev/urandom of=/mnt/late bs=1M count=4 2>/dev/null; sha256sum /mnt/late | sed 's#/mnt/##' > /tmp/late.sum`)
	must(t, "umount", "/mnt")

	doc := info(t, "0")
	if len(doc.Devices) != 1 || doc.Devices[0].IO.Writes == 0 || doc.Devices[0].IO.Reads == 0 {
		t.Errorf("info shows no I/O served: %+v", doc.Devices)
	}
	detach(t, 0)

	// The real device, used directly, holds the same filesystem.
	must(t, "e2fsck", "-fn", diskExt4)
	must(t, "mount", "-t", "ext4", "-o", "ro", diskExt4, "/mnt")
	defer run(t, "umount", "/mnt")
	sh(t, `cd /mnt && sha256sum -c /tmp/sums >/dev/null && sha256sum -c /tmp/late.sum >/dev/null`)
}

// TestRealDeviceExclusive: while attached, the real device cannot be
// mounted or formatted behind the server's back.
func TestRealDeviceExclusive(t *testing.T) {
	attach(t, diskExt4, 0)
	if r := run(t, "mount", "-t", "ext4", diskExt4, "/mnt"); r.code == 0 {
		run(t, "umount", "/mnt")
		t.Fatalf("mounting the real device while attached succeeded")
	}
	fd, err := syscall.Open(diskExt4, syscall.O_RDONLY|syscall.O_EXCL, 0)
	if err == nil {
		syscall.Close(fd)
		t.Fatalf("exclusive open of the real device succeeded while attached")
	}
	if err != syscall.EBUSY {
		t.Fatalf("exclusive open: %v, want EBUSY", err)
	}
	if r := run(t, "mkfs.ext4", "-q", diskExt4); r.code == 0 {
		t.Fatalf("mkfs on the real device while attached succeeded")
	}
	// The front device still holds the filesystem of the previous test.
	detach(t, 0)
	must(t, "e2fsck", "-fn", diskExt4)
}

// fioJob is a verifying workload over four disjoint regions of a device.
func fioJob(engine, dev string, verifyOnly bool) []string {
	args := []string{
		"--name=verify-" + engine, "--filename=" + dev, "--ioengine=" + engine,
		"--direct=1", "--rw=randwrite", "--bssplit=4k/40:16k/20:64k/20:512/10:256k/10",
		"--blockalign=4k", "--size=96M", "--offset_increment=112M", "--numjobs=4", "--iodepth=16",
		"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randseed=" + map[string]string{"io_uring": "11", "psync": "22"}[engine],
		"--group_reporting", "--minimal",
	}
	if engine == "psync" {
		args = append(args, "--iodepth=1")
	}
	if verifyOnly {
		args = append(args, "--verify_only=1")
	}
	return args
}

// TestFioVerify writes verified data through the front device with two I/O
// engines and mixed block sizes, then, after detach, verifies the same data
// on the real device.
func TestFioVerify(t *testing.T) {
	for _, engine := range []string{"io_uring", "psync"} {
		t.Run(engine, func(t *testing.T) {
			front := attach(t, diskFio, 1)
			must(t, "fio", fioJob(engine, front, false)...)
			detach(t, 1)
			must(t, "fio", fioJob(engine, diskFio, true)...)
		})
	}
}

// TestDiscardAndWriteZeroes: zeroing through the front device reaches the
// real device.
func TestDiscardAndWriteZeroes(t *testing.T) {
	front := attach(t, diskFio, 1)
	sh(t, fmt.Sprintf(`
		dd if=/dev/urandom of=%[1]s bs=1M count=8 oflag=direct 2>/dev/null
		/usr/sbin/blkdiscard -z -o 1048576 -l 4194304 %[1]s
	`, front))
	detach(t, 1)
	sh(t, fmt.Sprintf(`
		test "$(dd if=%[1]s bs=1M skip=1 count=4 2>/dev/null | sha256sum)" = "$(dd if=/dev/zero bs=1M count=4 2>/dev/null | sha256sum)"
		test "$(dd if=%[1]s bs=1M count=1 2>/dev/null | sha256sum)" != "$(dd if=/dev/zero bs=1M count=1 2>/dev/null | sha256sum)"
	`, diskFio))
}

// TestInfo checks the JSON document's shape and the server's lifetime.
func TestInfo(t *testing.T) {
	front := attach(t, diskFio, 3)
	doc := info(t)
	if doc.Version == "" {
		t.Errorf("info has no version")
	}
	var dev *infoDevice
	for i := range doc.Devices {
		if doc.Devices[i].Minor == 3 {
			dev = &doc.Devices[i]
		}
	}
	if dev == nil {
		t.Fatalf("minor 3 missing from info: %+v", doc)
	}
	if dev.BlockDevice != diskFio || dev.FrontDevice != front || dev.State == nil || dev.Error == nil || *dev.Error != 0 {
		t.Errorf("unexpected device entry: %+v", dev)
	}
	if dev.Queues < 1 || dev.QueueDepth < 64 {
		t.Errorf("queues %d depth %d: want >=1 queue of depth >= 64", dev.Queues, dev.QueueDepth)
	}
	// GET_FEATURES is matched by its exact ioctl value; 6.12 answers 0x1fe.
	// Device flags always carry CMD_IOCTL_ENCODE (bit 6) once negotiated.
	if dev.KernelFeat == "" || dev.KernelFeat == "0x0" {
		t.Errorf("GET_FEATURES gave nothing: %q", dev.KernelFeat)
	}
	if !strings.HasPrefix(dev.DevFeatures, "0x") {
		t.Errorf("device flags missing: %q", dev.DevFeatures)
	}
	if !alive(dev.ServerPID) {
		t.Errorf("server pid %d not alive after the CLI exited", dev.ServerPID)
	}
	if _, err := os.Stat("/var/log/dbdctl/ublk3.log"); err != nil {
		t.Errorf("server log missing: %v", err)
	}
	checkShape(t, *dev)
	// Large requests at a depth beyond the queue's, so every tag of a
	// queue carries 1 MiB requests (split to the device's largest); then
	// the whole process must hold under 64 MiB.
	must(t, "fio", "--name=every-tag", "--filename="+front, "--rw=randrw", "--bs=1M", "--iodepth=256",
		"--ioengine=io_uring", "--direct=1", "--size=256M", "--io_size=512M", "--norandommap")
	checkServerMemory(t, dev.ServerPID, dev.DataPath, dev.QueueDepth*dev.MaxIOBytes)
	one := info(t, "3")
	if len(one.Devices) != 1 || one.Devices[0].Minor != 3 {
		t.Errorf("info 3 = %+v", one)
	}
	detach(t, 3)
	// The server answers detach before it exits; detach returns once it
	// and its supervisor have, so the minor can be attached right away.
	if alive(dev.ServerPID) {
		stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", dev.ServerPID))
		t.Errorf("server pid %d still alive after detach returned: %s", dev.ServerPID, stat)
	}
	if after := info(t); len(after.Devices) != 0 {
		t.Errorf("devices left after detach: %+v", after.Devices)
	}
	attach(t, diskFio, 3)
	detach(t, 3)
}

// serverMemoryBound is the resident memory a device's server may hold at
// default settings (README's bound).
const serverMemoryBound = 64 << 20

// checkServerRSS checks a server's VmRSS against bound, logs it for the
// report (when: what it ran), and returns its status file.
func checkServerRSS(t *testing.T, pid int, bound int, when string) string {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	kB := map[string]int{}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && strings.HasPrefix(f[0], "Rss") || len(f) >= 2 && f[0] == "VmRSS:" {
			kB[strings.TrimSuffix(f[0], ":")], _ = strconv.Atoi(f[1])
		}
	}
	rssKB := kB["VmRSS"]
	t.Logf("@@MEMORY server VmRSS %d kB (anonymous %d, file %d), %s", rssKB, kB["RssAnon"], kB["RssFile"], when)
	if rssKB == 0 || rssKB*1024 >= bound {
		t.Errorf("%s: server VmRSS %d kB, want under %d MiB", when, rssKB, bound>>20)
	}
	return string(status)
}

// diskBig is a sparse disk whose COW index (128 MiB) is four times the
// memory bound.
const diskBig = "/dev/vdk" // 64 GiB

// defaultIndexBudget is -c when none is given (cow.DefaultCacheBytes).
const defaultIndexBudget = 24 << 20

// TestServerMemoryWhileTracking: the bound holds in snapshot mode at
// default settings however large the index is and however many first
// writes are copied at once. 4 KiB first writes scattered over a 64 GiB
// device touch some 2600 of its 4096 index sections (81 MiB of them;
// dattobd's default budget, 300 MiB, would keep them all), then 1 MiB
// first writes 64 deep want 64 MiB of old blocks in flight; the index
// stays within the default budget, the copies within theirs, and the
// server under the bound (in copy mode, plus its request buffers).
func TestServerMemoryWhileTracking(t *testing.T) {
	front, m, dir := tracked(t, diskBig, 12, "memory")
	must(t, dbdctl, "setup-snapshot", "-f", "512", diskBig, dir+"/cow", m)
	must(t, "fio", "--name=scatter", "--filename="+front, "--rw=randwrite", "--bs=4k", "--iodepth=32",
		"--ioengine=io_uring", "--direct=1", "--io_size=16M", "--norandommap", "--randrepeat=0")
	d := info(t, m).Devices[0]
	if d.MaxCache != defaultIndexBudget {
		t.Errorf("max_cache %d at default settings, want %d", d.MaxCache, defaultIndexBudget)
	}
	// Full to within one section: the writes reached far more sections
	// than the budget holds, so the budget is what bounds the index.
	if d.CacheInUse > d.MaxCache || d.CacheInUse < d.MaxCache-2*32<<10 {
		t.Errorf("index holds %d bytes after scattered first writes, want the budget %d (less at most a section)", d.CacheInUse, d.MaxCache)
	}
	if d.NrChanged < 4000 {
		t.Errorf("%d blocks copied, want the 4096 scattered first writes (few repeats)", d.NrChanged)
	}
	bound := serverMemoryBound
	if d.DataPath == "copy" {
		bound += d.Queues * d.QueueDepth * d.MaxIOBytes
	}
	checkServerRSS(t, d.ServerPID, bound, fmt.Sprintf("%s: snapshot mode, default -c, after 4096 scattered 4 KiB first writes over %d GiB", d.DataPath, sizeOf(t, diskBig)>>30))
	must(t, "fio", "--name=deep", "--filename="+front, "--rw=randwrite", "--bs=1M", "--iodepth=64",
		"--ioengine=io_uring", "--direct=1", "--io_size=256M", "--norandommap", "--randrepeat=0")
	if d := info(t, m).Devices[0]; d.Error != nil && *d.Error != 0 {
		t.Fatalf("snapshot failed: error %d", *d.Error)
	}
	checkServerRSS(t, d.ServerPID, bound, d.DataPath+": then 256 1 MiB first writes 64 deep")
}

// checkShape checks the queue shape a device got without --depth or
// --max-io: ublk's defaults with zero copy, the smaller copy-mode ones
// that bound the server's buffers otherwise.
func checkShape(t *testing.T, dev infoDevice) {
	t.Helper()
	want := map[string][2]int{"zero-copy": {128, 1 << 20}, "copy": {64, 256 << 10}}[dev.DataPath]
	if dev.QueueDepth != want[0] || dev.MaxIOBytes != want[1] {
		t.Errorf("%s: queue depth %d, largest request %d bytes; want %d and %d",
			dev.DataPath, dev.QueueDepth, dev.MaxIOBytes, want[0], want[1])
	}
}

// checkServerMemory checks a server's resident memory against the bound,
// and what keeps it small: transparent huge pages are off for the whole
// process, and in copy mode each queue's buffers (queueBytes: depth x
// largest request) are mapped with MADV_NOHUGEPAGE (VmFlags "nh"); zero
// copy has no such buffers at all.
func checkServerMemory(t *testing.T, pid int, dataPath string, queueBytes int) {
	t.Helper()
	status := checkServerRSS(t, pid, serverMemoryBound, dataPath+": after 1 MiB requests through every tag")
	if !strings.Contains(status, "THP_enabled:\t0") {
		t.Errorf("server %d runs with transparent huge pages:\n%s", pid, status)
	}
	smaps, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	// Queue buffers: anonymous read-write mappings marked nh of at least a
	// queue's buffers (two queues' may be one mapping). The process runs
	// without transparent huge pages anyway (above); the mark keeps the
	// buffers small where a kernel or administrator forces them. Nothing
	// like them exists with zero copy.
	var buffers int
	var perms, size string
	anon := false
	for _, line := range strings.Split(string(smaps), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 5 && strings.Contains(f[0], "-") && len(f[1]) == 4:
			perms, anon = f[1], len(f) == 5 // no path: anonymous
		case len(f) == 3 && f[0] == "Size:":
			size = f[1]
		case len(f) > 0 && f[0] == "VmFlags:":
			kb, _ := strconv.Atoi(size)
			if perms == "rw-p" && anon && kb*1024 >= queueBytes && strings.Contains(line, " nh") {
				buffers++
			}
		}
	}
	switch dataPath {
	case "copy":
		if buffers == 0 {
			t.Errorf("copy mode: no queue buffer mapping (%d kB or more) marked nh", queueBytes/1024)
		}
	case "zero-copy":
		if buffers > 0 {
			t.Errorf("zero copy: %d mappings of %d kB or more marked nh, like queue buffers", buffers, queueBytes/1024)
		}
	default:
		t.Errorf("data path %q", dataPath)
	}
}

// TestUnalignedDirectIO: O_DIRECT from a buffer the real device's DMA
// alignment refuses is refused by the front device the same way, up
// front, or served; it never fails on the way with an I/O error in the
// kernel log. With zero copy the request's own pages go to the real
// device's O_DIRECT I/O, so the front device must ask the real device's
// alignment of them (ublk's own is 4 bytes).
func TestUnalignedDirectIO(t *testing.T) {
	const minor = 12
	front := attach(t, diskFio, minor)
	defer detach(t, minor)
	fd, err := unix.Open(front, unix.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)

	data := unalignedBuf()
	for i := range data {
		data[i] = byte(i*7 + 1)
	}
	back := unalignedBuf()
	before := kernelErrors(t, minor)
	const off = 40 * 4096
	_, werr := unix.Pwrite(fd, data, off)
	_, rerr := unix.Pread(fd, back, off)
	t.Logf("unaligned O_DIRECT on %s: write %v, read %v", front, werr, rerr)
	for _, e := range []error{werr, rerr} {
		if e != nil && e != unix.EINVAL {
			t.Errorf("unaligned O_DIRECT failed with %v; want success, or EINVAL up front as the real device gives", e)
		}
	}
	if werr == nil && rerr == nil && !bytes.Equal(back, data) {
		t.Errorf("unaligned O_DIRECT write then read: the data read back differs")
	}
	if n := kernelErrors(t, minor) - before; n != 0 {
		t.Errorf("the kernel logged %d request errors on the front device for unaligned O_DIRECT", n)
	}
}

// unalignedBuf is 512 bytes that start 4-byte aligned but not 512-byte
// aligned, 252 bytes before a page's end: two segments, as a C program's
// malloc'd buffer can be.
func unalignedBuf() []byte {
	mem := dio.AlignedBuf(2 * dio.Align)
	at := dio.Align - 252
	return mem[at : at+512]
}

// kernelErrors counts the kernel's request errors on /dev/ublkb<minor>
// ("I/O error, dev ...", "invalid error, dev ...").
func kernelErrors(t *testing.T, minor int) int {
	t.Helper()
	out := sh(t, fmt.Sprintf(`dmesg | grep -c 'error, dev ublkb%d,' || true`, minor))
	n, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("count kernel errors: %q", out)
	}
	return n
}

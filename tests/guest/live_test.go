package guest

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// diskLVM is the physical volume of the live-insertion tests.
const diskLVM = "/dev/vdj" // 1 GiB

// lvmConf runs LVM without udev, lvmetad, dmeventd or a devices file, as
// the guest has none of them; LVM makes its own device nodes.
const lvmConf = `devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
global { use_lvmpolld = 0 event_activation = 0 thin_check_executable = "" }
backup { backup = 0 archive = 0 }
`

// lvm runs an LVM command that has to succeed.
func lvm(t *testing.T, args ...string) string {
	t.Helper()
	return must(t, "lvm", args...)
}

// volumeGroup makes the volume group dbdvg on diskLVM, once per test.
func volumeGroup(t *testing.T) {
	t.Helper()
	must(t, "mkdir", "-p", "/etc/lvm", "/run/lvm", "/run/lock/lvm")
	if err := os.WriteFile("/etc/lvm/lvm.conf", []byte(lvmConf), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, "lvm", "vgremove", "-f", "dbdvg")
	lvm(t, "pvcreate", "-q", "-y", "-ff", diskLVM)
	lvm(t, "vgcreate", "-q", "dbdvg", diskLVM)
	t.Cleanup(func() { run(t, "lvm", "vgremove", "-f", "dbdvg") })
}

// logicalVolume creates dbdvg/name of size (lvcreate -L) with a new
// filesystem of kind k mounted at dir, and returns its device path.
func logicalVolume(t *testing.T, name, size string, k fsKind, dir string) string {
	t.Helper()
	lvm(t, "lvcreate", "-q", "-y", "-L", size, "-n", name, "dbdvg")
	dev := "/dev/mapper/dbdvg-" + name
	junk(t, dev)
	args := []string{k.mkfsForce, dev}
	if k.name == "ext4" {
		// 4 KiB blocks, as on any real volume (mke2fs picks 1 KiB for a
		// small one): a COW file on the volume needs them.
		args = append([]string{"-b", "4096"}, args...)
	}
	must(t, k.mkfs, args...)
	must(t, "mkdir", "-p", dir)
	must(t, "mount", "-t", k.name, dev, dir)
	t.Cleanup(func() {
		exec.Command("umount", dir).Run()
		run(t, "lvm", "lvremove", "-f", "dbdvg/"+name)
	})
	return dev
}

// busyFio runs fio verify on a file in dir until stopped; stop reports
// whether fio saw any error or bad data.
func busyFio(t *testing.T, dir string) (stop func() error) {
	t.Helper()
	cmd := fioVerify("live", dir+"/load", "16M")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	stopped := false
	stop = func() error {
		if stopped {
			return nil
		}
		stopped = true
		cmd.Process.Signal(os.Interrupt)
		err := <-done
		switch {
		case strings.Contains(out.String(), "verify:") && strings.Contains(out.String(), "bad"):
			return fmt.Errorf("fio verify found bad data:\n%s", out.String())
		case err != nil && !strings.Contains(out.String(), "err= 0"):
			return fmt.Errorf("fio failed (%v):\n%s", err, out.String())
		}
		return nil
	}
	t.Cleanup(func() { stop() })
	return stop
}

// table is dmsetup's view of a device-mapper device's live table.
func table(t *testing.T, name string) string {
	t.Helper()
	return strings.TrimSpace(must(t, "dmsetup", "table", name))
}

// onFront reports whether the table maps exactly the front device.
func onFront(t *testing.T, tbl, front string) bool {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(front, &st); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("linear %d:%d 0", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	return strings.Count(tbl, "\n") == 0 && strings.HasSuffix(tbl, want)
}

// TestLiveLVM is issue 10's live insertion, with real LVM: an ext4 and an
// XFS logical volume, mounted and busy (fio verify), are attached without
// unmounting; the whole backup loop runs with the COW file on the volume
// itself (a server kill in the middle), then detach takes the front device
// out while the volume stays mounted. fio never sees an error, the images
// equal their snapshots and check clean, and so does the volume.
func TestLiveLVM(t *testing.T) {
	ensureUblk(t)
	ensureScratch(t)
	volumeGroup(t)
	for i, k := range []fsKind{ext4, xfs} {
		size := map[string]string{"ext4": "96M", "xfs": "304M"}[k.name] // XFS' smallest is 300 MB
		t.Run(k.name, func(t *testing.T) {
			minor := 30 + i
			m := fmt.Sprint(minor)
			dumpLogOnFailure(t, minor)
			dir := "/mnt" + m
			vol := logicalVolume(t, "live"+m, size, k, dir)
			name := "dbdvg-live" + m
			original := table(t, name)
			stopFio := busyFio(t, dir)
			time.Sleep(time.Second)

			must(t, dbdctl, "attach", vol, m)
			t.Cleanup(func() { run(t, dbdctl, "destroy", m); run(t, dbdctl, "detach", m) })
			front := "/dev/ublkb" + m
			if tbl := table(t, name); !onFront(t, tbl, front) {
				t.Fatalf("after attach the volume's table is %q, not the front device", tbl)
			}
			d := info(t, m).Devices[0]
			if d.BlockDevice != vol || d.Inserted != "/dev/mapper/dbdctl"+m+"-real" {
				t.Fatalf("info says %s inserted via %q", d.BlockDevice, d.Inserted)
			}
			if got := table(t, "dbdctl"+m+"-real"); got != original {
				t.Fatalf("the hidden device maps %q, want the volume's original %q", got, original)
			}

			// dattobd's walkthrough, the COW file on the volume itself.
			img := "/scratch/live" + m + ".img"
			t.Cleanup(func() { os.Remove(img) })
			// -f 24: room for every block fio rewrites (16 MiB) and more.
			must(t, dbdctl, "setup-snapshot", "-f", "24", vol, dir+"/.datto", m)
			must(t, "dd", "if=/dev/datto"+m, "of="+img, "bs=1M")
			must(t, dbdctl, "transition-to-incremental", m)
			time.Sleep(2 * time.Second)
			// A server killed while inserted is replaced; the volume
			// keeps its I/O through the front device.
			pid := serverPID(t, minor)
			kill(t, pid)
			waitNewServer(t, minor, pid)
			if tbl := table(t, name); !onFront(t, tbl, front) {
				t.Fatalf("after the server's death the volume's table is %q", tbl)
			}
			time.Sleep(time.Second)
			must(t, dbdctl, "transition-to-snapshot", "-f", "24", dir+"/.datto1", m)
			must(t, dbdctl, "update-img", "/dev/datto"+m, dir+"/.datto", img)
			if n, first := differingBlocks(t, img, "/dev/datto"+m); n != 0 {
				rec, _ := os.ReadFile("/var/lib/dbdctl/" + m + ".json")
				t.Fatalf("the image differs from its snapshot in %d 4 KiB blocks (the first: %v)\nstate: %s", n, first, rec)
			}
			k.fsck(t, img)
			must(t, "rm", dir+"/.datto")
			must(t, dbdctl, "transition-to-incremental", m)

			// A tracked volume in use cannot lose its front device.
			r := run(t, dbdctl, "detach", m)
			checkOneLineError(t, r, "in use")
			must(t, dbdctl, "destroy", m)
			must(t, dbdctl, "detach", m)
			if tbl := table(t, name); tbl != original {
				t.Fatalf("after detach the volume maps %q, want its original %q", tbl, original)
			}
			if r := run(t, "dmsetup", "info", "dbdctl"+m+"-real"); r.code == 0 {
				t.Fatal("detach left the hidden device")
			}
			if err := stopFio(); err != nil {
				t.Fatal(err)
			}
			must(t, "umount", dir)
			k.fsck(t, vol)
			must(t, "mount", "-t", k.name, vol, dir)
		})
	}
}

// TestLiveTableReloaded: lvextend behind the server's back sends the
// volume's writes past the front device; the server sees the table change,
// fails tracking (a full backup is required, persisted) and detach leaves
// the volume with the table LVM gave it.
func TestLiveTableReloaded(t *testing.T) {
	ensureUblk(t)
	ensureScratch(t)
	volumeGroup(t)
	const minor = 32
	m := fmt.Sprint(minor)
	dumpLogOnFailure(t, minor)
	dir := "/mnt" + m
	vol := logicalVolume(t, "grow", "64M", ext4, dir)
	must(t, dbdctl, "attach", vol, m)
	t.Cleanup(func() { run(t, dbdctl, "destroy", m); run(t, dbdctl, "detach", m) })
	cow := "/scratch/grow.cow"
	os.Remove(cow)
	t.Cleanup(func() { os.Remove(cow) })
	must(t, dbdctl, "setup-snapshot", vol, cow, m)
	must(t, dbdctl, "transition-to-incremental", m)

	lvm(t, "lvextend", "-q", "-L", "+8M", "dbdvg/grow")
	var d infoDevice
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if d = info(t, m).Devices[0]; d.Error != nil && *d.Error != 0 {
			break
		}
	}
	if got := errorOf(d); got != -int(syscall.EIO) {
		t.Fatalf("after lvextend behind the server's back info says error %d, want %d", got, -int(syscall.EIO))
	}
	logb, _ := os.ReadFile("/var/log/dbdctl/ublk" + m + ".log")
	if !strings.Contains(string(logb), "reloaded behind") {
		t.Fatalf("the server log does not say the table was reloaded:\n%s", tail(string(logb), 2000))
	}
	must(t, dbdctl, "destroy", m)
	must(t, dbdctl, "detach", m)
	if got := sizeOf(t, vol); got != 72<<20 {
		t.Fatalf("after detach the volume is %d bytes, want LVM's 72 MiB", got)
	}
	must(t, "umount", dir)
	ext4.fsck(t, vol)
}

// TestLiveBadInput: what cannot be inserted is refused with one line and
// left untouched; a snapshot in use keeps its front device.
func TestLiveBadInput(t *testing.T) {
	ensureUblk(t)
	ensureScratch(t)
	volumeGroup(t)
	const minor = 33
	m := fmt.Sprint(minor)
	dumpLogOnFailure(t, minor)

	t.Run("mounted plain disk", func(t *testing.T) {
		must(t, "mkfs.ext4", "-q", "-F", diskSpare)
		must(t, "mkdir", "-p", "/mnt"+m)
		must(t, "mount", diskSpare, "/mnt"+m)
		defer run(t, "umount", "/mnt"+m)
		r := run(t, dbdctl, "attach", diskSpare, m)
		checkOneLineError(t, r, "unmount it")
	})

	t.Run("thin volume", func(t *testing.T) {
		must(t, "modprobe", "dm-thin-pool")
		lvm(t, "lvcreate", "-q", "-y", "--type", "thin-pool", "-L", "32M", "-n", "pool", "dbdvg")
		lvm(t, "lvcreate", "-q", "-y", "-V", "16M", "-T", "dbdvg/pool", "-n", "thin")
		dev := "/dev/mapper/dbdvg-thin"
		must(t, "mkfs.ext4", "-q", "-F", dev)
		must(t, "mkdir", "-p", "/mnt"+m)
		must(t, "mount", dev, "/mnt"+m)
		defer func() {
			run(t, "umount", "/mnt"+m)
			run(t, "lvm", "lvremove", "-f", "dbdvg/thin", "dbdvg/pool")
		}()
		before := table(t, "dbdvg-thin")
		r := run(t, dbdctl, "attach", dev, m)
		checkOneLineError(t, r, `"thin" target`)
		if after := table(t, "dbdvg-thin"); after != before {
			t.Fatalf("a refused attach changed the table: %q -> %q", before, after)
		}
		if r := run(t, "dmsetup", "info", "dbdctl"+m+"-real"); r.code == 0 {
			t.Fatal("a refused attach left a hidden device")
		}
	})

	t.Run("failed insertion changes nothing", func(t *testing.T) {
		dir := "/mnt" + m
		vol := logicalVolume(t, "fail", "32M", ext4, dir)
		before := table(t, "dbdvg-fail")
		env := append(privateState(t), "DBDCTL_FAILPOINTS=attach/redirect")
		r := dbdEnv(t, env, "attach", vol, m)
		checkOneLineError(t, r, "injected")
		if after := table(t, "dbdvg-fail"); after != before {
			t.Fatalf("a failed attach changed the table: %q -> %q", before, after)
		}
		for _, leftover := range []string{"/dev/ublkb" + m, "/dev/ublkc" + m} {
			if exists(leftover) {
				t.Fatalf("a failed attach left %s", leftover)
			}
		}
		if r := run(t, "dmsetup", "info", "dbdctl"+m+"-real"); r.code == 0 {
			t.Fatal("a failed attach left the hidden device")
		}
		if r := dbdEnv(t, env, "info", m); r.code == 0 {
			t.Fatalf("a failed attach left minor %s attached or recorded: %s", m, r.stdout)
		}
		frontWorks(t, dir)
	})

	t.Run("detach with the snapshot open", func(t *testing.T) {
		dir := "/mnt" + m
		vol := logicalVolume(t, "open", "32M", ext4, dir)
		must(t, dbdctl, "attach", vol, m)
		defer func() { run(t, dbdctl, "destroy", m); run(t, dbdctl, "detach", m) }()
		cow := "/scratch/open.cow"
		os.Remove(cow)
		defer os.Remove(cow)
		must(t, dbdctl, "setup-snapshot", vol, cow, m)
		must(t, dbdctl, "transition-to-incremental", m)
		must(t, dbdctl, "transition-to-snapshot", cow+"2", m)
		defer os.Remove(cow + "2")
		must(t, "umount", dir) // so only the mounted snapshot stands in the way
		must(t, "mkdir", "-p", "/media/snap"+m)
		must(t, "mount", "-o", "ro,noload", "/dev/datto"+m, "/media/snap"+m)
		r := run(t, dbdctl, "detach", m)
		must(t, "umount", "/media/snap"+m)
		checkOneLineError(t, r, "/dev/datto"+m)
		if tbl := table(t, "dbdvg-open"); !onFront(t, tbl, "/dev/ublkb"+m) {
			t.Fatalf("a refused detach took the front device out: %q", tbl)
		}
	})
}

// differingBlocks compares two files 4 KiB block by block and returns how
// many blocks differ and the first few of them.
func differingBlocks(t *testing.T, a, b string) (n int, first []int64) {
	t.Helper()
	fa, err := os.Open(a)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); ; off += int64(len(ba)) {
		na, _ := io.ReadFull(fa, ba)
		nb, _ := io.ReadFull(fb, bb)
		if na != nb {
			t.Fatalf("%s and %s differ in size near byte %d", a, b, off)
		}
		for i := 0; i < na; i += 4096 {
			if !bytes.Equal(ba[i:min(i+4096, na)], bb[i:min(i+4096, nb)]) {
				if n++; len(first) < 20 {
					first = append(first, (off+int64(i))/4096)
				}
			}
		}
		if na < len(ba) {
			return n, first
		}
	}
}

// TestLiveUnrecoverable: when no server can take an inserted volume's
// front device over, the supervisor fails the held I/O and puts the volume
// back on its own devices (untracked, the failure recorded): its
// filesystem is never left hanging on a dead front device.
func TestLiveUnrecoverable(t *testing.T) {
	ensureUblk(t)
	ensureScratch(t)
	volumeGroup(t)
	env := append(privateState(t), "DBDCTL_FAILPOINTS=recover/exit")
	const minor = 34
	m := fmt.Sprint(minor)
	dumpLogOnFailure(t, minor)
	dir := "/mnt" + m
	vol := logicalVolume(t, "unrec", "64M", ext4, dir)
	original := table(t, "dbdvg-unrec")
	t.Cleanup(func() { dbdEnv(t, env, "destroy", m); dbdEnv(t, env, "detach", m) })
	mustEnv(t, env, "attach", vol, m)
	cow := "/scratch/unrec-live.cow"
	os.Remove(cow)
	t.Cleanup(func() { os.Remove(cow) })
	mustEnv(t, env, "setup-snapshot", vol, cow, m)
	mustEnv(t, env, "transition-to-incremental", m)
	sh(t, "dd if=/dev/urandom of="+dir+"/a bs=1M count=4 conv=fsync 2>/dev/null")
	kill(t, infoEnv(t, env, m).ServerPID)

	deadline := time.Now().Add(3 * time.Minute)
	for table(t, "dbdvg-unrec") != original {
		if time.Now().After(deadline) {
			t.Fatalf("3 minutes after the server died with no server able to take over, the volume maps %q, not its own devices", table(t, "dbdvg-unrec"))
		}
		time.Sleep(500 * time.Millisecond)
	}
	// The volume answers again, from its own devices: no write hangs.
	done := make(chan error, 1)
	go func() {
		done <- exec.Command("dd", "if=/dev/zero", "of="+dir+"/probe", "bs=4k", "count=1", "oflag=direct").Run()
	}()
	select {
	case <-done:
	case <-time.After(maxStall):
		t.Fatalf("a write on the volume hangs after it went back on its own devices")
	}
	if r := run(t, "dmsetup", "info", "dbdctl"+m+"-real"); r.code == 0 {
		t.Fatal("the hidden device was left behind")
	}
	if got := errorOf(infoEnv(t, env, m)); got != -int(syscall.EIO) {
		t.Fatalf("after the supervisor gave up: error %d, want %d", got, -int(syscall.EIO))
	}
	mustEnv(t, env, "detach", m) // the dead front device
	checkOneLineError(t, dbdEnv(t, env, "reload-incremental", vol, cow, m), "full backup")
	if r := run(t, "dmsetup", "info", "dbdctl"+m+"-real"); r.code == 0 {
		t.Fatal("a refused reload left a hidden device")
	}
}

// errorOf is info's error field (0 when absent).
func errorOf(d infoDevice) int {
	if d.Error == nil {
		return 0
	}
	return *d.Error
}

// TestLiveDormant: a tracked live volume unmounted and detached is left
// dormant with its original table; reload-incremental inserts the front
// device again before it is mounted, and so do detach --all and reload-all
// (the boot unit), so the next incremental misses nothing.
func TestLiveDormant(t *testing.T) {
	ensureUblk(t)
	ensureScratch(t)
	volumeGroup(t)
	const minor = 35
	m := fmt.Sprint(minor)
	dumpLogOnFailure(t, minor)
	dir := "/mnt" + m
	vol := logicalVolume(t, "dormant", "64M", ext4, dir)
	name := "dbdvg-dormant"
	original := table(t, name)
	front := "/dev/ublkb" + m
	cow, next, img := "/scratch/dormant.cow", "/scratch/dormant2.cow", "/scratch/dormant.img"
	for _, f := range []string{cow, next, img} {
		os.Remove(f)
		t.Cleanup(func() { os.Remove(f) })
	}
	t.Cleanup(func() { run(t, dbdctl, "destroy", m); run(t, dbdctl, "detach", m) })
	must(t, dbdctl, "attach", vol, m)
	must(t, dbdctl, "setup-snapshot", vol, cow, m)
	must(t, "dd", "if=/dev/datto"+m, "of="+img, "bs=1M")
	must(t, dbdctl, "transition-to-incremental", m)
	sh(t, "dd if=/dev/urandom of="+dir+"/a bs=1M count=4 conv=fsync 2>/dev/null")

	must(t, "umount", dir)
	must(t, dbdctl, "detach", m)
	if tbl := table(t, name); tbl != original {
		t.Fatalf("a dormant volume maps %q, want its original %q", tbl, original)
	}
	must(t, dbdctl, "reload-incremental", vol, cow, m)
	if tbl := table(t, name); !onFront(t, tbl, front) {
		t.Fatalf("after reload-incremental the volume maps %q", tbl)
	}
	must(t, "mount", "-t", "ext4", vol, dir)
	sh(t, "dd if=/dev/urandom of="+dir+"/b bs=1M count=4 conv=fsync 2>/dev/null")

	// Shutdown and boot, as the unit runs them.
	must(t, "umount", dir)
	must(t, dbdctl, "detach", "--all")
	if tbl := table(t, name); tbl != original {
		t.Fatalf("after detach --all the volume maps %q", tbl)
	}
	must(t, dbdctl, "reload-all")
	if d := info(t, m).Devices[0]; d.Mode != "incremental" || !onFront(t, table(t, name), front) {
		t.Fatalf("after reload-all: mode %q, table %q", d.Mode, table(t, name))
	}
	must(t, "mount", "-t", "ext4", vol, dir)
	sh(t, "dd if=/dev/urandom of="+dir+"/c bs=1M count=4 conv=fsync 2>/dev/null")

	must(t, dbdctl, "transition-to-snapshot", next, m)
	marked, changed := checkIncremental(t, cow, img, "/dev/datto"+m)
	must(t, dbdctl, "update-img", "/dev/datto"+m, cow, img)
	must(t, "/usr/bin/cmp", img, "/dev/datto"+m)
	t.Logf("after a dormant detach, a reload and a reload-all: %d blocks marked, %d changed", marked, changed)
	must(t, dbdctl, "destroy", m)
	must(t, dbdctl, "detach", m)
	if tbl := table(t, name); tbl != original {
		t.Fatalf("after the last detach the volume maps %q", tbl)
	}
}

package guest

import (
	"os/exec"
	"strings"
	"testing"
)

// TestStackedFilesystems: the freeze follows what is really stacked on the
// front device. btrfs on it, and ext4 on a device-mapper volume on it, are
// frozen at the snapshot instant (their images check clean while writes
// go on); a COW file on such a filesystem is refused; a device used by
// something that is not a mounted filesystem (swap) is refused unless the
// user asks for a crash-consistent snapshot, which info then states.
func TestStackedFilesystems(t *testing.T) {
	ensureUblk(t)
	ensureScratch(t)
	env := privateState(t)
	const m = "19"
	front, dir := "/dev/ublkb"+m, "/scratch/stacked"
	must(t, "rm", "-rf", dir)
	must(t, "mkdir", "-p", dir, "/mnt19")
	dumpLogOnFailure(t, 19)
	t.Cleanup(func() {
		exec.Command("umount", "/mnt19").Run()
		exec.Command("swapoff", front).Run()
		exec.Command("dmsetup", "remove", "stack19").Run()
		dbdEnv(t, env, "destroy", m)
		dbdEnv(t, env, "detach", m)
	})
	must(t, "dd", "if=/dev/zero", "of="+diskFault, "bs=1M", "count=1", "oflag=direct")
	mustEnv(t, env, "attach", diskFault, m)

	// busy keeps writing files on mnt while a snapshot is taken.
	busy := func(mnt string) func() {
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				exec.Command("sh", "-c", "dd if=/dev/urandom of="+mnt+"/busy bs=64k count=8 2>/dev/null").Run()
			}
		}()
		return func() { close(stop); <-done }
	}

	t.Run("btrfs", func(t *testing.T) {
		must(t, "modprobe", "btrfs")
		must(t, "mkfs.btrfs", "-q", "-f", front)
		must(t, "mount", front, "/mnt19")
		defer run(t, "umount", "/mnt19")
		sh(t, "dd if=/dev/urandom of=/mnt19/a bs=1M count=8 2>/dev/null")
		checkOneLineError(t, dbdEnv(t, env, "setup-snapshot", front, "/mnt19/.datto", m), "stacked on")
		stop := busy("/mnt19")
		mustEnv(t, env, "setup-snapshot", front, dir+"/cow-btrfs", m)
		stop()
		if d := infoEnv(t, env, m); len(d.Frozen) != 1 || d.Frozen[0] != "/mnt19" {
			t.Errorf("info says frozen %v, want [/mnt19]", d.Frozen)
		}
		image := dir + "/btrfs.img"
		must(t, "dd", "if=/dev/datto"+m, "of="+image, "bs=1M")
		must(t, "btrfs", "check", "--readonly", image)
		mustEnv(t, env, "destroy", m)
	})

	t.Run("ext4 on device-mapper on the front device", func(t *testing.T) {
		sectors := strings.TrimSpace(must(t, "blockdev", "--getsz", front))
		dmCreate(t, "stack19", "0 "+sectors+" linear "+front+" 0")
		defer run(t, "dmsetup", "remove", "stack19")
		must(t, "mkfs.ext4", "-q", "-F", "/dev/mapper/stack19")
		must(t, "mount", "/dev/mapper/stack19", "/mnt19")
		defer run(t, "umount", "/mnt19")
		checkOneLineError(t, dbdEnv(t, env, "setup-snapshot", front, "/mnt19/.datto", m), "stacked on")
		stop := busy("/mnt19")
		mustEnv(t, env, "setup-snapshot", front, dir+"/cow-dm", m)
		stop()
		if d := infoEnv(t, env, m); len(d.Frozen) != 1 || d.Frozen[0] != "/mnt19" {
			t.Errorf("info says frozen %v, want [/mnt19]", d.Frozen)
		}
		image := dir + "/dm.img"
		must(t, "dd", "if=/dev/datto"+m, "of="+image, "bs=1M")
		must(t, "e2fsck", "-fn", image)
		mustEnv(t, env, "destroy", m)
	})

	t.Run("swap: refused unless crash-consistent is asked for", func(t *testing.T) {
		must(t, "mkswap", front)
		must(t, "swapon", front)
		defer run(t, "swapoff", front)
		checkOneLineError(t, dbdEnv(t, env, "setup-snapshot", front, dir+"/cow-swap", m), "--no-freeze")
		if exists(dir + "/cow-swap") {
			t.Fatal("a refused snapshot left its COW file")
		}
		mustEnv(t, env, "setup-snapshot", "--no-freeze", front, dir+"/cow-swap", m)
		if d := infoEnv(t, env, m); !d.CrashCons {
			t.Error("info does not say the snapshot is only crash-consistent")
		}
		mustEnv(t, env, "destroy", m)
	})
}

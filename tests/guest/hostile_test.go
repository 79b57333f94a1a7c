package guest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestHostilePaths: a root daemon follows no path twice and trusts no
// directory another user can change. A symbolic link swapped in for the
// COW file after it was made changes nothing the server writes; a COW
// directory others can write is refused; an on-volume COW file in use
// cannot be removed; corrupted state files are reported and skipped;
// of two concurrent attaches of one minor, exactly one wins.
func TestHostilePaths(t *testing.T) {
	ensureUblk(t)
	ensureScratch(t)
	env := privateState(t)
	const m = "17"
	front, mnt := "/dev/ublkb"+m, "/mnt17"
	dir := "/scratch/hostile"
	must(t, "rm", "-rf", dir)
	must(t, "mkdir", "-p", dir, mnt)
	dumpLogOnFailure(t, 17)
	t.Cleanup(func() { exec.Command("umount", mnt).Run(); dbdEnv(t, env, "destroy", m); dbdEnv(t, env, "detach", m) })
	must(t, "mkfs.ext4", "-q", "-F", "-b", "4096", diskFault)
	mustEnv(t, env, "attach", diskFault, m)
	must(t, "mount", front, mnt)

	t.Run("directory others can write", func(t *testing.T) {
		open := dir + "/open"
		must(t, "mkdir", "-p", open)
		must(t, "chmod", "0777", open)
		checkOneLineError(t, dbdEnv(t, env, "setup-snapshot", front, open+"/cow", m), "writable by a user other than root")
		if exists(open + "/cow") {
			t.Fatal("a refused setup made the COW file")
		}
	})

	t.Run("symbolic link swapped in for the COW file", func(t *testing.T) {
		mustEnv(t, env, "setup-snapshot", front, dir+"/cow1", m)
		image := dir + "/img"
		must(t, "dd", "if=/dev/datto"+m, "of="+image, "bs=1M")
		mustEnv(t, env, "transition-to-incremental", m)
		must(t, "sh", "-c", "echo victim > "+dir+"/victim")
		must(t, "mv", dir+"/cow1", dir+"/cow1.real")
		must(t, "ln", "-s", dir+"/victim", dir+"/cow1")
		sh(t, "dd if=/dev/urandom of="+mnt+"/a bs=1M count=4 conv=fsync 2>/dev/null")
		mustEnv(t, env, "transition-to-snapshot", dir+"/cow2", m)
		if b, _ := os.ReadFile(dir + "/victim"); string(b) != "victim\n" {
			t.Fatalf("the server wrote through a swapped-in symbolic link: %q", b)
		}
		// The change list the server kept writing is the real file.
		mustEnv(t, env, "update-img", "/dev/datto"+m, dir+"/cow1.real", image)
		must(t, "/usr/bin/cmp", image, "/dev/datto"+m)
		// Given the link itself, update-img refuses it.
		checkOneLineError(t, dbdEnv(t, env, "update-img", "/dev/datto"+m, dir+"/cow1", image), "symbolic link")
		mustEnv(t, env, "destroy", m)
	})

	t.Run("on-volume COW file cannot be removed", func(t *testing.T) {
		mustEnv(t, env, "setup-snapshot", front, mnt+"/.datto", m)
		if r := run(t, "rm", "-f", mnt+"/.datto"); r.code == 0 || !exists(mnt+"/.datto") {
			t.Fatal("rm removed a COW file the server writes raw")
		}
		if r := run(t, "mv", mnt+"/.datto", mnt+"/.moved"); r.code == 0 {
			t.Fatal("mv moved a COW file the server writes raw")
		}
		mustEnv(t, env, "transition-to-incremental", m)
		mustEnv(t, env, "transition-to-snapshot", mnt+"/.datto1", m)
		// The previous change list is given back: it can be removed.
		must(t, "rm", mnt+"/.datto")
		if r := run(t, "rm", "-f", mnt+"/.datto1"); r.code == 0 {
			t.Fatal("rm removed the current COW file")
		}
		mustEnv(t, env, "destroy", m)
		if exists(mnt + "/.datto1") {
			t.Fatal("destroy left the on-volume COW file")
		}
	})

	t.Run("corrupted state files", func(t *testing.T) {
		stateDir := strings.TrimPrefix(env[0], "DBDCTL_STATE_DIR=")
		bad := []string{"{not json", `{"minor": 43, "block_device": "/dev/vdf", "mode": "passthrough"}`,
			`{"minor": 42, "block_device": "` + diskFault + `", "mode": "incremental", "cow_file": "/nonexistent/x",
			  "cow_extents": [{"logical": 0, "physical": 4096, "length": 4096}, {"logical": 4096, "physical": 0, "length": 999999999999}]}`}
		for i, b := range bad {
			if err := os.WriteFile(filepath.Join(stateDir, fmt.Sprint(40+i)+".json"), []byte(b), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		defer func() {
			for i := range bad {
				os.Remove(filepath.Join(stateDir, fmt.Sprint(40+i)+".json"))
			}
		}()
		r := dbdEnv(t, env, "reload-all")
		if r.code == 0 {
			t.Fatal("reload-all with corrupted state files succeeded")
		}
		for _, want := range []string{"40.json", "41.json", "minor 42"} {
			if !strings.Contains(r.stderr, want) {
				t.Errorf("reload-all does not report %s: %s", want, r.stderr)
			}
		}
		for _, p := range []string{"/dev/ublkb40", "/dev/ublkb41", "/dev/ublkb42"} {
			if exists(p) {
				t.Errorf("a corrupted state file brought %s up", p)
			}
		}
	})

	must(t, "umount", mnt)
	mustEnv(t, env, "detach", m)

	t.Run("two concurrent attaches of one minor", func(t *testing.T) {
		var wg sync.WaitGroup
		results := make([]result, 2)
		for i, disk := range []string{diskFault, diskAux} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				results[i] = dbdEnv(t, env, "attach", disk, m)
			}()
		}
		wg.Wait()
		won := 0
		for _, r := range results {
			if r.code == 0 {
				won++
			} else if strings.Count(strings.TrimRight(r.stderr, "\n"), "\n") != 0 || !strings.Contains(r.stderr, "minor "+m) {
				t.Errorf("the losing attach said %q", r.stderr)
			}
		}
		if won != 1 {
			t.Fatalf("%d of two concurrent attaches of minor %s won: %+v", won, m, results)
		}
		// The winner keeps working.
		sh(t, "dd if=/dev/urandom of=/tmp/p bs=64k count=1 2>/dev/null; dd if=/tmp/p of="+front+" bs=64k oflag=direct 2>/dev/null")
		sh(t, "test \"$(dd if="+front+" bs=64k count=1 iflag=direct 2>/dev/null | sha256sum)\" = \"$(sha256sum < /tmp/p)\"")
		mustEnv(t, env, "detach", m)
	})
}

// TestFrozenServerKilled: a server that dies while it holds the
// filesystem frozen (the instant of a snapshot) does not leave it frozen:
// the server that takes over thaws it, and writes go on.
func TestFrozenServerKilled(t *testing.T) {
	ensureUblk(t)
	ensureScratch(t)
	env := privateState(t)
	const m = "18"
	front, mnt, dir := "/dev/ublkb"+m, "/mnt18", "/scratch/frozen"
	must(t, "rm", "-rf", dir)
	must(t, "mkdir", "-p", dir, mnt)
	dumpLogOnFailure(t, 18)
	t.Cleanup(func() { exec.Command("umount", mnt).Run(); dbdEnv(t, env, "destroy", m); dbdEnv(t, env, "detach", m) })
	fp := append(env, "DBDCTL_FAILPOINTS=setup-snapshot/die-frozen")
	mustEnv(t, fp, "attach", diskFault, m)
	must(t, "mkfs.ext4", "-q", "-F", front)
	must(t, "mount", front, mnt)
	pid := infoEnv(t, env, m).ServerPID
	r := dbdEnv(t, fp, "setup-snapshot", front, dir+"/cow1", m)
	if r.code == 0 {
		t.Fatal("setup-snapshot answered although its server died")
	}
	waitNewServerEnv(t, env, m, pid)
	done := make(chan error, 1)
	go func() {
		done <- exec.Command("sh", "-c", "dd if=/dev/urandom of="+mnt+"/after bs=64k count=16 conv=fsync 2>/dev/null").Run()
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("writing after the recovery: %v", err)
		}
	case <-time.After(maxStall):
		t.Fatal("the filesystem is still frozen after its server was replaced")
	}
	if d := infoEnv(t, env, m); d.Mode != "passthrough" {
		t.Fatalf("after the death mid-setup: mode %s", d.Mode)
	}
}

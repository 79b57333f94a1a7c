package guest

import (
	"fmt"
	"os"
	"testing"
)

// TestSnapshotBadInput: every mistake with the snapshot commands gets a
// one-line error, a non-zero exit, and changes nothing — in particular
// update-img leaves the image untouched.
func TestSnapshotBadInput(t *testing.T) {
	const minor = 8
	front, m, dir := tracked(t, diskFio, minor, "bad")
	t.Cleanup(func() { run(t, "umount", "/mnt") })
	must(t, "mkfs.ext4", "-q", "-F", front)
	must(t, "mount", "-t", "ext4", front, "/mnt")
	must(t, "touch", dir+"/taken")

	pre := []struct {
		name string
		args []string
		want string
	}{
		{"transition in passthrough", []string{"transition-to-incremental", m}, "not in snapshot mode"},
		{"snapshot transition in passthrough", []string{"transition-to-snapshot", dir + "/x", m}, "not in incremental mode"},
		{"destroy untracked", []string{"destroy", m}, "not tracking"},
		{"reused cow path", []string{"setup-snapshot", diskFio, dir + "/taken", m}, "already exists"},
		{"missing directory", []string{"setup-snapshot", diskFio, "/scratch/nope/cow", m}, "does not exist"},
		{"other device for minor", []string{"setup-snapshot", diskSpare, dir + "/c", m}, "attached to"},
		{"negative falloc", []string{"setup-snapshot", "--falloc=-3", diskFio, dir + "/c", m}, "negative"},
		{"unknown minor", []string{"transition-to-incremental", "9"}, "not attached"},
	}
	for _, c := range pre {
		t.Run(c.name, func(t *testing.T) {
			checkOneLineError(t, run(t, dbdctl, c.args...), c.want)
			if _, err := os.Stat("/mnt/cow"); err == nil {
				t.Errorf("a refused command created /mnt/cow")
			}
		})
	}
	if d := info(t, m).Devices[0]; d.Mode != "passthrough" {
		t.Fatalf("refused commands changed the mode to %s", d.Mode)
	}

	must(t, dbdctl, "setup-snapshot", diskFio, dir+"/cow1", m)
	snap := "/dev/datto" + m
	must(t, "dd", "if="+snap, "of="+dir+"/img", "bs=1M")
	must(t, dbdctl, "transition-to-incremental", m)
	sh(t, `echo changed > /mnt/f && sync`)
	checkOneLineError(t, run(t, dbdctl, "transition-to-incremental", m), "not in snapshot mode")
	checkOneLineError(t, run(t, dbdctl, "transition-to-snapshot", dir+"/cow1", m), "current COW file")
	must(t, dbdctl, "transition-to-snapshot", dir+"/cow2", m)
	checkOneLineError(t, run(t, dbdctl, "setup-snapshot", diskFio, dir+"/cow9", m), "already tracking")

	// update-img refusals: the image must stay byte-identical.
	imgSum := blockSum(t, dir+"/img", 0, 1)
	wholeImg := sh(t, "sha256sum < "+dir+"/img")
	sh(t, fmt.Sprintf(`
		head -c 8192 /dev/urandom > %[1]s/garbage
		: > %[1]s/empty
		head -c 6000 %[1]s/cow1 > %[1]s/truncated
		dd if=/dev/zero of=%[1]s/small.img bs=1M count=1 2>/dev/null
	`, dir))
	bad := []struct {
		name string
		args []string
		want string
	}{
		{"garbage cow", []string{"update-img", snap, dir + "/garbage", dir + "/img"}, dir + "/garbage"},
		{"empty cow", []string{"update-img", snap, dir + "/empty", dir + "/img"}, dir + "/empty"},
		{"truncated cow", []string{"update-img", snap, dir + "/truncated", dir + "/img"}, dir + "/truncated"},
		{"out of sequence", []string{"update-img", snap, dir + "/cow2", dir + "/img"}, "snapshot"},
		{"missing image", []string{"update-img", snap, dir + "/cow1", dir + "/nope.img"}, "does not exist"},
		{"wrong-size image", []string{"update-img", snap, dir + "/cow1", dir + "/small.img"}, "bytes"},
		{"not a snapshot device", []string{"update-img", front, dir + "/cow1", dir + "/img"}, "snapshot device"},
		{"img-merge alias checks too", []string{"img-merge", snap, dir + "/garbage", dir + "/img"}, dir + "/garbage"},
	}
	for _, c := range bad {
		t.Run(c.name, func(t *testing.T) {
			checkOneLineError(t, run(t, dbdctl, c.args...), c.want)
		})
	}
	if blockSum(t, dir+"/img", 0, 1) != imgSum || sh(t, "sha256sum < "+dir+"/img") != wholeImg {
		t.Errorf("a refused update-img changed the image")
	}
	// Another series: a fresh setup on another device produces a COW file
	// with a different uuid.
	front2 := attach(t, diskSpare, 9)
	_ = front2
	must(t, dbdctl, "setup-snapshot", diskSpare, dir+"/other1", "9")
	must(t, dbdctl, "transition-to-incremental", "9")
	must(t, dbdctl, "transition-to-snapshot", dir+"/other2", "9")
	checkOneLineError(t, run(t, dbdctl, "update-img", snap, dir+"/other1", dir+"/img"), "another snapshot series")
	must(t, dbdctl, "destroy", "9")
	detach(t, 9)
	// The right COW file still works after all the refusals.
	must(t, dbdctl, "update-img", snap, dir+"/cow1", dir+"/img")
	must(t, "cmp", dir+"/img", snap)
}

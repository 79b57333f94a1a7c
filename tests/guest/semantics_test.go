package guest

import (
	"fmt"
	"os"
	"strings"
	"testing"
)

// blockSum is the sha256 of count 4 KiB blocks of dev starting at block.
func blockSum(t *testing.T, dev string, block, count int) string {
	t.Helper()
	return strings.Fields(sh(t, fmt.Sprintf("dd if=%s bs=4k skip=%d count=%d iflag=direct 2>/dev/null | sha256sum", dev, block, count)))[0]
}

// TestSnapshotSemantics proves the snapshot contract on the raw front
// device, block by block.
func TestSnapshotSemantics(t *testing.T) {
	const minor = 6
	front, m, dir := tracked(t, diskFio, minor, "sem")
	snap := "/dev/datto" + m
	// Known content: blocks 0-255 random.
	sh(t, fmt.Sprintf(`dd if=/dev/urandom of=%s bs=4k count=256 oflag=direct 2>/dev/null`, front))
	orig := map[int]string{}
	for _, b := range []int{0, 10, 20, 30, 40, 100} {
		orig[b] = blockSum(t, front, b, 1)
	}
	whole := blockSum(t, front, 0, 256)
	// And 16 MiB at 320 MiB for concurrent first writes.
	sh(t, fmt.Sprintf(`dd if=/dev/urandom of=%s bs=1M seek=320 count=16 oflag=direct 2>/dev/null`, front))
	const gatherAt, gatherBlocks = 320 << 8, 16 << 8
	gatherOrig := blockSum(t, front, gatherAt, gatherBlocks)
	must(t, dbdctl, "setup-snapshot", diskFio, dir+"/cow1", m)

	t.Run("first write wins", func(t *testing.T) {
		for i := 0; i < 3; i++ {
			sh(t, fmt.Sprintf(`dd if=/dev/urandom of=%s bs=4k seek=10 count=1 oflag=direct 2>/dev/null`, front))
		}
		if got := blockSum(t, snap, 10, 1); got != orig[10] {
			t.Errorf("snapshot block 10 changed after three writes")
		}
	})
	t.Run("4 KiB granularity", func(t *testing.T) {
		// A 512-byte write inside block 20 lands (read back) and must
		// preserve the whole block.
		sh(t, fmt.Sprintf(`dd if=/dev/urandom of=/tmp/sector bs=512 count=1 2>/dev/null
			dd if=/tmp/sector of=%[1]s bs=512 seek=%[2]d count=1 oflag=direct 2>/dev/null
			dd if=%[1]s bs=512 skip=%[2]d count=1 iflag=direct 2>/dev/null | cmp - /tmp/sector`, front, 20*8+3))
		if got := blockSum(t, snap, 20, 1); got != orig[20] {
			t.Errorf("snapshot block 20 changed after a 512-byte write into it")
		}
	})
	t.Run("write-zeroes and discard preserve old data", func(t *testing.T) {
		must(t, "/usr/sbin/blkdiscard", "-z", "-o", fmt.Sprint(30*4096), "-l", "4096", front)
		must(t, "/usr/sbin/blkdiscard", "-o", fmt.Sprint(40*4096), "-l", "4096", front)
		if got := blockSum(t, front, 30, 1); got == orig[30] {
			t.Errorf("write-zeroes did not reach the front device")
		}
		for _, b := range []int{30, 40} {
			if got := blockSum(t, snap, b, 1); got != orig[b] {
				t.Errorf("snapshot block %d changed after discard/write-zeroes", b)
			}
		}
	})
	t.Run("snapshot reads racing writes to the same block see old data", func(t *testing.T) {
		orig50 := blockSum(t, snap, 50, 1)
		out := sh(t, fmt.Sprintf(`
			( i=0; while [ $i -lt 150 ]; do dd if=/dev/urandom of=%[1]s bs=4k seek=50 count=1 oflag=direct 2>/dev/null; i=$((i+1)); done ) &
			writer=$!
			i=0; while [ $i -lt 150 ]; do dd if=%[2]s bs=4k skip=50 count=1 iflag=direct 2>/dev/null | sha256sum; i=$((i+1)); done
			wait $writer
		`, front, snap))
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			if f := strings.Fields(line); len(f) == 0 || f[0] != orig50 {
				t.Fatalf("a snapshot read racing writes returned other data: %q", line)
			}
		}
	})
	t.Run("read-only", func(t *testing.T) {
		r := run(t, "dd", "if=/dev/zero", "of="+snap, "bs=4k", "count=1", "oflag=direct")
		if r.code == 0 {
			t.Errorf("writing the snapshot device succeeded")
		}
		if got := blockSum(t, snap, 0, 1); got != orig[0] {
			t.Errorf("snapshot block 0 changed after a refused write")
		}
	})
	t.Run("whole view is the pre-snapshot view", func(t *testing.T) {
		if got := blockSum(t, snap, 0, 256); got != whole {
			t.Errorf("snapshot blocks 0-255 differ from the pre-snapshot content")
		}
	})
	t.Run("fio verify on the front while the snapshot is read", func(t *testing.T) {
		sh(t, fmt.Sprintf(`
			dd if=%[2]s of=/dev/null bs=1M iflag=direct 2>/dev/null &
			reader=$!
			fio --name=live --filename=%[1]s --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
				--offset=256M --size=16M --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 \
				--randseed=33 --minimal >/dev/null
			wait $reader
		`, front, snap))
		if got := blockSum(t, snap, 0, 256); got != whole {
			t.Errorf("snapshot changed under load")
		}
	})
	t.Run("concurrent first writes gathered into one COW write keep the snapshot", func(t *testing.T) {
		// At QD32 the old data of first writes whose reads complete
		// together goes to the COW file in one write per run of adjacent
		// slots; each block must still be preserved where its entry says.
		before := info(t, m).Devices[0].IO.CowWritesMerged
		sh(t, fmt.Sprintf(`fio --name=gather --filename=%s --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
			--offset=320M --size=16M --iodepth=32 --randseed=55 --minimal >/dev/null`, front))
		if got := blockSum(t, snap, gatherAt, gatherBlocks); got != gatherOrig {
			t.Errorf("the snapshot of the 16 MiB written by concurrent first writes is not what was there")
		}
		if merged := info(t, m).Devices[0].IO.CowWritesMerged - before; merged == 0 {
			t.Errorf("no COW data write of 4096 concurrent first writes was merged into another's")
		} else {
			t.Logf("%d of 4096 COW data writes merged into a neighbour's", merged)
		}
	})
	t.Run("no stale page cache after transition-to-snapshot", func(t *testing.T) {
		// Read through the page cache, change the block, take the next
		// snapshot: a buffered read must show the new content.
		sh(t, fmt.Sprintf(`dd if=%s of=/dev/null bs=4k skip=100 count=1 2>/dev/null`, snap))
		must(t, dbdctl, "transition-to-incremental", m)
		sh(t, fmt.Sprintf(`dd if=/dev/urandom of=%s bs=4k seek=100 count=1 oflag=direct 2>/dev/null`, front))
		now := blockSum(t, front, 100, 1)
		must(t, dbdctl, "transition-to-snapshot", dir+"/cow2", m)
		got := strings.Fields(sh(t, fmt.Sprintf(`dd if=%s bs=4k skip=100 count=1 2>/dev/null | sha256sum`, snap)))[0]
		if got != now {
			t.Errorf("buffered read of the new snapshot shows the old block 100")
		}
	})
	t.Run("incremental records every written block", func(t *testing.T) {
		// Blocks written in incremental mode are exactly what update-img
		// needs: an image of snapshot 2 brought up to snapshot 3 is equal
		// to snapshot 3.
		sh(t, fmt.Sprintf(`dd if=%s of=%s/img bs=1M 2>/dev/null`, snap, dir))
		must(t, dbdctl, "transition-to-incremental", m)
		sh(t, fmt.Sprintf(`fio --name=inc --filename=%s --ioengine=io_uring --direct=1 --rw=randwrite \
			--bssplit=512/20:4k/40:12k/20:64k/20 --size=480M --io_size=24M --iodepth=16 --randseed=44 --minimal >/dev/null`, front))
		must(t, dbdctl, "transition-to-snapshot", dir+"/cow3", m)
		must(t, dbdctl, "update-img", snap, dir+"/cow2", dir+"/img")
		must(t, "cmp", dir+"/img", snap)
		// The copy was the server's own, not a read of the snapshot device.
		if log, _ := os.ReadFile("/var/log/dbdctl/ublk" + m + ".log"); !strings.Contains(string(log), "reading the device directly") {
			t.Errorf("update-img did not go through the snapshot's server:\n%s", tail(string(log), 10))
		}
	})
}

// TestCowFull: a full COW store fails the snapshot closed while the front
// device keeps working; destroy clears the error; expand and auto-expand
// grow the store without losing preserved data.
func TestCowFull(t *testing.T) {
	const minor = 7
	front, m, dir := tracked(t, diskFio, minor, "full")
	sh(t, fmt.Sprintf(`dd if=/dev/urandom of=%s bs=1M count=8 oflag=direct 2>/dev/null`, front))
	orig := blockSum(t, front, 0, 64)

	// 512 MiB device: header + index = 4 KiB + 1 MiB; -f 2 leaves < 1 MiB of slots.
	must(t, dbdctl, "setup-snapshot", "-f", "2", diskFio, dir+"/cow", m)
	must(t, dbdctl, "expand-cow-file", "1", m)
	sh(t, fmt.Sprintf(`dd if=/dev/urandom of=%s bs=4k count=300 oflag=direct 2>/dev/null`, front))
	if got := blockSum(t, "/dev/datto"+m, 0, 64); got != orig {
		t.Fatalf("snapshot changed after expand-cow-file")
	}
	must(t, dbdctl, "reconfigure-auto-expand", "1", m)
	sh(t, fmt.Sprintf(`dd if=/dev/urandom of=%s bs=4k count=600 oflag=direct 2>/dev/null`, front))
	if d := info(t, m).Devices[0]; *d.Error != 0 {
		t.Fatalf("auto-expand did not keep the snapshot alive: error %d", *d.Error)
	}
	if got := blockSum(t, "/dev/datto"+m, 0, 64); got != orig {
		t.Fatalf("snapshot changed after auto-expand")
	}
	must(t, dbdctl, "reconfigure-auto-expand", "0", m)
	// Now overflow it: 8 MiB of new blocks cannot fit.
	sh(t, fmt.Sprintf(`dd if=/dev/urandom of=%s bs=1M seek=16 count=8 oflag=direct 2>/dev/null`, front))
	newSum := blockSum(t, front, 16*256, 8*256)
	d := info(t, m).Devices[0]
	if d.Error == nil || *d.Error != -27 {
		t.Fatalf("info error after overflow = %v, want -27 (EFBIG)", d.Error)
	}
	if r := run(t, "dd", "if=/dev/datto"+m, "of=/dev/null", "bs=4k", "count=1", "iflag=direct"); r.code == 0 {
		t.Errorf("reading a failed snapshot succeeded; it must fail with EIO")
	}
	// The front device kept every write.
	if got := blockSum(t, front, 16*256, 8*256); got != newSum {
		t.Errorf("front device lost data when the snapshot failed")
	}
	must(t, dbdctl, "destroy", m)
	if d := info(t, m).Devices[0]; *d.Error != 0 || d.Mode != "passthrough" {
		t.Errorf("after destroy: error %d mode %s", *d.Error, d.Mode)
	}
	detach(t, minor)
}

package guest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// dbdctl is where the rig installs the binary under test.
const dbdctl = "/usr/local/bin/dbdctl"

// Disks the host test attaches, in order (see tests/integration_test.go).
const (
	diskExt4  = "/dev/vda" // 512 MiB: filesystem tests
	diskFio   = "/dev/vdb" // 512 MiB: fio verify
	diskSpare = "/dev/vdc" // 64 MiB: bad-input cases (mounted directly)
	// /dev/vdd is the scratch disk (snapshot_test.go)
	diskCrash = "/dev/vde" // 128 MiB: the crash loops
)

func TestMain(m *testing.M) {
	if os.Getenv("DBD_GUEST") != "1" {
		fmt.Println("guest tests run inside the VM rig (go test ./tests/); skipping on the host")
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// result is a finished command.
type result struct {
	stdout, stderr string
	code           int
}

// run executes a command and returns its output and exit status; a command
// that cannot start fails the test.
func run(t *testing.T, name string, args ...string) result {
	t.Helper()
	cmd := exec.Command(name, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatalf("%s %v: %v", name, args, err)
	}
	return r
}

// must runs a command that has to succeed.
func must(t *testing.T, name string, args ...string) string {
	t.Helper()
	r := run(t, name, args...)
	if r.code != 0 {
		t.Fatalf("%s %s: exit %d\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// sh runs a shell snippet that has to succeed.
func sh(t *testing.T, script string) string {
	t.Helper()
	return must(t, "/bin/sh", "-ec", "set -o pipefail\n"+script)
}

func ensureUblk(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/ublk-control"); err != nil {
		must(t, "modprobe", "ublk_drv")
	}
}

// attach attaches disk as minor and arranges a detach at the end of the test.
func attach(t *testing.T, disk string, minor int) string {
	t.Helper()
	ensureUblk(t)
	dumpLogOnFailure(t, minor)
	out := must(t, dbdctl, "attach", disk, fmt.Sprint(minor))
	front := fmt.Sprintf("/dev/ublkb%d", minor)
	if !strings.Contains(out, front) {
		t.Fatalf("attach output %q does not name %s", out, front)
	}
	if _, err := os.Stat(front); err != nil {
		t.Fatalf("%s missing after attach: %v", front, err)
	}
	t.Cleanup(func() {
		if _, err := os.Stat(front); err == nil {
			exec.Command("umount", "/mnt").Run()
			exec.Command(dbdctl, "detach", fmt.Sprint(minor)).Run()
		}
	})
	return front
}

// dumpLogOnFailure shows minor's server log if the test fails.
func dumpLogOnFailure(t *testing.T, minor int) {
	t.Cleanup(func() {
		if t.Failed() {
			if b, err := os.ReadFile(fmt.Sprintf("/var/log/dbdctl/ublk%d.log", minor)); err == nil {
				t.Logf("server log of minor %d:\n%s", minor, tail(string(b), 4000))
			}
		}
	})
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func detach(t *testing.T, minor int) {
	t.Helper()
	must(t, dbdctl, "detach", fmt.Sprint(minor))
	front := fmt.Sprintf("/dev/ublkb%d", minor)
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(front); err != nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s still exists after detach", front)
}

// infoDoc mirrors dbdctl info's JSON.
type infoDoc struct {
	Version string       `json:"version"`
	Devices []infoDevice `json:"devices"`
}

type infoDevice struct {
	Minor       int      `json:"minor"`
	BlockDevice string   `json:"block_device"`
	State       *int     `json:"state"`
	Error       *int     `json:"error"`
	Mode        string   `json:"mode"`
	Status      string   `json:"status"`
	CowFile     string   `json:"cow_file"`
	Frozen      []string `json:"frozen"`
	CrashCons   bool     `json:"crash_consistent"`
	NrChanged   uint64   `json:"nr_changed_blocks"`
	MaxCache    int64    `json:"max_cache"`
	CacheInUse  int64    `json:"cache_in_use"`
	FrontDevice string   `json:"front_device"`
	Inserted    string   `json:"inserted_via"`
	ServerPID   int      `json:"server_pid"`
	Size        int64    `json:"size"`
	Queues      int      `json:"queues"`
	QueueDepth  int      `json:"queue_depth"`
	MaxIOBytes  int      `json:"max_io_bytes"`
	DevFeatures string   `json:"ublk_features"`
	KernelFeat  string   `json:"kernel_ublk_features"`
	DataPath    string   `json:"data_path"`
	IO          struct {
		Reads           uint64 `json:"reads"`
		Writes          uint64 `json:"writes"`
		CowWritesMerged uint64 `json:"cow_writes_merged"`
	} `json:"io"`
}

func info(t *testing.T, args ...string) infoDoc {
	t.Helper()
	return parseInfo(t, must(t, dbdctl, append([]string{"info"}, args...)...))
}

func parseInfo(t *testing.T, out string) infoDoc {
	t.Helper()
	var doc infoDoc
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("info output is not JSON: %v\n%s", err, out)
	}
	return doc
}

// sizeOf returns a block device's size in bytes.
func sizeOf(t *testing.T, dev string) int64 {
	t.Helper()
	var n int64
	fmt.Sscan(must(t, "blockdev", "--getsize64", dev), &n)
	return n
}

// alive reports whether pid runs (a zombie does not count).
func alive(pid int) bool {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(data), ')')
	return i > 0 && i+2 < len(data) && data[i+2] != 'Z'
}

// dmCreate creates device-mapper device name with table and returns its
// /dev/mapper path. The guest runs no udev, so dmsetup makes the node.
func dmCreate(t *testing.T, name, table string) string {
	t.Helper()
	must(t, "dmsetup", "create", name, "--noudevsync", "--table", table)
	must(t, "dmsetup", "mknodes", name)
	return "/dev/mapper/" + name
}

// fioVerify is fio writing file (of size) at random, 4–64 KiB with
// O_DIRECT at queue depth 8, verifying what it wrote as it goes, until it
// is interrupted.
func fioVerify(name, file, size string) *exec.Cmd {
	return exec.Command("fio", "--name="+name, "--filename="+file, "--size="+size,
		"--rw=randwrite", "--bsrange=4k-64k", "--ioengine=io_uring", "--iodepth=8", "--direct=1",
		"--verify=crc32c", "--verify_fatal=1", "--verify_backlog=64", "--time_based", "--runtime=100000")
}

// Command demo runs the project's main job end to end and shows it: where
// the running kernel has ublk (and we are root) it runs natively on a loop
// device; elsewhere it boots the VM rig and runs the same script there.
package main

import (
	"context"
	_ "embed"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/dbdublk/dbdublk/tests/vm"
)

//go:embed demo.sh
var script string

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run() error {
	work, err := os.MkdirTemp("", "dbdctl-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	dbdctl := filepath.Join(work, "dbdctl")
	if err := vm.GoBuild("build", "-o", dbdctl, "./ctl/dbdctl"); err != nil {
		return err
	}
	if native() {
		return runNative(work, dbdctl)
	}
	fmt.Println("This kernel has no ublk: running the demo inside the VM rig (Linux 6.12 under qemu).")
	if err := vm.Available(); err != nil {
		return err
	}
	res, err := vm.Run(context.Background(), vm.Config{
		Disks:    []vm.Disk{{Path: filepath.Join(work, "disk.img"), Size: 256 << 20}},
		Files:    map[string]string{"/usr/local/bin/dbdctl": dbdctl, "/usr/local/bin/demo.sh": writeScript(work)},
		Programs: []string{"mkfs.ext4", "mke2fs", "e2fsck"},
		Modules:  []string{"ublk_drv"},
		Script:   "mkdir -p /var/log\n/bin/sh /usr/local/bin/demo.sh /dev/vda",
		Timeout:  10 * time.Minute,
		Logf:     func(f string, a ...any) { fmt.Printf("[vm] "+f+"\n", a...) },
	})
	if err != nil {
		return err
	}
	fmt.Print(res.Output)
	if res.ExitCode != 0 {
		return fmt.Errorf("demo script failed with status %d", res.ExitCode)
	}
	return nil
}

func writeScript(dir string) string {
	p := filepath.Join(dir, "demo.sh")
	os.WriteFile(p, []byte(script), 0o755)
	return p
}

// native reports whether this machine can run ublk itself.
func native() bool {
	if os.Geteuid() != 0 {
		return false
	}
	if _, err := os.Stat("/dev/ublk-control"); err == nil {
		return true
	}
	return exec.Command("modprobe", "ublk_drv").Run() == nil
}

func runNative(work, dbdctl string) error {
	img := filepath.Join(work, "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		return err
	}
	if err := os.Truncate(img, 256<<20); err != nil {
		return err
	}
	out, err := exec.Command("losetup", "--find", "--show", "--direct-io=on", img).Output()
	if err != nil {
		return fmt.Errorf("losetup: %w", err)
	}
	loop := strings.TrimSpace(string(out))
	defer exec.Command("losetup", "-d", loop).Run()
	cmd := exec.Command("/bin/sh", writeScript(work), loop, filepath.Join(work, "backup.img"))
	cmd.Env = append(os.Environ(), "PATH="+work+":"+os.Getenv("PATH"))
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	return cmd.Run()
}

package vm

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestBootConfigDefaults(t *testing.T) {
	if _, err := (BootConfig{}).withDefaults(); err == nil {
		t.Error("empty Script accepted")
	}
	for _, k := range []string{"rel", "/", "/step.sh", "/.dbd-step/x"} {
		if _, err := (BootConfig{Script: "true", Files: map[string]string{k: "/etc/hostname"}}).withDefaults(); err == nil {
			t.Errorf("Files key %q accepted", k)
		}
	}
	c, err := BootConfig{Script: "true", Files: map[string]string{"/a/b.deb": "/etc/hostname"}}.withDefaults()
	if err != nil || c.CPUs != defaultCPUs || c.MemoryMiB != defaultMemoryMiB || c.Timeout != defaultTimeout {
		t.Fatalf("withDefaults = %+v, %v", c, err)
	}
}

// TestRootImageKinds: each initramfs builder has its own cached image,
// named by its packages, and only the two dbdctl ships hooks for exist.
func TestRootImageKinds(t *testing.T) {
	tools, dracut := rootImageName(InitramfsTools), rootImageName(Dracut)
	if tools == dracut || !strings.Contains(tools, "initramfs-tools") || !strings.Contains(dracut, "dracut") {
		t.Errorf("image names %q and %q do not tell the builders apart", tools, dracut)
	}
	for _, k := range []Initramfs{InitramfsTools, Dracut} {
		p := rootPackages(k)
		if p[0] != string(k) || !slices.Contains(p, "lvm2") {
			t.Errorf("%s image packages %v: want the builder first, and lvm2", k, p)
		}
	}
	if slices.Contains(rootPackages(Dracut), string(InitramfsTools)) {
		t.Error("the dracut image would install initramfs-tools too")
	}
	if _, err := EnsureRootImage(context.Background(), "mkinitcpio"); err == nil || !strings.Contains(err.Error(), "mkinitcpio") {
		t.Errorf("EnsureRootImage(mkinitcpio) = %v, want an error naming it", err)
	}
}

// TestMachine boots one disk three times: a clean reboot, a power cut
// without sync, and a boot that must find the file system replayed. It
// takes about three minutes and TestRootVolume (package tests) uses every
// part of a Machine in `just test`, so it runs when the rig itself is
// changed: DBD_VM_SELFTEST=1.
func TestMachine(t *testing.T) {
	if os.Getenv("DBD_VM_SELFTEST") == "" {
		t.Skip("the rig's own machine test: set DBD_VM_SELFTEST=1 (TestRootVolume covers machines in just test)")
	}
	RequireMachine(t, InitramfsTools)
	ctx := context.Background()
	dir := t.TempDir()
	t0 := time.Now()
	m, err := NewMachine(ctx, filepath.Join(dir, "m"), InitramfsTools)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("copied the root image in %v", time.Since(t0).Round(time.Millisecond))
	hostFile := filepath.Join(dir, "hello.txt")
	if err := os.WriteFile(hostFile, []byte("hello from the host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	boot := func(name string, cfg BootConfig) *Result {
		t.Helper()
		cfg.Logf, cfg.Timeout = t.Logf, 10*time.Minute
		t0 := time.Now()
		res, err := m.Boot(ctx, cfg)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		t.Logf("%s: booted to the step in %v (%d boots), off after %v, output:\n%s", name,
			res.BootTime.Round(time.Millisecond), res.Boots, time.Since(t0).Round(time.Millisecond), res.Output)
		return res
	}

	res := boot("boot 1", BootConfig{
		Files: map[string]string{"/in/hello.txt": hostFile},
		Script: `set -e
echo marker1 >/root/m1
cat /mnt/files/in/hello.txt
echo "state: $(systemctl is-system-running --wait || true)"
echo "uname: $(uname -r)"
echo "root: $(findmnt -no SOURCE,OPTIONS /)"
systemctl reboot
`,
	})
	if res.ExitCode != 0 || res.PoweredOff {
		t.Fatalf("boot 1: exit %d, powered off %v; console:\n%s", res.ExitCode, res.PoweredOff, tail(res.Console, 3000))
	}
	for _, want := range []string{"hello from the host", "state: running", "uname: " + m.Image.Release, "root: /dev/vda1 rw"} {
		if !strings.Contains(res.Output, want) {
			t.Errorf("boot 1 output lacks %q; console:\n%s", want, tail(res.Console, 3000))
		}
	}
	if b, err := m.ReadFile(ctx, "/root/m1"); err != nil || string(b) != "marker1\n" {
		t.Errorf("ReadFile(/root/m1) on the host = %q, %v", b, err)
	}

	res = boot("boot 2", BootConfig{
		PowerCut: true,
		Script: `cat /root/m1
echo marker2 >/root/m2
echo cutting
echo b >/proc/sysrq-trigger
sleep 60
`,
	})
	if !res.PoweredOff || !strings.Contains(res.Output, "marker1") || !strings.Contains(res.Output, "cutting") {
		t.Fatalf("boot 2: powered off %v, exit %d; want a power cut after marker1; console:\n%s", res.PoweredOff, res.ExitCode, tail(res.Console, 3000))
	}

	res = boot("boot 3", BootConfig{
		Script: `cat /root/m1
ls /root
echo "state: $(systemctl is-system-running --wait || true)"
exit 3
`,
	})
	if res.ExitCode != 3 || !strings.Contains(res.Output, "marker1") || !strings.Contains(res.Output, "state: running") {
		t.Errorf("boot 3: exit %d, want 3 after marker1 and a running system; console:\n%s", res.ExitCode, tail(res.Console, 3000))
	}
}

// systemd expands % specifiers and $variables in unit files: the unit's
// shell command must contain neither.
func TestStepUnitText(t *testing.T) {
	u := stepUnitText()
	if strings.ContainsAny(u, "%$") {
		t.Fatalf("unit text has %% or $:\n%s", u)
	}
	for _, want := range []string{"After=multi-user.target", "WantedBy=multi-user.target", "TTYPath=" + resultsTTY, "/mnt/files/" + stepWrapper} {
		if !strings.Contains(u, want) {
			t.Errorf("unit text lacks %q", want)
		}
	}
}

func TestFilesDisk(t *testing.T) {
	for _, tool := range []string{"mke2fs", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skip(err)
		}
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(filepath.Join(src, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "sub", "b"), []byte("bee"), 0o600); err != nil {
		t.Fatal(err)
	}
	one := filepath.Join(dir, "one")
	if err := os.WriteFile(one, []byte("one"), 0o755); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "files.img")
	ctx := context.Background()
	err := writeFilesDisk(ctx, img, filepath.Join(dir, "staging"), map[string]string{"/a/one": one, "/tree": src}, "echo hi\n")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "staging")); !os.IsNotExist(err) {
		t.Errorf("staging dir left behind: %v", err)
	}
	for p, want := range map[string]string{"/a/one": "one", "/tree/sub/b": "bee", "/" + stepScript: "echo hi\n", "/" + stepWrapper: stepWrapperScript()} {
		out, err := exec.Command("debugfs", "-R", "cat "+p, img).Output()
		if err != nil || string(out) != want {
			t.Errorf("%s on the files disk = %q, %v; want %q", p, out, err, want)
		}
	}
}

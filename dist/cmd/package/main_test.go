package main

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dbdublk/dbdublk/internal/protocol"
	"github.com/dbdublk/dbdublk/internal/testmain"
)

func TestMain(m *testing.M) { testmain.Run(m) }

// wantFiles is what every package must install.
var wantFiles = []string{binaryPath, unitPath, modulesPath, manPagePath, readmePath,
	initramfsHookPath, initramfsScriptPath, dracutSetupPath, dracutHookPath, shutdownHookPath, udevRulesPath}

// TestPackages builds both packages and reads them back with the
// distributions' own tools: dpkg-deb for the .deb, rpm for the .rpm.
func TestPackages(t *testing.T) {
	if testing.Short() {
		t.Skip("builds dbdctl and both packages")
	}
	t.Chdir("../../..")
	out := t.TempDir()
	paths, err := build(out, []string{"deb", "rpm"})
	if err != nil {
		t.Fatal(err)
	}
	if len(paths) != 2 || !strings.HasSuffix(paths[0], ".deb") || !strings.HasSuffix(paths[1], ".rpm") {
		t.Fatalf("built %v, want a .deb and an .rpm", paths)
	}

	t.Run("deb", func(t *testing.T) {
		deb := paths[0]
		control := output(t, "dpkg-deb", "--field", deb, "Package", "Version", "Architecture")
		for _, want := range []string{"Package: dbdctl", "Version: " + protocol.Version + "-1"} {
			if !strings.Contains(control, want) {
				t.Errorf("control lacks %q:\n%s", want, control)
			}
		}
		listed := output(t, "dpkg-deb", "--contents", deb) + "\n"
		for _, f := range wantFiles {
			if !strings.Contains(listed, "."+f+"\n") {
				t.Errorf("the .deb does not install %s:\n%s", f, listed)
			}
		}
		root := t.TempDir()
		output(t, "dpkg-deb", "--extract", deb, root)
		checkStatic(t, filepath.Join(root, binaryPath))
		if b, err := os.ReadFile(filepath.Join(root, modulesPath)); err != nil || !strings.Contains(string(b), "\nublk_drv\n") {
			t.Errorf("%s does not load ublk_drv: %q %v", modulesPath, b, err)
		}
		if v := output(t, filepath.Join(root, binaryPath), "version"); !strings.Contains(v, protocol.Version) {
			t.Errorf("the packaged binary says %q", v)
		}
		if _, err := exec.LookPath("systemd-analyze"); err == nil {
			// The unit as installed: its commands exist in the package.
			output(t, "systemd-analyze", "verify", "--man=no", "--root="+root, unitPath)
		}
		if _, err := exec.LookPath("man"); err == nil {
			page := output(t, "man", "-l", filepath.Join(root, manPagePath))
			if !strings.Contains(page, "transition-to-incremental") {
				t.Errorf("the packaged man page does not render the commands:\n%s", page)
			}
		}
		scripts := t.TempDir()
		output(t, "dpkg-deb", "--control", deb, scripts)
		for _, s := range []string{"postinst", "prerm"} {
			fi, err := os.Stat(filepath.Join(scripts, s))
			if err != nil || fi.Mode()&0o111 == 0 {
				t.Errorf("the .deb has no executable %s: %v", s, err)
			}
		}
	})

	t.Run("rpm", func(t *testing.T) {
		if _, err := exec.LookPath("rpm"); err != nil {
			t.Skip("rpm is not installed (scripts/setup test installs it)")
		}
		rpm := paths[1]
		if v := output(t, "rpm", "-qp", "--queryformat", "%{NAME} %{VERSION}", rpm); v != "dbdctl "+protocol.Version {
			t.Errorf("rpm says %q", v)
		}
		listed := output(t, "rpm", "-qlp", rpm) + "\n"
		for _, f := range wantFiles {
			if !strings.Contains(listed, f+"\n") {
				t.Errorf("the .rpm does not install %s:\n%s", f, listed)
			}
		}
		scripts := output(t, "rpm", "-qp", "--scripts", rpm)
		for _, want := range []string{"postinstall scriptlet", "preuninstall scriptlet", "systemctl enable dbdctl.service"} {
			if !strings.Contains(scripts, want) {
				t.Errorf("the .rpm's scripts lack %q:\n%s", want, scripts)
			}
		}
	})
}

// TestScripts runs the install scripts' argument handling with systemctl
// and modprobe replaced by recorders: a first install enables the unit,
// an upgrade does not, a removal disables it, an upgrade's removal step
// leaves it, and nothing ever stops or restarts it (that would detach
// every device).
func TestScripts(t *testing.T) {
	bin := t.TempDir()
	log := filepath.Join(t.TempDir(), "calls")
	for _, name := range []string{"systemctl", "modprobe"} {
		script := "#!/bin/sh\necho " + name + " \"$@\" >> " + log + "\n"
		if err := os.WriteFile(filepath.Join(bin, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		script string
		args   []string
		want   string
	}{
		{"postinstall.sh", []string{"configure", ""}, "systemctl enable dbdctl.service"},
		{"postinstall.sh", []string{"configure", "0.0.9-1"}, ""},
		{"postinstall.sh", []string{"1"}, "systemctl enable dbdctl.service"},
		{"postinstall.sh", []string{"2"}, ""},
		{"preremove.sh", []string{"remove"}, "systemctl disable dbdctl.service"},
		{"preremove.sh", []string{"upgrade", "0.2.0-1"}, ""},
		{"preremove.sh", []string{"0"}, "systemctl disable dbdctl.service"},
		{"preremove.sh", []string{"1"}, ""},
	} {
		os.Remove(log)
		cmd := exec.Command("sh", append([]string{filepath.Join("..", "..", "scripts", c.script)}, c.args...)...)
		cmd.Env = append(os.Environ(), "PATH="+bin+":/usr/bin:/bin")
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s %v: %v: %s", c.script, c.args, err, b)
		}
		calls, _ := os.ReadFile(log)
		for _, line := range strings.Split(strings.TrimSpace(string(calls)), "\n") {
			if strings.HasPrefix(line, "systemctl stop") || strings.HasPrefix(line, "systemctl restart") {
				t.Errorf("%s %v ran %q", c.script, c.args, line)
			}
		}
		enables := strings.Contains(string(calls), "systemctl enable") || strings.Contains(string(calls), "systemctl disable")
		switch {
		case c.want != "" && !strings.Contains(string(calls), c.want):
			t.Errorf("%s %v did not run %q; ran:\n%s", c.script, c.args, c.want, calls)
		case c.want == "" && enables:
			t.Errorf("%s %v changed the unit's enablement on an upgrade:\n%s", c.script, c.args, calls)
		}
	}
}

// checkStatic fails unless path is an ELF executable with no program
// interpreter: it must run in an initramfs with no libc.
func checkStatic(t *testing.T, path string) {
	t.Helper()
	f, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("%s is dynamically linked", path)
		}
	}
}

func output(t *testing.T, name string, args ...string) string {
	t.Helper()
	b, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, b)
	}
	return strings.TrimSpace(string(b))
}

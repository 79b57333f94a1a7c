package vm

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cavaliergopher/cpio"
)

// cachedKernel returns the default kernel if it is already in the cache;
// host unit tests use it when present but never download it.
func cachedKernel(t *testing.T) *Kernel {
	t.Helper()
	cache, err := CacheDir()
	if err != nil {
		t.Skip(err)
	}
	v := KernelSeries("")
	k, err := loadKernel(filepath.Join(cache, "kernel-"+v), v)
	if err != nil {
		t.Skipf("kernel %s not cached (go run ./tests/vm/cmd/fetch-kernel): %v", v, err)
	}
	return k
}

func TestParseModinfo(t *testing.T) {
	data := []byte("license=GPL\x00depends=libcrc32c,foo-bar\x00\x00name=xfs\x00alias=fs-xfs\x00intree=Y\x00")
	mi := parseModinfo(data)
	if mi.Name != "xfs" || !slices.Equal(mi.Depends, []string{"libcrc32c", "foo_bar"}) || !slices.Equal(mi.Aliases, []string{"fs-xfs"}) {
		t.Fatalf("parseModinfo = %+v", mi)
	}
	if mi := parseModinfo([]byte("depends=\x00name=loop\x00")); len(mi.Depends) != 0 {
		t.Fatalf("empty depends parsed as %q", mi.Depends)
	}
}

func TestReadModinfoRealModule(t *testing.T) {
	k := cachedKernel(t)
	ix, err := loadModuleIndex(k.ModulesDir)
	if err != nil {
		t.Fatal(err)
	}
	rel, ok := ix.path["xfs"]
	if !ok {
		t.Fatal("xfs not in modules.dep")
	}
	mi, err := readModinfo(filepath.Join(k.ModulesDir, rel))
	if err != nil {
		t.Fatal(err)
	}
	if mi.Name != "xfs" || !slices.Contains(mi.Aliases, "fs-xfs") {
		t.Fatalf("xfs modinfo = %+v", mi)
	}
	for _, d := range mi.Depends {
		if !slices.Contains(ix.deps["xfs"], d) {
			t.Errorf("xfs depends on %s but modules.dep lists %v", d, ix.deps["xfs"])
		}
	}
	if _, ok := ix.path["virtio_blk"]; !ok {
		t.Error("virtio_blk not in modules.dep")
	}
}

// A small graph: a -> b, c; b -> d; c -> d; e standalone; f builtin.
func testIndex(t *testing.T) *moduleIndex {
	t.Helper()
	direct := map[string][]string{"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": nil, "e_x": nil}
	ix := newModuleIndex()
	for n := range direct {
		ix.path[n] = "kernel/m/" + strings.ReplaceAll(n, "_", "-") + ".ko"
		deps, err := transitiveDeps(n, direct)
		if err != nil {
			t.Fatal(err)
		}
		ix.deps[n] = deps
	}
	ix.aliases["a"] = []string{"fs-a", "devname:a-ctl"}
	ix.builtin["f"] = true
	return ix
}

func TestModulesDepGeneration(t *testing.T) {
	ix := testIndex(t)
	names, err := ix.closure([]string{"a", "f", "e-x"})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"a", "b", "c", "d", "e_x"}; !slices.Equal(names, want) {
		t.Fatalf("closure = %v, want %v", names, want)
	}
	var buf bytes.Buffer
	if err := ix.writeDep(&buf, names); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	// busybox modprobe loads the listed deps from the end: d must come last.
	if lines[0] != "kernel/m/a.ko: kernel/m/b.ko kernel/m/c.ko kernel/m/d.ko" && lines[0] != "kernel/m/a.ko: kernel/m/c.ko kernel/m/b.ko kernel/m/d.ko" {
		t.Fatalf("a's modules.dep line = %q", lines[0])
	}
	if lines[4] != "kernel/m/e-x.ko:" {
		t.Fatalf("e-x line = %q", lines[4])
	}
	back := newModuleIndex()
	if err := back.parseDep(&buf); err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if back.path[n] != ix.path[n] || !slices.Equal(back.deps[n], ix.deps[n]) {
			t.Errorf("round trip of %s: %q %v, want %q %v", n, back.path[n], back.deps[n], ix.path[n], ix.deps[n])
		}
	}
	buf.Reset()
	ix.writeAlias(&buf, names)
	if buf.String() != "alias fs-a a\nalias devname:a-ctl a\n" {
		t.Fatalf("modules.alias = %q", buf.String())
	}
	if _, err := ix.closure([]string{"nope"}); err == nil {
		t.Fatal("closure of an unknown module succeeded")
	}
}

func TestTransitiveDepsErrors(t *testing.T) {
	if _, err := transitiveDeps("a", map[string][]string{"a": {"b"}, "b": {"a"}}); err == nil {
		t.Error("cycle not reported")
	}
	if _, err := transitiveDeps("a", map[string][]string{"a": {"missing"}}); err == nil {
		t.Error("missing dependency not reported")
	}
}

func TestParseLdd(t *testing.T) {
	out := `	linux-vdso.so.1 (0x00007ffc5a1f2000)
	libuuid.so.1 => /lib/x86_64-linux-gnu/libuuid.so.1 (0x00007f0c1a0e0000)
	libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c19eff000)
	/lib64/ld-linux-x86-64.so.2 (0x00007f0c1a124000)
`
	libs, err := parseLdd(out)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"/lib/x86_64-linux-gnu/libuuid.so.1", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"}
	if !slices.Equal(libs, want) {
		t.Fatalf("parseLdd = %v, want %v", libs, want)
	}
	if libs, err := parseLdd("\tnot a dynamic executable\n"); err != nil || libs != nil {
		t.Fatalf("static: %v %v", libs, err)
	}
	if _, err := parseLdd("\tlibfoo.so.1 => not found\n"); err == nil {
		t.Fatal("missing library not reported")
	}
}

func TestSharedLibsHost(t *testing.T) {
	const prog = "/bin/ls"
	interp, isELF := elfInterpreter(prog)
	if !isELF || interp == "" {
		t.Skipf("%s is not a dynamic ELF here", prog)
	}
	libs, err := sharedLibs(prog)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(libs, interp) {
		t.Errorf("libs %v lack interpreter %s", libs, interp)
	}
	if !slices.ContainsFunc(libs, func(l string) bool { return strings.Contains(l, "libc.so") }) {
		t.Errorf("libs %v lack libc", libs)
	}
	if libs, err := sharedLibs("/bin/busybox"); err == nil && libs != nil {
		t.Errorf("static busybox reported libraries %v", libs)
	}
}

// readCpio returns the archive's entries by name.
func readCpio(t *testing.T, r io.Reader) (map[string]*cpio.Header, map[string][]byte, []string) {
	t.Helper()
	hdrs, data := map[string]*cpio.Header{}, map[string][]byte{}
	var order []string
	cr := cpio.NewReader(r)
	for {
		h, err := cr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(cr)
		if err != nil {
			t.Fatal(err)
		}
		hdrs[h.Name], data[h.Name] = h, b
		order = append(order, h.Name)
	}
	return hdrs, data, order
}

func TestArchiveContents(t *testing.T) {
	host := filepath.Join(t.TempDir(), "tool")
	if err := os.WriteFile(host, []byte("#!/bin/sh\necho hi\n"), 0o750); err != nil {
		t.Fatal(err)
	}
	a := newArchive()
	a.dir("/tmp", 0o777|os.ModeSticky)
	a.data("/etc/x/y.conf", []byte("k=v\n"), 0o600)
	a.symlink("/etc/mtab", "/proc/mounts")
	if err := a.file("/usr/local/bin/tool", host); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := a.write(&buf); err != nil {
		t.Fatal(err)
	}
	hdrs, data, order := readCpio(t, &buf)
	check := func(name string, mode cpio.FileMode) {
		t.Helper()
		h, ok := hdrs[name]
		if !ok {
			t.Fatalf("%s missing; have %v", name, order)
		}
		if h.Mode != mode {
			t.Errorf("%s mode %o, want %o", name, h.Mode, mode)
		}
	}
	check("tmp", cpio.TypeDir|cpio.ModeSticky|0o777)
	check("etc", cpio.TypeDir|0o755)
	check("etc/x", cpio.TypeDir|0o755)
	check("etc/x/y.conf", cpio.TypeReg|0o600)
	check("etc/mtab", cpio.TypeSymlink|0o777)
	check("usr/local/bin/tool", cpio.TypeReg|0o750)
	if hdrs["etc/mtab"].Linkname != "/proc/mounts" {
		t.Errorf("mtab -> %q", hdrs["etc/mtab"].Linkname)
	}
	if string(data["usr/local/bin/tool"]) != "#!/bin/sh\necho hi\n" || string(data["etc/x/y.conf"]) != "k=v\n" {
		t.Error("file contents differ")
	}
	seen := map[string]bool{}
	for _, n := range order {
		if d := filepath.Dir(n); d != "." && !seen[d] {
			t.Errorf("%s written before its directory %s", n, d)
		}
		seen[n] = true
	}
}

func TestBuildInitramfs(t *testing.T) {
	k := cachedKernel(t)
	if _, err := os.Stat(hostBusybox); err != nil {
		t.Skip(err)
	}
	dd, err := lookProgram("dd") // coreutils dd must replace busybox's applet
	if err != nil {
		t.Skip(err)
	}
	tmp := t.TempDir()
	extra := filepath.Join(tmp, "extra")
	os.WriteFile(extra, []byte("data"), 0o640)
	os.MkdirAll(filepath.Join(tmp, "tree", "sub"), 0o755)
	os.WriteFile(filepath.Join(tmp, "tree", "sub", "f"), []byte("f"), 0o644)
	cfg := &Config{
		Programs: []string{"dd"},
		Modules:  []string{"xfs", "ext4"}, // ext4 is built in: no error, nothing shipped
		Files:    map[string]string{"/opt/extra": extra, "/srv/tree": filepath.Join(tmp, "tree")},
		Disks:    []Disk{{Path: "x"}},
		Script:   "echo hi",
	}
	a, err := buildInitramfs(k, cfg)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := a.write(&buf); err != nil {
		t.Fatal(err)
	}
	hdrs, data, _ := readCpio(t, &buf)
	mods := "lib/modules/" + k.Release + "/"
	for _, want := range []string{"init", "bin/busybox", "bin/sh", "sbin/modprobe", "dbd/script.sh", "opt/extra", "srv/tree/sub/f",
		strings.TrimPrefix(dd, "/"), "lib64/ld-linux-x86-64.so.2",
		mods + "kernel/fs/xfs/xfs.ko", mods + "kernel/drivers/block/virtio_blk.ko", mods + "modules.dep", mods + "modules.alias"} {
		if _, ok := hdrs[want]; !ok {
			t.Errorf("initramfs lacks %s", want)
		}
	}
	if h := hdrs["bin/sh"]; h != nil && h.Linkname != "/bin/busybox" {
		t.Errorf("/bin/sh -> %q", h.Linkname)
	}
	if h := hdrs["opt/extra"]; h != nil && h.Mode.Perm() != 0o640 {
		t.Errorf("/opt/extra mode %o", h.Mode.Perm())
	}
	for name, h := range hdrs {
		if filepath.Base(name) == "dd" && name != strings.TrimPrefix(dd, "/") && h.Linkname == "/bin/busybox" {
			t.Errorf("busybox applet %s still shadows %s", name, dd)
		}
	}
	dep := string(data[mods+"modules.dep"])
	if !strings.Contains(dep, "kernel/fs/xfs/xfs.ko:") || !strings.Contains(dep, "kernel/drivers/block/virtio_blk.ko:") {
		t.Errorf("modules.dep:\n%s", dep)
	}
	for _, line := range strings.Split(strings.TrimSpace(dep), "\n") {
		for _, f := range strings.Fields(strings.Replace(line, ":", " ", 1)) {
			if _, ok := hdrs[mods+f]; !ok {
				t.Errorf("modules.dep names %s, not in the initramfs", f)
			}
		}
	}
	if init := string(data["init"]); !strings.Contains(init, "for d in /dev/vda;") || !strings.Contains(init, "virtio_blk") || !strings.Contains(init, startMarker) {
		t.Errorf("init script:\n%s", init)
	}
}

func TestParseResults(t *testing.T) {
	out, code, err := parseResults("hello\nworld\n\n" + exitMarker + "7@@\n")
	if err != nil || out != "hello\nworld\n" || code != 7 {
		t.Fatalf("parseResults = %q %d %v", out, code, err)
	}
	out, code, err = parseResults("no newline\n" + exitMarker + "0@@\n")
	if err != nil || out != "no newline" || code != 0 {
		t.Fatalf("parseResults = %q %d %v", out, code, err)
	}
	if _, _, err := parseResults("partial output"); err == nil {
		t.Fatal("missing trailer not reported")
	}
	if _, _, err := parseResults(initFailMarker + "modprobe virtio_blk@@\n"); err == nil || !strings.Contains(err.Error(), "modprobe virtio_blk") {
		t.Fatalf("init failure: %v", err)
	}
}

func TestCrashDetection(t *testing.T) {
	early := "[ 0.5] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n[ 0.6] Kernel panic - not syncing: Fatal exception\n"
	if m := crashBeforeStart([]byte(early)); !strings.Contains(m, "int3") {
		t.Errorf("early crash: %q", m)
	}
	if m := crashBeforeStart([]byte("[ 0.5] int3: 0000 [#1] SMP\n")); m == "" {
		t.Error("6.1-style int3 oops not recognised")
	}
	late := "[ 1.0] boot\n" + startMarker + "\n[ 5.0] BUG: kernel NULL pointer dereference, address: 0\n"
	if m := crashBeforeStart([]byte(late)); m != "" {
		t.Errorf("late crash taken as early: %q", m)
	}
	if m := crashAfterStart([]byte(late)); !strings.HasPrefix(m, "[ 5.0] BUG: kernel NULL") {
		t.Errorf("late crash: %q", m)
	}
	if m := crashAfterStart([]byte("[ 1.0] boot\n" + startMarker + "\n[ 2.0] reboot: Power down\n")); m != "" {
		t.Errorf("clean boot flagged: %q", m)
	}
}

// crashWatch, fed a console that grows a few bytes at a time (markers and
// crash lines cut across reads), finds what crashAfterStart finds on the
// whole: a crash after the start marker, not one before it.
func TestCrashWatchIncremental(t *testing.T) {
	for _, c := range []struct {
		console string
		want    bool
	}{
		{"[ 0.5] BUG: early\n" + startMarker + "\n[ 2.0] fine\n[ 3.0] reboot: Power down\n", false},
		{"[ 1.0] boot\n" + startMarker + "\n[ 2.0] fine\n[ 5.0] BUG: kernel NULL pointer dereference\n", true},
		{"[ 1.0] boot\n" + startMarker + "\n" + strings.Repeat("[ 2.0] noise\n", 50) + "[ 9.0] Oops: 0000 [#1] SMP\n", true},
	} {
		for _, step := range []int{1, 3, 7, 100} {
			w := crashWatch{marker: -1}
			got := false
			for n := step; ; n += step {
				n = min(n, len(c.console))
				got = got || w.crashed([]byte(c.console[:n]))
				if n == len(c.console) {
					break
				}
			}
			if got != c.want || (crashAfterStart([]byte(c.console)) != "") != c.want {
				t.Errorf("console %q read %d bytes at a time: crashed %v, want %v", c.console, step, got, c.want)
			}
		}
	}
}

func TestMirrorFromSources(t *testing.T) {
	deb822 := `Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
# a comment
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
`
	if u := mirrorFromDeb822(deb822, "bookworm"); u != "http://mirror.example/debian" {
		t.Errorf("deb822 mirror = %q", u)
	}
	oneLine := "deb http://sec.example/debian-security bookworm-security main\n" +
		"deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n"
	if u := mirrorFromOneLine(oneLine, "bookworm"); u != "http://mirror.example/debian" {
		t.Errorf("one-line mirror = %q", u)
	}
}

func TestParseAptDepends(t *testing.T) {
	out := `linux-image-7.3.4+deb13-cloud-amd64
  PreDepends: linux-base
 |Depends: <dracut>
  Depends: linux-binary-7.3.4+deb13-cloud-amd64
  Depends: linux-modules-7.3.4+deb13-cloud-amd64
  Breaks: <fwupdate>
  Suggests: linux-doc-7.3
`
	want := []string{"linux-base", "linux-binary-7.3.4+deb13-cloud-amd64", "linux-modules-7.3.4+deb13-cloud-amd64"}
	if got := parseAptDepends(out); !slices.Equal(got, want) {
		t.Fatalf("parseAptDepends = %v, want %v", got, want)
	}
}

func TestBootSmoke(t *testing.T) {
	Require(t)
	res, err := Run(context.Background(), Config{
		Programs: []string{"mkfs.ext4", "e2fsck", "fio"},
		Modules:  []string{"ublk_drv", "xfs"},
		Disks:    []Disk{{Path: filepath.Join(t.TempDir(), "disk.img"), Size: 64 << 20}},
		Script: `modprobe ublk_drv && test -c /dev/ublk-control && echo ublk-control ok &&
mkfs.ext4 -q /dev/vda && mount /dev/vda /mnt && echo hello > /mnt/x && umount /mnt &&
e2fsck -fn /dev/vda && fio --version && exit 7
echo "a step failed" >&2
exit 1`,
		Logf: t.Logf,
	})
	if err != nil {
		if res != nil {
			t.Logf("output:\n%s", res.Output)
		}
		t.Fatal(err)
	}
	t.Logf("boots %d, boot time %v", res.Boots, res.BootTime)
	if res.ExitCode != 7 {
		t.Fatalf("exit code %d, want 7; output:\n%s\nconsole:\n%s", res.ExitCode, res.Output, res.Console)
	}
	for _, want := range []string{"ublk-control ok", "/dev/vda: 12/", "fio-"} {
		if !strings.Contains(res.Output, want) {
			t.Errorf("output lacks %q:\n%s", want, res.Output)
		}
	}
	if !strings.Contains(res.Console, startMarker) {
		t.Errorf("console lacks the start marker:\n%s", res.Console)
	}
}

// A kernel crash while the script runs is a real failure, not a retry.
func TestBootKernelCrash(t *testing.T) {
	Require(t)
	res, err := Run(context.Background(), Config{
		Script: "echo before; echo c > /proc/sysrq-trigger; sleep 30; echo after",
		Logf:   t.Logf,
	})
	if err == nil || !strings.Contains(err.Error(), "crashed while the script ran") {
		t.Fatalf("want a crash error, got %v", err)
	}
	if res == nil || res.Boots != 1 || !strings.Contains(res.Console, "sysrq") {
		t.Fatalf("result %+v", res)
	}
}

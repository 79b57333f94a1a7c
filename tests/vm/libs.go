package vm

import (
	"debug/elf"
	"fmt"
	"os/exec"
	"strings"
	"sync"
)

// Host programs copied into the guest keep working only if their shared
// libraries and ELF interpreter come along at the same absolute paths.

// elfInterpreter returns the PT_INTERP path of a dynamically linked ELF file,
// "" for a static ELF, and ok=false if path is not ELF at all (a script).
func elfInterpreter(path string) (interp string, ok bool) {
	f, err := elf.Open(path)
	if err != nil {
		return "", false
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_INTERP {
			continue
		}
		b := make([]byte, p.Filesz)
		if _, err := p.ReadAt(b, 0); err != nil {
			return "", true
		}
		return strings.TrimRight(string(b), "\x00"), true
	}
	return "", true
}

// lddCache remembers ldd answers: the same programs go into every VM.
var lddCache sync.Map // path -> []string

// sharedLibs returns the absolute paths of every library a dynamic ELF file
// loads, including its interpreter, as the host's ldd resolves them.
func sharedLibs(path string) ([]string, error) {
	interp, isELF := elfInterpreter(path)
	if !isELF || interp == "" {
		return nil, nil
	}
	if v, ok := lddCache.Load(path); ok {
		return v.([]string), nil
	}
	out, err := exec.Command("ldd", path).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("vm: ldd %s: %v\n%s", path, err, out)
	}
	libs, err := parseLdd(string(out))
	if err != nil {
		return nil, fmt.Errorf("vm: ldd %s: %w", path, err)
	}
	libs = appendUnique(libs, interp)
	lddCache.Store(path, libs)
	return libs, nil
}

// parseLdd extracts library paths from ldd output lines such as
//
//	libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)
//	/lib64/ld-linux-x86-64.so.2 (0x...)
//	linux-vdso.so.1 (0x...)
//
// The vDSO has no file and is skipped; an unresolved library is an error
// because the program would not start in the guest.
func parseLdd(out string) ([]string, error) {
	var libs []string
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		if strings.Contains(line, "not a dynamic executable") || strings.Contains(line, "statically linked") {
			return nil, nil
		}
		if lib, target, ok := strings.Cut(line, "=>"); ok {
			target = strings.TrimSpace(target)
			if strings.HasPrefix(target, "not found") {
				return nil, fmt.Errorf("library %s not found", strings.TrimSpace(lib))
			}
			if p := strings.Fields(target); len(p) > 0 && strings.HasPrefix(p[0], "/") {
				libs = appendUnique(libs, p[0])
			}
			continue
		}
		if p := strings.Fields(line); len(p) > 0 && strings.HasPrefix(p[0], "/") {
			libs = appendUnique(libs, p[0])
		}
	}
	return libs, nil
}

func appendUnique(s []string, v string) []string {
	for _, x := range s {
		if x == v {
			return s
		}
	}
	return append(s, v)
}

package vm

import (
	"bufio"
	"bytes"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// The guest has only busybox modprobe, and Debian's packages ship no
// modules.dep, so the rig computes dependencies itself from each module's
// .modinfo section and writes the depmod text formats busybox reads.

// modinfo is the part of a module's .modinfo section the rig needs.
type modinfo struct {
	Name    string
	Depends []string
	Aliases []string
}

// readModinfo reads the .modinfo section of an uncompressed .ko file.
func readModinfo(path string) (modinfo, error) {
	f, err := elf.Open(path)
	if err != nil {
		return modinfo{}, err
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return modinfo{}, fmt.Errorf("vm: %s has no .modinfo section", path)
	}
	data, err := sec.Data()
	if err != nil {
		return modinfo{}, fmt.Errorf("vm: %s: %w", path, err)
	}
	mi := parseModinfo(data)
	if mi.Name == "" {
		mi.Name = moduleName(path)
	}
	return mi, nil
}

// parseModinfo decodes NUL-separated key=value records.
func parseModinfo(data []byte) modinfo {
	var mi modinfo
	for _, rec := range bytes.Split(data, []byte{0}) {
		k, v, ok := strings.Cut(string(rec), "=")
		if !ok {
			continue
		}
		switch k {
		case "name":
			mi.Name = v
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d = strings.TrimSpace(d); d != "" {
					mi.Depends = append(mi.Depends, normalizeModName(d))
				}
			}
		case "alias":
			mi.Aliases = append(mi.Aliases, v)
		}
	}
	return mi
}

// moduleName derives a module's name from its file name: the kernel treats
// '-' and '_' alike in module names and reports them with '_'.
func moduleName(path string) string {
	base := filepath.Base(path)
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return normalizeModName(base)
}

func normalizeModName(s string) string { return strings.ReplaceAll(s, "-", "_") }

// moduleIndex describes the modules of one kernel.
type moduleIndex struct {
	path    map[string]string   // name -> "kernel/drivers/block/ublk_drv.ko"
	deps    map[string][]string // name -> all transitive deps, load order reversed (depmod style)
	aliases map[string][]string // name -> alias patterns
	builtin map[string]bool     // names compiled into the kernel image
}

func newModuleIndex() *moduleIndex {
	return &moduleIndex{
		path:    map[string]string{},
		deps:    map[string][]string{},
		aliases: map[string][]string{},
		builtin: map[string]bool{},
	}
}

// scanModules builds the index of every .ko below dir from ELF metadata.
func scanModules(dir string) (*moduleIndex, error) {
	ix := newModuleIndex()
	direct := map[string][]string{}
	err := filepath.WalkDir(filepath.Join(dir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".ko") {
			return err
		}
		mi, err := readModinfo(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		ix.path[mi.Name] = filepath.ToSlash(rel)
		direct[mi.Name] = mi.Depends
		ix.aliases[mi.Name] = mi.Aliases
		return nil
	})
	if err != nil {
		return nil, err
	}
	for name := range ix.path {
		deps, err := transitiveDeps(name, direct)
		if err != nil {
			return nil, err
		}
		ix.deps[name] = deps
	}
	ix.builtin = readBuiltin(dir)
	return ix, nil
}

// transitiveDeps returns every module name needs, ordered so that each one
// comes before its own dependencies. Busybox modprobe loads the list from
// the end, as depmod's modules.dep expects.
func transitiveDeps(name string, direct map[string][]string) ([]string, error) {
	var post []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(string) error
	visit = func(m string) error {
		switch state[m] {
		case 1:
			return fmt.Errorf("vm: module dependency cycle at %s", m)
		case 2:
			return nil
		}
		state[m] = 1
		deps, ok := direct[m]
		if !ok {
			return fmt.Errorf("vm: module %s needs %s, which is not in the package", name, m)
		}
		for _, d := range deps {
			if err := visit(d); err != nil {
				return err
			}
		}
		state[m] = 2
		post = append(post, m)
		return nil
	}
	if err := visit(name); err != nil {
		return nil, err
	}
	post = post[:len(post)-1] // drop name itself, which is visited last
	for i, j := 0, len(post)-1; i < j; i, j = i+1, j-1 {
		post[i], post[j] = post[j], post[i]
	}
	return post, nil
}

// readBuiltin lists the modules compiled in, so asking for one is not an error.
func readBuiltin(dir string) map[string]bool {
	b := map[string]bool{}
	data, err := os.ReadFile(filepath.Join(dir, "modules.builtin"))
	if err != nil {
		return b
	}
	for _, line := range strings.Fields(string(data)) {
		b[moduleName(line)] = true
	}
	return b
}

// loadModuleIndex reads the files writeFiles left in the cache, which is much
// cheaper than opening every module again.
func loadModuleIndex(dir string) (*moduleIndex, error) {
	ix := newModuleIndex()
	f, err := os.Open(filepath.Join(dir, "modules.dep"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := ix.parseDep(f); err != nil {
		return nil, err
	}
	if a, err := os.Open(filepath.Join(dir, "modules.alias")); err == nil {
		defer a.Close()
		sc := bufio.NewScanner(a)
		for sc.Scan() {
			if f := strings.Fields(sc.Text()); len(f) == 3 && f[0] == "alias" {
				ix.aliases[f[2]] = append(ix.aliases[f[2]], f[1])
			}
		}
	}
	ix.builtin = readBuiltin(dir)
	return ix, nil
}

// parseDep reads modules.dep lines: "kernel/a.ko: kernel/b.ko kernel/c.ko".
func (ix *moduleIndex) parseDep(r io.Reader) error {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		mod, rest, ok := strings.Cut(line, ":")
		if !ok {
			return fmt.Errorf("vm: bad modules.dep line %q", line)
		}
		name := moduleName(mod)
		ix.path[name] = mod
		var deps []string
		for _, d := range strings.Fields(rest) {
			deps = append(deps, moduleName(d))
		}
		ix.deps[name] = deps
	}
	return sc.Err()
}

// names lists all indexed modules, sorted.
func (ix *moduleIndex) names() []string {
	n := make([]string, 0, len(ix.path))
	for k := range ix.path {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

// closure expands the requested modules with their dependencies. Built-in
// modules are dropped; unknown ones are an error naming the kernel.
func (ix *moduleIndex) closure(want []string) ([]string, error) {
	set := map[string]bool{}
	for _, w := range want {
		name := moduleName(w)
		if _, ok := ix.path[name]; !ok {
			if ix.builtin[name] {
				continue
			}
			return nil, fmt.Errorf("vm: kernel has no module %q", w)
		}
		set[name] = true
		for _, d := range ix.deps[name] {
			set[d] = true
		}
	}
	out := make([]string, 0, len(set))
	for k := range set {
		out = append(out, k)
	}
	sort.Strings(out)
	return out, nil
}

// writeDep writes modules.dep for the given modules.
func (ix *moduleIndex) writeDep(w io.Writer, names []string) error {
	bw := bufio.NewWriter(w)
	for _, n := range names {
		fmt.Fprintf(bw, "%s:", ix.path[n])
		for _, d := range ix.deps[n] {
			fmt.Fprintf(bw, " %s", ix.path[d])
		}
		bw.WriteByte('\n')
	}
	return bw.Flush()
}

// writeAlias writes modules.alias, which lets the kernel's own module
// requests (e.g. mount -t xfs asking for "fs-xfs") find the module.
func (ix *moduleIndex) writeAlias(w io.Writer, names []string) error {
	bw := bufio.NewWriter(w)
	for _, n := range names {
		for _, a := range ix.aliases[n] {
			fmt.Fprintf(bw, "alias %s %s\n", a, n)
		}
	}
	return bw.Flush()
}

// writeFiles writes modules.dep and modules.alias for names into dir.
func (ix *moduleIndex) writeFiles(dir string, names []string) error {
	for file, fn := range map[string]func(io.Writer, []string) error{
		"modules.dep":   ix.writeDep,
		"modules.alias": ix.writeAlias,
	} {
		var buf bytes.Buffer
		if err := fn(&buf, names); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, file), buf.Bytes(), 0o644); err != nil {
			return err
		}
	}
	return nil
}

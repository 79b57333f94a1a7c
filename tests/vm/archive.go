package vm

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"

	"github.com/cavaliergopher/cpio"
)

// archive collects the files of an initramfs by guest path and writes them
// as a newc cpio. Later additions to a path replace earlier ones, so user
// supplied files override anything the rig added itself.
type archive struct {
	entries map[string]*archiveEntry // key: clean absolute guest path
}

type archiveEntry struct {
	mode cpio.FileMode // type and permission bits
	src  string        // host file to copy, for regular files
	data []byte        // inline content, for regular files without src
	link string        // symlink target
}

func newArchive() *archive { return &archive{entries: map[string]*archiveEntry{}} }

func (a *archive) put(p string, e *archiveEntry) {
	p = path.Clean("/" + p)
	a.mkdirAll(path.Dir(p))
	a.entries[p] = e
}

// mkdirAll adds p and its missing parents as 0755 directories.
func (a *archive) mkdirAll(p string) {
	for p = path.Clean("/" + p); p != "/"; p = path.Dir(p) {
		if _, ok := a.entries[p]; ok {
			return
		}
		a.entries[p] = &archiveEntry{mode: cpio.TypeDir | 0o755}
	}
}

func (a *archive) dir(p string, perm os.FileMode) {
	m := cpio.TypeDir | cpio.FileMode(perm.Perm())
	if perm&os.ModeSticky != 0 {
		m |= cpio.ModeSticky
	}
	a.put(p, &archiveEntry{mode: m})
}

func (a *archive) data(p string, b []byte, perm os.FileMode) {
	a.put(p, &archiveEntry{mode: cpio.TypeReg | cpio.FileMode(perm.Perm()), data: b})
}

func (a *archive) symlink(p, target string) {
	a.put(p, &archiveEntry{mode: cpio.TypeSymlink | 0o777, link: target})
}

// file adds host file src at guest path p, following symlinks and keeping
// the permission bits.
func (a *archive) file(p, src string) error {
	st, err := os.Stat(src)
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("vm: %s is not a regular file", src)
	}
	a.put(p, &archiveEntry{mode: cpio.TypeReg | cpio.FileMode(st.Mode().Perm()), src: src})
	return nil
}

func (a *archive) has(p string) bool {
	_, ok := a.entries[path.Clean("/"+p)]
	return ok
}

// paths returns all guest paths in write order. Lexical order puts every
// directory before its contents, which the kernel's unpacker needs.
func (a *archive) paths() []string {
	ps := make([]string, 0, len(a.entries))
	for p := range a.entries {
		ps = append(ps, p)
	}
	sort.Strings(ps)
	return ps
}

// write emits the archive as an uncompressed newc cpio: the kernel unpacks
// that fastest, and skipping compression keeps builds cheap.
func (a *archive) write(w io.Writer) error {
	bw := bufio.NewWriterSize(w, 1<<20)
	cw := cpio.NewWriter(bw)
	for _, p := range a.paths() {
		if err := a.writeEntry(cw, p, a.entries[p]); err != nil {
			return err
		}
	}
	if err := cw.Close(); err != nil {
		return err
	}
	return bw.Flush()
}

func (a *archive) writeEntry(cw *cpio.Writer, p string, e *archiveEntry) error {
	hdr := &cpio.Header{Name: strings.TrimPrefix(p, "/"), Mode: e.mode, Links: 1}
	switch {
	case e.mode&cpio.ModeType == cpio.TypeDir:
		hdr.Links = 2
		return cw.WriteHeader(hdr)
	case e.mode&cpio.ModeType == cpio.TypeSymlink:
		// newc stores the target as the entry's data.
		hdr.Size = int64(len(e.link))
		if err := cw.WriteHeader(hdr); err != nil {
			return err
		}
		_, err := io.WriteString(cw, e.link)
		return err
	case e.src == "":
		hdr.Size = int64(len(e.data))
		if err := cw.WriteHeader(hdr); err != nil {
			return err
		}
		_, err := cw.Write(e.data)
		return err
	}
	f, err := os.Open(e.src)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	hdr.Size = st.Size()
	if err := cw.WriteHeader(hdr); err != nil {
		return err
	}
	if _, err := io.CopyN(cw, f, hdr.Size); err != nil {
		return fmt.Errorf("vm: copy %s into initramfs: %w", e.src, err)
	}
	return nil
}

package vm

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// debianKeyring verifies the archive's Release files; it ships with apt on
// every Debian host.
const debianKeyring = "/usr/share/keyrings/debian-archive-keyring.gpg"

// aptRepo is a throw-away apt state directory pointed at one suite. It lets
// us resolve and download kernel packages of any Debian release without
// touching the host's apt configuration, lists or lock files.
type aptRepo struct {
	opts []string
}

// newAptRepo writes a one-line sources.list for suite under dir and runs
// apt-get update against it.
func newAptRepo(ctx context.Context, dir, suite string) (*aptRepo, error) {
	uri, err := debianMirror()
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(debianKeyring); err != nil {
		return nil, fmt.Errorf("vm: need %s (package debian-archive-keyring): %w", debianKeyring, err)
	}
	for _, d := range []string{"lists/partial", "cache/archives/partial"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	line := fmt.Sprintf("deb [signed-by=%s] %s %s main\n", debianKeyring, uri, suite)
	if err := os.WriteFile(filepath.Join(dir, "sources.list"), []byte(line), 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "status"), nil, 0o644); err != nil {
		return nil, err
	}
	a := &aptRepo{opts: []string{
		"-o", "Dir::State=" + dir,
		"-o", "Dir::State::Lists=" + filepath.Join(dir, "lists"),
		"-o", "Dir::State::status=" + filepath.Join(dir, "status"),
		"-o", "Dir::Cache=" + filepath.Join(dir, "cache"),
		"-o", "Dir::Etc::SourceList=" + filepath.Join(dir, "sources.list"),
		"-o", "Dir::Etc::SourceParts=/nonexistent",
		"-o", "Debug::NoLocking=1",
		// Downloads land in our own dir, which the _apt sandbox user
		// may not be able to write.
		"-o", "APT::Sandbox::User=root",
	}}
	if _, err := a.run(ctx, "apt-get", "-q", "update"); err != nil {
		return nil, err
	}
	return a, nil
}

func (a *aptRepo) run(ctx context.Context, tool string, args ...string) ([]byte, error) {
	return a.runIn(ctx, "", tool, args...)
}

func (a *aptRepo) runIn(ctx context.Context, dir, tool string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, tool, append(append([]string{}, a.opts...), args...)...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("vm: %s %s: %w\n%s", tool, strings.Join(args, " "), err, tail(stderr.String(), 2000))
	}
	return out, nil
}

// depends lists the real (non-virtual) packages pkg depends on.
func (a *aptRepo) depends(ctx context.Context, pkg string) ([]string, error) {
	out, err := a.run(ctx, "apt-cache", "depends", pkg)
	if err != nil {
		return nil, err
	}
	return parseAptDepends(string(out)), nil
}

// download fetches the .deb files of pkgs into dir.
func (a *aptRepo) download(ctx context.Context, dir string, pkgs ...string) error {
	_, err := a.runIn(ctx, dir, "apt-get", append([]string{"-q", "download"}, pkgs...)...)
	return err
}

// parseAptDepends extracts Depends/PreDepends targets from `apt-cache
// depends` output, skipping virtual packages (shown as <name>).
func parseAptDepends(out string) []string {
	var pkgs []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(strings.TrimLeft(line, " |"))
		if len(f) != 2 || (f[0] != "Depends:" && f[0] != "PreDepends:") {
			continue
		}
		if strings.HasPrefix(f[1], "<") {
			continue
		}
		pkgs = append(pkgs, f[1])
	}
	return pkgs
}

// debianMirror returns the archive URI the host itself uses, so the rig
// works behind whatever mirror or proxy the machine is set up with.
// $DBD_APT_URI overrides it (e.g. on a non-Debian host).
func debianMirror() (string, error) {
	if u := os.Getenv("DBD_APT_URI"); u != "" {
		return u, nil
	}
	codename := hostCodename()
	if b, err := os.ReadFile("/etc/apt/sources.list.d/debian.sources"); err == nil {
		if u := mirrorFromDeb822(string(b), codename); u != "" {
			return u, nil
		}
	}
	if paths, _ := filepath.Glob("/etc/apt/sources.list.d/*.sources"); len(paths) > 0 {
		for _, p := range paths {
			if b, err := os.ReadFile(p); err == nil {
				if u := mirrorFromDeb822(string(b), codename); u != "" {
					return u, nil
				}
			}
		}
	}
	if b, err := os.ReadFile("/etc/apt/sources.list"); err == nil {
		if u := mirrorFromOneLine(string(b), codename); u != "" {
			return u, nil
		}
	}
	return "", fmt.Errorf("vm: found no Debian archive URI in the host's apt sources; set DBD_APT_URI")
}

func hostCodename() string {
	b, err := os.ReadFile("/etc/os-release")
	if err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "VERSION_CODENAME="); ok && v != "" {
				return strings.Trim(v, `"`)
			}
		}
	}
	return "bookworm"
}

// isMainSuite reports whether suite is the release itself rather than its
// -security or -updates pocket, which live on other hosts or carry no kernels.
func isMainSuite(suite, codename string) bool {
	return suite == codename
}

// mirrorFromDeb822 picks the URIs of the stanza carrying the host's main suite.
func mirrorFromDeb822(text, codename string) string {
	for _, stanza := range strings.Split(text, "\n\n") {
		fields := map[string]string{}
		sc := bufio.NewScanner(strings.NewReader(stanza))
		for sc.Scan() {
			k, v, ok := strings.Cut(sc.Text(), ":")
			if ok && !strings.HasPrefix(k, "#") && !strings.HasPrefix(k, " ") {
				fields[strings.ToLower(strings.TrimSpace(k))] = strings.TrimSpace(v)
			}
		}
		if fields["enabled"] == "no" || !strings.Contains(" "+fields["types"]+" ", " deb ") {
			continue
		}
		for _, s := range strings.Fields(fields["suites"]) {
			if isMainSuite(s, codename) {
				if uris := strings.Fields(fields["uris"]); len(uris) > 0 {
					return strings.TrimRight(uris[0], "/")
				}
			}
		}
	}
	return ""
}

// mirrorFromOneLine handles classic `deb [opts] URI suite comp...` lines.
func mirrorFromOneLine(text, codename string) string {
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		rest, ok := strings.CutPrefix(line, "deb ")
		if !ok {
			continue
		}
		rest = strings.TrimSpace(rest)
		if strings.HasPrefix(rest, "[") {
			if i := strings.Index(rest, "]"); i >= 0 {
				rest = rest[i+1:]
			}
		}
		f := strings.Fields(rest)
		if len(f) >= 2 && isMainSuite(f[1], codename) {
			return strings.TrimRight(f[0], "/")
		}
	}
	return ""
}

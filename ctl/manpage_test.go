package ctl

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestManPage renders dbdctl(8) with man(1) and checks that every
// subcommand, alias, argument and option the parser accepts is in the
// rendered page, and that no hidden command is.
func TestManPage(t *testing.T) {
	man, err := exec.LookPath("man")
	if err != nil {
		t.Skip("man(1) is not installed (scripts/setup test installs man-db)")
	}
	code, src, stderr := run("man-page")
	if code != 0 {
		t.Fatalf("man-page: exit %d: %s", code, stderr)
	}
	page := filepath.Join(t.TempDir(), "dbdctl.8")
	if err := os.WriteFile(page, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(man, "--warnings", "-l", page)
	cmd.Env = append(os.Environ(), "MANWIDTH=200", "MAN_KEEP_FORMATTING=0", "MANPAGER=cat", "PAGER=cat")
	var rendered, warnings bytes.Buffer
	cmd.Stdout, cmd.Stderr = &rendered, &warnings
	if err := cmd.Run(); err != nil {
		t.Fatalf("man -l: %v: %s", err, warnings.String())
	}
	if warnings.Len() != 0 {
		t.Errorf("groff warns about the page:\n%s", warnings.String())
	}
	// Overstrike bold and underline (man without a terminal) read as text.
	text := regexp.MustCompile(".\b").ReplaceAllString(rendered.String(), "")

	var cli CLI
	parser, err := newParser(&cli)
	if err != nil {
		t.Fatal(err)
	}
	seen := 0
	for _, n := range parser.Model.Children {
		if n.Hidden {
			if strings.Contains(text, "\n       "+n.Name+" ") || strings.Contains(text, "\n       "+n.Name+"\n") {
				t.Errorf("hidden command %s is in the page", n.Name)
			}
			continue
		}
		seen++
		// A command's entry starts its usage line at the first indent.
		if !regexp.MustCompile(`(?m)^ {7}` + regexp.QuoteMeta(n.Name) + `( |$)`).MatchString(text) {
			t.Errorf("command %s has no entry in the page", n.Name)
		}
		for _, a := range n.Aliases {
			if !strings.Contains(text, a) {
				t.Errorf("alias %s of %s is not in the page", a, n.Name)
			}
		}
		for _, p := range n.Positional {
			if p.Help == "" {
				t.Errorf("%s: argument %s has no help to print", n.Name, p.Name)
			}
		}
		for _, f := range n.Flags {
			if !f.Hidden && !strings.Contains(text, "--"+f.Name) {
				t.Errorf("%s: option --%s is not in the page", n.Name, f.Name)
			}
		}
	}
	if seen < 15 {
		t.Errorf("only %d commands in the tree: the page was built from the wrong model", seen)
	}
	words := strings.Join(strings.Fields(text), " ")
	for _, want := range []string{"FAILURES", "FILES", "EXIT STATUS", "a full backup is required"} {
		if !strings.Contains(words, want) {
			t.Errorf("the page lacks %q", want)
		}
	}
}

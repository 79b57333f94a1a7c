package ctl

import (
	"fmt"
	"io"
	"strings"

	"github.com/alecthomas/kong"

	"github.com/dbdublk/dbdublk/internal/protocol"
)

// ManPage writes dbdctl(8) in roff (man(7) macros), generated from the
// same command tree the parser uses, so every subcommand, argument and
// flag the binary accepts is in the page and nothing else is. The parts
// that are not in the tree (files, exit status, the failure rules) are
// written here. `dbdctl man-page` prints it; `just package` ships it.
func ManPage(w io.Writer) error {
	var cli CLI
	parser, err := newParser(&cli)
	if err != nil {
		return err
	}
	m := &roff{w: w}
	m.line(`.TH DBDCTL 8 "" "dbdctl ` + protocol.Version + `" "System Administration"`)
	m.section("NAME")
	m.text("dbdctl - live snapshots and incremental backups of block devices, served through ublk")
	m.section("SYNOPSIS")
	m.line(`.B dbdctl`)
	m.line(`.I command`)
	m.line(`.RI [ arguments ]`)
	m.section("DESCRIPTION")
	m.text(manDescription)
	m.section("COMMANDS")
	for _, n := range parser.Model.Children {
		if n.Hidden {
			continue
		}
		m.command(n)
	}
	m.section("GLOBAL OPTIONS")
	for _, f := range parser.Model.Flags {
		if !f.Hidden {
			m.flag(f)
		}
	}
	for _, s := range manSections {
		m.section(s.title)
		for i, p := range s.paragraphs {
			if i > 0 {
				m.line(".PP")
			}
			m.text(p)
		}
	}
	return m.err
}

// manDescription opens the page: what dbdctl is, for a reader who knows
// dattobd.
const manDescription = `dbdctl puts a block device behind a ublk front device, /dev/ublkb<minor>, served by a userspace server, and offers dattobd's snapshot and incremental-backup commands on it: a snapshot is served read-only as /dev/datto<minor>, the blocks changed since the previous snapshot are listed in its copy-on-write (COW) file, and update-img copies only those into the previous image. Every command but version needs root; <minor> is a number from 0 to 255, as in dattobd.`

// manSections are the parts of the page after the commands.
var manSections = []struct {
	title      string
	paragraphs []string
}{
	{"FAILURES", []string{
		`A failure of tracking (a full COW store, a failed write of the change list, a crash recovery that cannot resume) is written into the COW file and the state file when it happens and shown by info as dattobd's negative errno. reload-snapshot, reload-incremental, recovery after a crash and update-img then refuse the file with a message saying that a full backup is required; destroy clears it.`,
		`A server that dies is replaced by its supervisor; writes in flight wait and are sent again. If no server can take the device over, its I/O fails instead of hanging and tracking is recorded as failed.`,
	}},
	{"ROOT VOLUME", []string{
		`attach --at-boot <device> <minor> makes the initramfs attach the root volume (a partition or disk) at every boot from the next one on and mount its front device as /. The initramfs reads the minor's record from the boot record on the device and resumes its tracking; the server runs as @dbdctl, which systemd spares, and follows the switch to the real root. At shutdown, once / is read-only, the system-shutdown hook closes the COW file clean and refuses later writes, so the next boot resumes the tracking without a full backup. The COW file of such a volume must be on the volume itself (/.datto).`,
	}},
	{"KERNEL", []string{
		`ublk needs Linux 6.4 or later built with CONFIG_BLK_DEV_UBLK; dbdctl loads ublk_drv when it is not loaded, and on a kernel without it (Debian 12's own 6.1, say) says so: install a kernel that has it, such as Debian 12's backports kernel. From Linux 6.16 the front and snapshot devices run zero copy (the kernel lends each request's pages to the server's disk I/O; info shows "data_path": "zero-copy"); before, or with attach --copy, data is copied through the server.`,
	}},
	{"FILES", []string{
		`/var/lib/dbdctl/<minor>.json - what each minor was doing, so reload-all brings it back at boot.`,
		`/.dbdctl-boot<minor> - the root volume's boot record: its record, where the initramfs reads it before / is mounted (immutable).`,
		`/var/log/dbdctl/ublk<minor>.log - the server's log.`,
		`/run/dbdctl/ - the servers' sockets and their per-minor locks.`,
	}},
	{"EXIT STATUS", []string{
		`0 on success; 1 when a command failed (one line on standard error says why, and nothing was changed); 2 for a malformed command line; 70 for an internal error.`,
	}},
	{"SEE ALSO", []string{
		`dattobd's dbdctl(8), whose commands these follow; ublk in the Linux kernel's documentation (Documentation/block/ublk.rst); README.md of dbdctl.`,
	}},
}

// roff writes man(7) source, remembering the first write error.
type roff struct {
	w   io.Writer
	err error
}

func (m *roff) line(s string) {
	if m.err == nil {
		_, m.err = fmt.Fprintln(m.w, s)
	}
}

// text writes running text, escaped so no line starts a request.
func (m *roff) text(s string) { m.line(escape(s)) }

func (m *roff) section(title string) { m.line(".SH " + title) }

// command writes one subcommand as a tagged paragraph: its usage line,
// its help, then its arguments and flags.
func (m *roff) command(n *kong.Node) {
	m.line(".TP")
	usage := []string{`\fB` + escape(n.Name) + `\fR`}
	for _, p := range n.Positional {
		arg := `\fI` + escape(p.Name) + `\fR`
		if !p.Required {
			arg = "[" + arg + "]"
		}
		usage = append(usage, arg)
	}
	if len(visibleFlags(n)) > 0 {
		usage = append(usage, "[options]")
	}
	m.line(strings.Join(usage, " "))
	help := n.Help
	if len(n.Aliases) > 0 {
		help += " Also called " + strings.Join(n.Aliases, ", ") + "."
	}
	m.text(help)
	if n.Detail != "" {
		m.text(n.Detail)
	}
	if len(n.Positional) == 0 && len(visibleFlags(n)) == 0 {
		return
	}
	m.line(".RS")
	for _, p := range n.Positional {
		m.line(".TP")
		m.line(`\fI` + escape(p.Name) + `\fR`)
		m.text(p.Help)
	}
	for _, f := range visibleFlags(n) {
		m.flag(f)
	}
	m.line(".RE")
}

// flag writes one option as a tagged paragraph, with its default.
func (m *roff) flag(f *kong.Flag) {
	m.line(".TP")
	name := `\fB\-\-` + escape(f.Name) + `\fR`
	if f.Short != 0 {
		name = `\fB\-` + string(f.Short) + `\fR, ` + name
	}
	if !f.IsBool() {
		placeholder := f.PlaceHolder
		if placeholder == "" {
			placeholder = strings.ToUpper(f.Name)
		}
		name += `=\fI` + escape(placeholder) + `\fR`
	}
	m.line(name)
	help := f.Help
	if f.HasDefault && f.Default != "" && !f.IsBool() && !strings.Contains(help, "default") {
		help += " Default: " + f.Default + "."
	}
	m.text(help)
}

func visibleFlags(n *kong.Node) []*kong.Flag {
	var out []*kong.Flag
	for _, f := range n.Flags {
		if !f.Hidden {
			out = append(out, f)
		}
	}
	return out
}

// escape makes s safe as roff text: backslashes and hyphens escaped, and
// a leading dot or quote kept from being read as a request.
func escape(s string) string {
	s = strings.ReplaceAll(s, `\`, `\e`)
	s = strings.ReplaceAll(s, "-", `\-`)
	if strings.HasPrefix(s, ".") || strings.HasPrefix(s, "'") {
		s = `\&` + s
	}
	return s
}

// ManPageCmd prints dbdctl(8).
type ManPageCmd struct{}

// Run prints the page.
func (ManPageCmd) Run(env *Env) error { return ManPage(env.Stdout) }

package ctl

import (
	"os"
	"sync"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/sys/unix"
)

// progress draws a progress bar on a terminal and nothing elsewhere, so
// scripts and logs get only the summary line.
type progress struct {
	mu  sync.Mutex
	bar *progressbar.ProgressBar
	tty bool
}

func newProgress(env *Env) *progress {
	f, ok := env.Stderr.(*os.File)
	if !ok {
		return &progress{}
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return &progress{tty: err == nil}
}

func (p *progress) update(done, total int64) {
	if !p.tty {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bar == nil {
		p.bar = progressbar.NewOptions64(total,
			progressbar.OptionSetWriter(os.Stderr),
			progressbar.OptionSetDescription("update-img"),
			progressbar.OptionShowBytes(true),
			progressbar.OptionThrottle(100_000_000),
			progressbar.OptionClearOnFinish(),
		)
	}
	p.bar.Set64(done)
}

func (p *progress) finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bar != nil {
		p.bar.Finish()
	}
}

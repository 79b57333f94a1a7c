package vm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Run boots a VM as described by cfg, runs cfg.Script in it and returns the
// script's output and exit status. A non-zero exit status is not an error.
// The error is for a VM that could not start or finish: missing qemu, kernel
// fetch failure, timeout, repeated early crashes, or a kernel crash while
// the script ran. When the VM did run, the Result is returned alongside the
// error so callers can show its console.
//
// Set DBD_VM_KEEP=1 to keep the run directory (initramfs, logs) for debugging.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	if _, err := exec.LookPath(qemuBinary); err != nil {
		return nil, fmt.Errorf("vm: %s not found (Debian package qemu-system-x86): %w", qemuBinary, err)
	}
	k, err := EnsureKernel(ctx, cfg.Kernel)
	if err != nil {
		return nil, err
	}

	dir, err := os.MkdirTemp("", "dbd-vm-")
	if err != nil {
		return nil, err
	}
	if os.Getenv("DBD_VM_KEEP") != "" {
		cfg.Logf("vm: keeping run directory %s", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	initrd := filepath.Join(dir, "initramfs.cpio")
	t0 := time.Now()
	if err := writeInitramfs(k, &cfg, initrd); err != nil {
		return nil, err
	}
	st, _ := os.Stat(initrd)
	cfg.Logf("vm: kernel %s, initramfs %.1f MiB built in %v", k.Release, float64(st.Size())/(1<<20), time.Since(t0).Round(time.Millisecond))
	backends, err := prepareDisks(cfg.Disks)
	if err != nil {
		return nil, err
	}

	consoleLog := filepath.Join(dir, "console.log")
	resultsLog := filepath.Join(dir, "results.log")
	return bootWithRetries(ctx, &bootPlan{
		args: func(b []diskBackend) []string {
			return qemuArgs(k, &cfg, initrd, consoleLog, resultsLog, b)
		},
		backends:   backends,
		consoleLog: consoleLog,
		resultsLog: resultsLog,
		deadline:   bootDeadline,
		starter:    "init",
		powerCut:   cfg.PowerCut,
		logf:       cfg.Logf,
	})
}

// bootWithRetries boots until one boot gets past the start marker, at most
// maxBoots times, and turns the last boot's logs into a Result.
func bootWithRetries(ctx context.Context, p *bootPlan) (*Result, error) {
	res := &Result{}
	for res.Boots < maxBoots {
		res.Boots++
		t := time.Now()
		o, err := bootOnce(ctx, p)
		res.Console, res.BootTime = o.console, o.bootTime
		out, code, perr := parseResults(o.results)
		res.Output = out // partial output helps explain a crash
		if err != nil && errors.Is(err, errQemuStart) && strings.Contains(o.stderr, "io_uring") && usesIOUring(p.backends) {
			p.logf("vm: qemu cannot use io_uring here, falling back to aio=threads")
			for i := range p.backends {
				p.backends[i].aio = "threads"
			}
			res.Boots--
			continue
		}
		if err != nil {
			return res, err
		}
		if o.flake != "" {
			p.logf("vm: boot %d of %d failed: %s; console tail:\n%s", res.Boots, maxBoots, o.flake, tail(o.console, 1500))
			if res.Boots < maxBoots {
				p.logf("vm: booting again")
				continue
			}
			return res, fmt.Errorf("vm: %d boots failed before the guest %s started; last: %s; console tail:\n%s",
				res.Boots, p.starter, o.flake, tail(o.console, 6000))
		}
		if perr != nil && p.powerCut && o.bootTime > 0 {
			res.PoweredOff = true
			p.logf("vm: booted in %v, the guest stopped abruptly (power cut) after %v", o.bootTime.Round(time.Millisecond), time.Since(t).Round(time.Millisecond))
			return res, nil
		}
		if perr != nil {
			return res, fmt.Errorf("%w; qemu stderr: %s; console tail:\n%s", perr, tail(o.stderr, 500), tail(o.console, 6000))
		}
		res.ExitCode = code
		p.logf("vm: booted in %v, script exited %d, VM ran %v", o.bootTime.Round(time.Millisecond), code, time.Since(t).Round(time.Millisecond))
		return res, nil
	}
	return res, errors.New("vm: no boot attempted") // unreachable: the loop returns
}

func usesIOUring(bs []diskBackend) bool {
	for _, b := range bs {
		if b.aio == "io_uring" {
			return true
		}
	}
	return false
}

// writeInitramfs builds the guest file system for cfg into path.
func writeInitramfs(k *Kernel, cfg *Config, path string) error {
	a, err := buildInitramfs(k, cfg)
	if err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := a.write(f); err != nil {
		f.Close()
		return fmt.Errorf("vm: write initramfs: %w", err)
	}
	return f.Close()
}

// parseResults splits the results channel into the script's output and the
// exit code from the trailer the guest init appends. A missing trailer means
// the guest died before the script finished.
func parseResults(s string) (output string, code int, err error) {
	if i := strings.Index(s, initFailMarker); i >= 0 {
		msg, _, _ := strings.Cut(s[i+len(initFailMarker):], markerEnd)
		return "", 0, fmt.Errorf("vm: guest setup failed: %s", msg)
	}
	i := strings.LastIndex(s, "\n"+exitMarker)
	if i < 0 {
		return s, 0, fmt.Errorf("vm: guest stopped before the script finished (no exit trailer); script output so far:\n%s", tail(s, 2000))
	}
	rest := s[i+1+len(exitMarker):]
	num, _, ok := strings.Cut(rest, markerEnd)
	code, cerr := strconv.Atoi(num)
	if !ok || cerr != nil {
		return s[:i], 0, fmt.Errorf("vm: malformed exit trailer %q", tail(rest, 100))
	}
	return s[:i], code, nil
}

package vm

import (
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
)

// decompressModules turns every compressed module below dir into a plain
// .ko in place. Doing it once at fetch time keeps each initramfs build cheap
// and lets the host read .modinfo with debug/elf.
func decompressModules(ctx context.Context, dir string) error {
	var xz, zst, gz []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		switch {
		case strings.HasSuffix(p, ".ko.xz"):
			xz = append(xz, p)
		case strings.HasSuffix(p, ".ko.zst"):
			zst = append(zst, p)
		case strings.HasSuffix(p, ".ko.gz"):
			gz = append(gz, p)
		}
		return nil
	})
	if err != nil {
		return err
	}
	// One xz process per batch: a thousand separate processes would cost
	// more than the decompression itself.
	var jobs []func() error
	for _, b := range batches(xz, 64) {
		jobs = append(jobs, func() error { return runDecompressor(ctx, "xz", append([]string{"-d", "-q", "--"}, b...)) })
	}
	for _, b := range batches(zst, 64) {
		jobs = append(jobs, func() error { return runDecompressor(ctx, "zstd", append([]string{"-d", "-q", "--rm", "--"}, b...)) })
	}
	for _, p := range gz {
		jobs = append(jobs, func() error { return gunzipFile(p) })
	}
	return runParallel(jobs, runtime.NumCPU()+1)
}

// runParallel runs jobs on at most n goroutines and returns the first error.
func runParallel(jobs []func() error, n int) error {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	sem := make(chan struct{}, n)
	for _, job := range jobs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := job(); err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return first
}

func batches(s []string, n int) [][]string {
	var out [][]string
	for len(s) > n {
		out = append(out, s[:n])
		s = s[n:]
	}
	if len(s) > 0 {
		out = append(out, s)
	}
	return out
}

func runDecompressor(ctx context.Context, tool string, args []string) error {
	out, err := exec.CommandContext(ctx, tool, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("vm: %s -d on kernel modules: %v\n%s", tool, err, tail(string(out), 1000))
	}
	return nil
}

func gunzipFile(p string) error {
	in, err := os.Open(p)
	if err != nil {
		return err
	}
	defer in.Close()
	zr, err := gzip.NewReader(in)
	if err != nil {
		return fmt.Errorf("vm: %s: %w", p, err)
	}
	dst := strings.TrimSuffix(p, ".gz")
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, zr); err != nil {
		out.Close()
		return fmt.Errorf("vm: %s: %w", p, err)
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Remove(p)
}

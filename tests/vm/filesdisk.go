package vm

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
)

// writeFilesDisk makes img, the read-only disk that carries a boot's script
// and files into a Machine: an ext4 file system (no journal: it is never
// written) built by mke2fs -d from staging, which is filled with the step
// wrapper, the script and files, and removed afterwards.
func writeFilesDisk(ctx context.Context, img, staging string, files map[string]string, script string) error {
	defer os.RemoveAll(staging)
	if err := os.MkdirAll(staging, 0o755); err != nil {
		return err
	}
	for name, content := range map[string]string{stepScript: script, stepWrapper: stepWrapperScript()} {
		if err := os.WriteFile(filepath.Join(staging, name), []byte(content), 0o755); err != nil {
			return err
		}
	}
	for guest, host := range files {
		dst := filepath.Join(staging, filepath.FromSlash(guest))
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		if err := copyTree(host, dst); err != nil {
			return fmt.Errorf("vm: Files %s: %w", guest, err)
		}
	}

	// Size the file system for the content: data in 4 KiB blocks, an
	// inode each, and room for mke2fs's own metadata.
	var blocks, inodes int64
	err := filepath.WalkDir(staging, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		inodes++
		blocks += (info.Size()+4095)/4096 + 1
		return nil
	})
	if err != nil {
		return err
	}
	sizeK := (blocks*4*11/10 + 16<<10 + 1023) / 1024 * 1024
	f, err := os.Create(img)
	if err != nil {
		return err
	}
	err = f.Truncate(sizeK << 10)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0",
		"-b", "4096", "-N", fmt.Sprint(inodes+64), "-L", "dbd-files", "-d", staging, img, fmt.Sprintf("%dk", sizeK))
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("vm: mke2fs of the files disk: %w\n%s", err, tail(string(out), 2000))
	}
	return nil
}

// copyTree copies a host file, symlink or directory to dst, keeping modes.
// Regular files are hard-linked where possible: mke2fs only reads them.
func copyTree(src, dst string) error {
	info, err := os.Lstat(src)
	if err != nil {
		return err
	}
	switch {
	case info.IsDir():
		if err := os.MkdirAll(dst, info.Mode().Perm()); err != nil {
			return err
		}
		entries, err := os.ReadDir(src)
		if err != nil {
			return err
		}
		for _, e := range entries {
			if err := copyTree(filepath.Join(src, e.Name()), filepath.Join(dst, e.Name())); err != nil {
				return err
			}
		}
		return os.Chmod(dst, info.Mode().Perm())
	case info.Mode()&fs.ModeSymlink != 0:
		target, err := os.Readlink(src)
		if err != nil {
			return err
		}
		return os.Symlink(target, dst)
	case info.Mode().IsRegular():
		if os.Link(src, dst) == nil {
			return nil
		}
		return copyFile(src, dst, info.Mode().Perm())
	default:
		return fmt.Errorf("%s: not a regular file, directory or symlink", src)
	}
}

func copyFile(src, dst string, perm fs.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// Package vm runs shell scripts inside a throw-away Linux VM so that tests
// can use kernel features the host lacks, above all ublk.
//
// The host has no ublk and no KVM, so the rig boots a stock Debian cloud
// kernel under qemu's TCG emulation (about 3 s to a shell) with a generated
// initramfs and no root disk:
//
//	res, err := vm.Run(ctx, vm.Config{
//		Programs: []string{"mkfs.ext4", "fio"},  // host tools, copied with their libraries
//		Modules:  []string{"ublk_drv"},          // shipped with dependencies; modprobe works
//		Files:    map[string]string{"/usr/local/bin/srv": srvBinary},
//		Disks:    []vm.Disk{{Path: img, Size: 64 << 20}}, // /dev/vda
//		Script:   "modprobe ublk_drv && srv ... ",
//		Logf:     t.Logf,
//	})
//
// res.Output holds the script's stdout and stderr, res.ExitCode its status;
// a failing script is not an error. err means the VM itself failed: qemu
// missing, kernel download failed, timeout, or a kernel crash while the
// script ran (an oops in the guest is a bug worth failing for).
//
// Tests call Require(t) first: it skips when qemu, busybox or the kernel are
// unavailable, and fails instead when CI=true.
//
// # Kernel
//
// EnsureKernel downloads Debian's linux-image-cloud-amd64 of a suite with a
// private apt state directory aimed at the host's own Debian mirror (the
// system apt setup is never touched), unpacks it, decompresses all modules
// and derives modules.dep and modules.alias from their .modinfo sections.
// Series: "6.12" (trixie, default), "7.3" (trixie-backports), "6.1"
// (bookworm; has no ublk_drv). $DBD_KERNEL picks the series when
// Config.Kernel is empty. Kernels are cached under $DBD_CACHE or
// <repo>/.cache/vm/kernel-<series>; concurrent fetches are safe (each
// builds in a staging directory and renames it into place). Delete the
// directory to pick up a newer Debian build. cmd/fetch-kernel pre-fetches.
// $DBD_APT_URI overrides the mirror on hosts without Debian apt sources.
//
// # Guest
//
// The initramfs (uncompressed newc cpio, rebuilt per run in well under a
// second) holds the host's static /bin/busybox with all its applets, the
// requested programs, files and modules, and a generated /init that mounts
// proc, sysfs, devtmpfs, devpts and tmpfs (/tmp, /run, /dev/shm), loads
// virtio_pci and virtio_blk where they are modules, waits for the disks, prints a start marker on the console and
// runs the script as /bin/sh /dbd/script.sh in /root with stdin from
// /dev/null. PATH is /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin.
// A requested program replaces any busybox applet of the same name.
//
// Output travels over a second serial port (guest /dev/ttyS1, in raw mode)
// whose host side is a file, followed by a trailer line with the exit code;
// no network or agent is involved. The console (ttyS0) shows warnings and
// worse (loglevel=5) and ends up in Result.Console.
//
// # Boot flakes
//
// qemu 7.2's TCG occasionally crashes the kernel early in boot (an int3
// oops, about one boot in thirty). A panic, oops or BUG before the start
// marker, a guest that stops before it, or no marker within a minute is
// logged through Config.Logf and the VM is booted again, up to three boots.
// A crash after the marker is returned as an error with the console tail.
//
// # Disks
//
// Disks are raw images on virtio-blk-pci, opened with cache=none and
// aio=io_uring. cache=writeback is used where the image's file system
// refuses O_DIRECT (tmpfs), and aio=threads where the host or qemu cannot
// use io_uring.
//
// Set DBD_VM_KEEP=1 to keep a run's directory (initramfs, console and
// results logs) for inspection.
//
// # Machines
//
// A Machine is the other kind of guest: a real Debian system (trixie,
// systemd, udev, the same cloud kernel) on a disk of its own, for tests
// that install a package the way a user would (dpkg -i, then the
// initramfs rebuilt), reboot, cut the power and boot again. Its initramfs
// is built by initramfs-tools (Debian's own) or by dracut (the RHEL,
// Fedora and SUSE family's, host-only as there); both images have LVM:
//
//	m, err := vm.NewMachine(ctx, t.TempDir(), vm.InitramfsTools) // copies the cached root image
//	res, err := m.Boot(ctx, vm.BootConfig{
//		Files:  map[string]string{"/dbdctl.deb": deb}, // /mnt/files/dbdctl.deb
//		Script: "dpkg -i /mnt/files/dbdctl.deb && systemctl reboot",
//		Logf:   t.Logf,
//	})
//
// Tests call RequireMachine(t, kind) first. EnsureRootImage builds each
// image once (about a minute, as root) with mmdebstrap from the host's
// mirror into <cache>/rootfs-trixie-<kind>-1280m-<hash of its packages>:
// a sparse 1.25 GiB GPT disk with one partition holding ext4 with a fixed
// UUID, made by sfdisk and mke2fs -d without loop devices.
// cmd/fetch-rootimage pre-builds both.
//
// Each boot reads /boot/vmlinuz-<release> and /boot/initrd.img-<release>
// out of the machine's disk with debugfs, as a boot loader would (so an
// initramfs regenerated in the guest is the one booted next, and like GRUB
// it does not replay the file system journal), and boots them with
// root=Machine.Root (the image's UUID= unless a test moved /) on the kernel
// command line. vda is the root disk, vdb a read-only files
// disk made per boot (BootConfig.Files and the script), BootConfig.Disks
// follow from vdc. dbd-step.service, ordered after multi-user.target, mounts
// vdb on /mnt/files and runs the script with the same results port, markers
// and Result as Run. The script ends the boot itself (systemctl reboot or
// poweroff, or a power cut with PowerCut); if it returns, the service powers
// the machine off. Under TCG a boot reaches the script in 35-50 s and a
// clean shutdown takes another 10 s; a boot that crashes or does not reach
// the script within three minutes is retried, as Run's are.
package vm

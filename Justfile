# dbdctl: live snapshots and incremental backups through ublk.

# Run the tests (host unit tests and the VM tests against a real kernel).
default: test

# Build the static dbdctl binary into bin/.
build:
	CGO_ENABLED=0 go build -o bin/dbdctl ./ctl/dbdctl

# Build the .deb and .rpm packages into dist/out (binary, systemd unit, modules-load.d entry, dbdctl(8), the root volume's initramfs-tools hook, dracut module, system-shutdown hook and udev rule).
package:
	go run ./dist/cmd/package -out dist/out

# Install what PROFILE (demo, test or bench) needs, only if missing: Debian packages (root or sudo), Go modules, the kernel.
setup PROFILE:
	bash scripts/setup {{PROFILE}}

# Every test: vet, host unit tests, and the in-VM tests against the real ublk driver.
test: (setup "test")
	go vet ./...
	CGO_ENABLED=0 go build ./...
	go test -count=1 -timeout 80m ./...

# The main job, shown end to end: attach a disk, use a filesystem through
# /dev/ublkbN, detach, check the real device (inside the VM rig when this
# kernel has no ublk).
demo: (setup "demo")
	go run ./tests/demo

# The crash and fault tests at soak length (~2 h): 50 kills under load and 50 power cuts, a 100+100-kill storm, 200 replay points, and the root volume on every initramfs and layout pair.
soak: (setup "test")
	DBD_CRASH_ITERS=50 DBD_STORM_KILLS=100 DBD_REPLAY_POINTS=200 DBD_ROOT_MATRIX=1 go test -count=1 -timeout 4h ./tests/

# All benchmarks inside the VM: frontbench, then snapbench.
bench: frontbench snapbench

# Raw virtio disk vs the ublk front device, on 6.12 (copy mode) and 7.3 (zero copy and copy side by side), with null_blk and server memory (~9 min each); ARGS e.g. -record bench/RESULTS.md.
frontbench *ARGS: (setup "bench")
	go run ./bench/cmd/frontbench -kernel 6.12 {{ARGS}}
	go run ./bench/cmd/frontbench -kernel 7.3 {{ARGS}}

# Snapshots, incremental mode (with the server's CPU per I/O in each mode), update-img, setup on 1 TiB, server memory, on 6.12 and 7.3 (~11 min each).
snapbench *ARGS: (setup "bench")
	go run ./bench/cmd/snapbench -kernel 6.12 {{ARGS}}
	go run ./bench/cmd/snapbench -kernel 7.3 {{ARGS}}

# Fetch and cache the test kernel (DBD_KERNEL=6.12 by default) and the Debian root image.
kernel:
	go run ./tests/vm/cmd/fetch-kernel
	go run ./tests/vm/cmd/fetch-rootimage

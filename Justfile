# dbdctl: live snapshots and incremental backups through ublk.

# Run the tests (host unit tests and the VM tests against a real kernel).
default: test

# Build the static dbdctl binary into bin/.
build:
	CGO_ENABLED=0 go build -o bin/dbdctl ./ctl/dbdctl

# Every test: vet, host unit tests, and the in-VM tests against the real ublk driver.
test:
	go vet ./...
	CGO_ENABLED=0 go build ./...
	go test -count=1 -timeout 80m ./...

# The main job, shown end to end: attach a disk, use a filesystem through
# /dev/ublkbN, detach, check the real device (inside the VM rig when this
# kernel has no ublk).
demo:
	go run ./tests/demo

# Benchmarks inside the VM: raw virtio disk vs the ublk front device.
bench:
	go run ./bench/cmd/frontbench

# Fetch and cache the test kernel (DBD_KERNEL=6.12 by default).
kernel:
	go run ./tests/vm/cmd/fetch-kernel

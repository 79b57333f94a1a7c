// Package guest holds the tests that run inside the VM rig, against the
// real ublk driver, with real clients (mkfs, mount, e2fsck, fio). The host
// test in package tests builds this package with `go test -c`, boots a
// kernel with it and reports its results; run directly on the host, every
// test is skipped because the host kernel has no ublk.
package guest

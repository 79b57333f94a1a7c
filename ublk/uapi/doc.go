// Package uapi holds the kernel ABI: io_uring and ublk constants and
// fixed-layout structs, checked by layout tests; it is the only place that
// mirrors kernel headers.
//
// Every struct here has the exact size and field offsets of its kernel
// counterpart on 64-bit little-endian Linux (amd64, arm64). Each struct starts
// with a structs.HostLayout marker, spells out its padding, and names the
// kernel field it mirrors in a comment. The layout tests assert every size,
// offset and constant value, because nothing else in a Go build checks them.
//
// The package makes no syscalls; ring handling lives in package uring.
package uapi

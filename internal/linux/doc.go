// Package linux is the kernel ABI the project uses beyond ublk and
// io_uring (those are in ublk/uapi): the block-device, filesystem-freeze,
// FIEMAP and inode-flag ioctls, with their numbers and structs written out
// once, checked by layout tests, and wrapped in small typed functions. It is
// the only package besides ublk/uapi that hands kernel structs to ioctl.
package linux

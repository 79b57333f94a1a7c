// Package cow will hold the copy-on-write store of live snapshots: the
// dattobd-compatible COW file (header, index, data slots) and the
// first-write-wins copy path. It is filled by the snapshot issue (#3); the
// package exists now so the layout of the design card is in place.
package cow

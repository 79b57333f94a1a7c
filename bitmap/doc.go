// Package bitmap will hold changed-block tracking for incremental mode: a
// bounded-memory record of every 4 KiB block written since the last
// snapshot. It is filled by the snapshot issue (#3); the package exists now
// so the layout of the design card is in place.
package bitmap

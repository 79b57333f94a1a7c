// Package dattobd is the vocabulary of dattobd's contract that every layer
// of dbdctl shares: minors, tracking modes, the states of /proc/datto-info
// and the names of the devices a minor owns. It has no behaviour of its own,
// so the engine, the daemon, the control protocol and the CLI can all use it
// without depending on one another.
package dattobd

//go:build race

package bitmap

// raceEnabled: the race detector makes every atomic operation slow, so a
// few stress loops run fewer rounds under it.
const raceEnabled = true

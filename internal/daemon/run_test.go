package daemon

import (
	"reflect"
	"testing"
	"time"

	"github.com/dbdublk/dbdublk/internal/dattobd"
	"github.com/dbdublk/dbdublk/internal/protocol"
)

// configOf carries every field of a server's command line into its Config.
func TestConfigOf(t *testing.T) {
	o := protocol.ServeOptions{
		BlockDevice: "/dev/sdz", Minor: 9, Queues: 3, Depth: 64, MaxIO: 1 << 19,
		Force: true, KeepFailure: true, Reload: dattobd.Incremental, CowFile: "/c", Cache: 1 << 20, Falloc: 7,
		Checkpoint: time.Minute, Copy: true,
	}
	c := configOf(o)
	want := Config{BlockDevice: "/dev/sdz", Minor: 9, Queues: 3, Depth: 64, MaxIOBytes: 1 << 19, Force: true, KeepFailure: true,
		CheckpointEvery: time.Minute, Copy: true}
	r := c.Reload
	c.Reload = nil
	if c != want {
		t.Errorf("configOf = %+v, want %+v", c, want)
	}
	if r == nil || !reflect.DeepEqual(*r, Reload{Mode: dattobd.Incremental, CowFile: "/c", CacheBytes: 1 << 20, FallocMiB: 7}) {
		t.Errorf("configOf reload = %+v", r)
	}
	o.Reload = dattobd.Passthrough
	if configOf(o).Reload != nil {
		t.Error("a passthrough server reloads")
	}
}

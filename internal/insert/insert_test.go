package insert

import (
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/internal/linux"
	"github.com/dbdublk/dbdublk/internal/testmain"
)

func TestMain(m *testing.M) { testmain.Run(m) }

// Only targets that can be mapped twice may be cloned; everything that
// keeps state (pools, mirrors, snapshots, multipath) is refused by name.
func TestCheckClonable(t *testing.T) {
	lv := []linux.DMTarget{{Start: 0, Length: 2048, Type: "linear", Params: "8:16 2048"}}
	if err := CheckClonable("vg-lv", lv); err != nil {
		t.Fatalf("a linear LV refused: %v", err)
	}
	crypt := []linux.DMTarget{{Start: 0, Length: 2048, Type: "crypt", Params: "aes-xts-plain64 0 0 8:16 4096"}}
	if err := CheckClonable("root_crypt", crypt); err != nil {
		t.Fatalf("a dm-crypt mapping refused: %v", err)
	}
	for _, typ := range []string{"thin", "thin-pool", "multipath", "raid", "mirror", "snapshot", "snapshot-origin", "cache", "integrity", "writecache", "era"} {
		tbl := append(append([]linux.DMTarget{}, lv...), linux.DMTarget{Start: 2048, Length: 2048, Type: typ})
		err := CheckClonable("vg-x", tbl)
		if err == nil || !strings.Contains(err.Error(), `"`+typ+`"`) {
			t.Errorf("a %s target: %v", typ, err)
		}
	}
	if err := CheckClonable("empty", nil); err == nil {
		t.Error("an empty table was accepted")
	}
}

// The redirect maps every sector of the volume onto the front device from
// its sector 0; a table with a gap has no size.
func TestRedirectedTable(t *testing.T) {
	tbl := []linux.DMTarget{
		{Start: 0, Length: 1000, Type: "linear", Params: "8:16 0"},
		{Start: 1000, Length: 24, Type: "linear", Params: "8:32 0"},
	}
	n, err := size("vg-lv", tbl)
	if err != nil || n != 1024 {
		t.Fatalf("size = %d, %v", n, err)
	}
	got := redirected(n, unix.Mkdev(259, 3))
	if len(got) != 1 || got[0].String() != "0 1024 linear 259:3 0" {
		t.Fatalf("redirected = %v", got)
	}
	tbl[1].Start = 1001
	if _, err := size("vg-lv", tbl); err == nil {
		t.Fatal("a table with a gap has a size")
	}
}

package failpoint

import (
	"errors"
	"syscall"
	"testing"
)

func TestCheck(t *testing.T) {
	old := active
	t.Cleanup(func() { active = old })
	active = parse(" a/b , c,,")
	for name, want := range map[string]bool{"a/b": true, "c": true, "a": false, "": false} {
		err := Check(name)
		if (err != nil) != want {
			t.Errorf("Check(%q) = %v", name, err)
		}
		if err != nil && (!errors.Is(err, ErrInjected) || !errors.Is(err, syscall.EIO)) {
			t.Errorf("Check(%q) = %v does not match ErrInjected and EIO", name, err)
		}
	}
	active = parse("")
	if Check("a/b") != nil {
		t.Error("no failpoints set, yet one triggered")
	}
}

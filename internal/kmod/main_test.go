package kmod

import (
	"testing"

	"github.com/dbdublk/dbdublk/internal/testmain"
)

func TestMain(m *testing.M) { testmain.Run(m) }

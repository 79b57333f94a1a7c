package ublk

import (
	"os"
	"strings"
	"testing"

	"github.com/dbdublk/dbdublk/ublk/uapi"
)

func TestValidateFillsDefaults(t *testing.T) {
	s := DeviceSpec{Size: 1 << 30}
	if err := s.Validate(); err != nil {
		t.Fatalf("Validate(%+v) = %v, want nil", s, err)
	}
	if s.Queues != DefaultQueues {
		t.Errorf("Queues = %d, want %d", s.Queues, DefaultQueues)
	}
	if s.Depth != DefaultDepth {
		t.Errorf("Depth = %d, want %d", s.Depth, DefaultDepth)
	}
	if s.MaxIOBytes != DefaultMaxIOBytes {
		t.Errorf("MaxIOBytes = %d, want %d", s.MaxIOBytes, DefaultMaxIOBytes)
	}
	if s.LogicalBlockSize != 512 {
		t.Errorf("LogicalBlockSize = %d, want 512", s.LogicalBlockSize)
	}
	if s.PhysicalBlockSize != 512 {
		t.Errorf("PhysicalBlockSize = %d, want 512", s.PhysicalBlockSize)
	}
	if s.Size != 1<<30 || s.ID != 0 {
		t.Errorf("Validate changed Size/ID: %+v", s)
	}

	// The physical block size defaults to the logical one, not to 512.
	s = DeviceSpec{Size: 1 << 30, LogicalBlockSize: 4096}
	if err := s.Validate(); err != nil {
		t.Fatalf("Validate(4K logical) = %v", err)
	}
	if s.PhysicalBlockSize != 4096 {
		t.Errorf("PhysicalBlockSize = %d, want 4096 (= logical)", s.PhysicalBlockSize)
	}

	// Explicit values are kept.
	s = DeviceSpec{ID: 7, Queues: 3, Depth: 64, MaxIOBytes: 2 << 20, Size: 1 << 20,
		LogicalBlockSize: 512, PhysicalBlockSize: 4096}
	want := s
	if err := s.Validate(); err != nil {
		t.Fatalf("Validate(%+v) = %v", want, err)
	}
	if s != want {
		t.Errorf("Validate changed explicit fields: got %+v, want %+v", s, want)
	}
}

func TestValidate(t *testing.T) {
	page := os.Getpagesize()
	base := func() DeviceSpec {
		return DeviceSpec{ID: 0, Queues: 2, Depth: 128, MaxIOBytes: 1 << 20, Size: 1 << 30,
			LogicalBlockSize: 512, PhysicalBlockSize: 512}
	}
	tests := []struct {
		name    string
		mod     func(*DeviceSpec)
		wantErr string // "" = valid
	}{
		{"base", func(*DeviceSpec) {}, ""},
		{"id -1 lets the kernel choose", func(s *DeviceSpec) { s.ID = -1 }, ""},
		{"id max", func(s *DeviceSpec) { s.ID = uapi.MaxDevID }, ""},
		{"id -2", func(s *DeviceSpec) { s.ID = -2 }, "device id"},
		{"id above max", func(s *DeviceSpec) { s.ID = uapi.MaxDevID + 1 }, "device id"},

		{"queues 1", func(s *DeviceSpec) { s.Queues = 1 }, ""},
		{"queues 64", func(s *DeviceSpec) { s.Queues = 64 }, ""},
		{"queues negative", func(s *DeviceSpec) { s.Queues = -1 }, "queue count"},
		{"queues 65", func(s *DeviceSpec) { s.Queues = 65 }, "queue count"},

		{"depth 1", func(s *DeviceSpec) { s.Depth = 1 }, ""},
		{"depth max", func(s *DeviceSpec) { s.Depth = uapi.MaxQueueDepth }, ""},
		{"depth negative", func(s *DeviceSpec) { s.Depth = -5 }, "queue depth"},
		{"depth above max", func(s *DeviceSpec) { s.Depth = uapi.MaxQueueDepth + 1 }, "queue depth"},

		{"max io one page", func(s *DeviceSpec) { s.MaxIOBytes = page }, ""},
		{"max io 32 MiB", func(s *DeviceSpec) { s.MaxIOBytes = 32 << 20 }, ""},
		{"max io below a page", func(s *DeviceSpec) { s.MaxIOBytes = 512 }, "max I/O size"},
		{"max io not page multiple", func(s *DeviceSpec) { s.MaxIOBytes = 4*page + 512 }, "max I/O size"},
		{"max io above 32 MiB", func(s *DeviceSpec) { s.MaxIOBytes = 32<<20 + page }, "max I/O size"},
		{"max io 64 MiB", func(s *DeviceSpec) { s.MaxIOBytes = 64 << 20 }, "max I/O size"},
		{"max io negative", func(s *DeviceSpec) { s.MaxIOBytes = -page }, "max I/O size"},

		{"logical 1024", func(s *DeviceSpec) { s.LogicalBlockSize, s.PhysicalBlockSize = 1024, 1024 }, ""},
		{"logical page", func(s *DeviceSpec) { s.LogicalBlockSize, s.PhysicalBlockSize = page, page }, ""},
		{"logical not power of two", func(s *DeviceSpec) { s.LogicalBlockSize, s.PhysicalBlockSize = 768, 4096 }, "logical block size"},
		{"logical below 512", func(s *DeviceSpec) { s.LogicalBlockSize, s.PhysicalBlockSize = 256, 4096 }, "logical block size"},
		{"logical above page", func(s *DeviceSpec) { s.LogicalBlockSize, s.PhysicalBlockSize = 2*page, 2*page }, "logical block size"},
		{"logical negative", func(s *DeviceSpec) { s.LogicalBlockSize = -512 }, "logical block size"},

		{"physical 4K over 512", func(s *DeviceSpec) { s.PhysicalBlockSize = 4096 }, ""},
		{"physical 1 MiB", func(s *DeviceSpec) { s.PhysicalBlockSize = 1 << 20 }, ""},
		{"physical below logical", func(s *DeviceSpec) { s.LogicalBlockSize, s.PhysicalBlockSize = 4096, 512 }, "physical block size"},
		{"physical not power of two", func(s *DeviceSpec) { s.PhysicalBlockSize = 3072 }, "physical block size"},
		{"physical above 1 MiB", func(s *DeviceSpec) { s.PhysicalBlockSize = 2 << 20 }, "physical block size"},

		{"size one block", func(s *DeviceSpec) { s.Size = 512 }, ""},
		{"size zero", func(s *DeviceSpec) { s.Size = 0 }, "size 0 must be a positive multiple"},
		{"size negative", func(s *DeviceSpec) { s.Size = -512 }, "size -512 must be a positive multiple"},
		{"size not sector multiple", func(s *DeviceSpec) { s.Size = 1000 }, "size 1000 must be a positive multiple"},
		{"size not logical multiple", func(s *DeviceSpec) {
			s.LogicalBlockSize, s.PhysicalBlockSize = 4096, 4096
			s.Size = 10*4096 + 512
		}, "size 41472 must be a positive multiple of the logical block size 4096"},

		{"dma alignment 511", func(s *DeviceSpec) { s.DMAAlignment = 511 }, ""},
		{"dma alignment 3", func(s *DeviceSpec) { s.DMAAlignment = 3 }, ""},
		{"dma alignment not a mask", func(s *DeviceSpec) { s.DMAAlignment = 512 }, "DMA alignment mask 512"},
		{"dma alignment a page", func(s *DeviceSpec) { s.DMAAlignment = page - 1 + page }, "DMA alignment mask"},
		{"dma alignment negative", func(s *DeviceSpec) { s.DMAAlignment = -1 }, "DMA alignment mask"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := base()
			tt.mod(&s)
			err := s.Validate()
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("Validate(%+v) = %v, want nil", s, err)
			case tt.wantErr != "" && err == nil:
				t.Fatalf("Validate(%+v) = nil, want error containing %q", s, tt.wantErr)
			case tt.wantErr != "" && !strings.Contains(err.Error(), tt.wantErr):
				t.Fatalf("Validate(%+v) = %q, want it to contain %q", s, err, tt.wantErr)
			}
		})
	}
}

func validSpec(t *testing.T, s DeviceSpec) DeviceSpec {
	t.Helper()
	if err := s.Validate(); err != nil {
		t.Fatalf("Validate(%+v) = %v", s, err)
	}
	return s
}

func TestParamsBasic(t *testing.T) {
	s := validSpec(t, DeviceSpec{Size: 3 << 30, LogicalBlockSize: 512, PhysicalBlockSize: 4096, MaxIOBytes: 1 << 20})
	p := s.params()
	if p.Types != uapi.ParamTypeBasic {
		t.Errorf("Types = %#x, want BASIC only (%#x)", p.Types, uapi.ParamTypeBasic)
	}
	b := p.Basic
	if b.LogicalBSShift != 9 || b.PhysicalBSShift != 12 || b.IOOptShift != 12 || b.IOMinShift != 12 {
		t.Errorf("shifts logical/physical/opt/min = %d/%d/%d/%d, want 9/12/12/12",
			b.LogicalBSShift, b.PhysicalBSShift, b.IOOptShift, b.IOMinShift)
	}
	if b.MaxSectors != (1<<20)>>9 {
		t.Errorf("MaxSectors = %d, want %d", b.MaxSectors, (1<<20)>>9)
	}
	if b.DevSectors != (3<<30)>>9 {
		t.Errorf("DevSectors = %d, want %d", b.DevSectors, (3<<30)>>9)
	}
	if b.Attrs != 0 {
		t.Errorf("Attrs = %#x, want 0", b.Attrs)
	}
	if p.Discard != (uapi.ParamDiscard{}) {
		t.Errorf("Discard = %+v, want zero without discard or write-zeroes", p.Discard)
	}
	if p.Len != 0 || p.Devt != (uapi.ParamDevt{}) {
		t.Errorf("params set Len or Devt: %+v", p)
	}

	s = validSpec(t, DeviceSpec{Size: 8 << 20, LogicalBlockSize: 4096, MaxIOBytes: 32 << 20})
	b = s.params().Basic
	if b.LogicalBSShift != 12 || b.PhysicalBSShift != 12 {
		t.Errorf("4K shifts = %d/%d, want 12/12", b.LogicalBSShift, b.PhysicalBSShift)
	}
	if b.MaxSectors != 65536 || b.DevSectors != 16384 {
		t.Errorf("MaxSectors/DevSectors = %d/%d, want 65536/16384", b.MaxSectors, b.DevSectors)
	}

	s = validSpec(t, DeviceSpec{Size: 1 << 20, PhysicalBlockSize: 1 << 20})
	if b := s.params().Basic; b.PhysicalBSShift != 20 || b.IOMinShift != 20 || b.IOOptShift != 20 {
		t.Errorf("1 MiB physical shifts = %d/%d/%d, want 20", b.PhysicalBSShift, b.IOMinShift, b.IOOptShift)
	}
}

func TestParamsAttrs(t *testing.T) {
	tests := []struct {
		readOnly, cache bool
		want            uint32
	}{
		{false, false, 0},
		{true, false, uapi.AttrReadOnly},
		{false, true, uapi.AttrVolatileCache | uapi.AttrFUA},
		{true, true, uapi.AttrReadOnly | uapi.AttrVolatileCache | uapi.AttrFUA},
	}
	for _, tt := range tests {
		s := validSpec(t, DeviceSpec{Size: 1 << 20, ReadOnly: tt.readOnly, VolatileCache: tt.cache})
		if got := s.params().Basic.Attrs; got != tt.want {
			t.Errorf("readOnly=%v cache=%v: Attrs = %#x, want %#x", tt.readOnly, tt.cache, got, tt.want)
		}
		if got := s.params().Basic.Attrs; got&uapi.AttrRotational != 0 {
			t.Errorf("Attrs %#x has ROTATIONAL", got)
		}
	}
}

func TestParamsDiscard(t *testing.T) {
	const maxOp = (1 << 30) >> 9
	tests := []struct {
		name        string
		granularity int
		zeroes      bool
		want        uapi.ParamDiscard
	}{
		{"discard only", 65536, false, uapi.ParamDiscard{
			DiscardGranularity: 65536, MaxDiscardSectors: maxOp, MaxDiscardSegments: 1}},
		{"write-zeroes only", 0, true, uapi.ParamDiscard{
			DiscardGranularity: 4096, MaxWriteZeroesSectors: maxOp}},
		{"both", 512, true, uapi.ParamDiscard{
			DiscardGranularity: 512, MaxDiscardSectors: maxOp, MaxDiscardSegments: 1, MaxWriteZeroesSectors: maxOp}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := validSpec(t, DeviceSpec{Size: 1 << 30, LogicalBlockSize: 512, PhysicalBlockSize: 4096,
				DiscardGranularity: tt.granularity, WriteZeroes: tt.zeroes})
			p := s.params()
			if p.Types != uapi.ParamTypeBasic|uapi.ParamTypeDiscard {
				t.Errorf("Types = %#x, want BASIC|DISCARD", p.Types)
			}
			if p.Discard != tt.want {
				t.Errorf("Discard = %+v, want %+v", p.Discard, tt.want)
			}
			// The kernel rejects (EINVAL) a discard parameter block with a zero
			// granularity, or with discard sectors but segments != 1.
			if p.Discard.DiscardGranularity == 0 {
				t.Error("discard granularity is 0")
			}
			if p.Discard.MaxDiscardSectors != 0 && p.Discard.MaxDiscardSegments != 1 {
				t.Errorf("max_discard_segments = %d with discard sectors", p.Discard.MaxDiscardSegments)
			}
		})
	}
}

// The device asks of buffers the alignment of the device it serves, as a
// DMA parameter block, and only when told to: ublk's default (4 bytes) is
// the kernel's when it is absent.
func TestParamsDMAAlignment(t *testing.T) {
	s := validSpec(t, DeviceSpec{Size: 1 << 30, DMAAlignment: 511})
	p := s.params()
	if p.Types&uapi.ParamTypeDMA == 0 || p.DMA.Alignment != 511 {
		t.Errorf("Types = %#x, DMA = %+v; want the DMA type with alignment 511", p.Types, p.DMA)
	}
	s = validSpec(t, DeviceSpec{Size: 1 << 30})
	if p := s.params(); p.Types&uapi.ParamTypeDMA != 0 || p.DMA.Alignment != 0 {
		t.Errorf("no alignment asked: Types = %#x, DMA = %+v", p.Types, p.DMA)
	}
}

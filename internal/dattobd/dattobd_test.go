package dattobd

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestParseMinor(t *testing.T) {
	tests := []struct {
		in      string
		want    Minor
		wantErr string // "" = valid
	}{
		{"0", 0, ""},
		{"1", 1, ""},
		{"255", 255, ""},
		{"007", 7, ""},
		{"000", 0, ""},
		{"", 0, "minor is empty"},
		{"abc", 0, `minor "abc" is not a number`},
		{"-1", 0, `minor "-1" is not a number`},
		{"+1", 0, `minor "+1" is not a number`},
		{"1.5", 0, `minor "1.5" is not a number`},
		{" 1", 0, `minor " 1" is not a number`},
		{"1 ", 0, `minor "1 " is not a number`},
		{"0x1", 0, `minor "0x1" is not a number`},
		{"١", 0, "is not a number"}, // Arabic-Indic digit one
		{"256", 0, "minor 256 is out of range 0..255"},
		{"1000", 0, "minor 1000 is out of range 0..255"},
		{"9223372036854775807", 0, "out of range 0..255"},
		{"99999999999999999999999999", 0, "out of range 0..255"},
	}
	for _, tt := range tests {
		got, err := ParseMinor(tt.in)
		if tt.wantErr == "" {
			if err != nil || got != tt.want {
				t.Errorf("ParseMinor(%q) = %d, %v; want %d, nil", tt.in, got, err, tt.want)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
			t.Errorf("ParseMinor(%q) = %d, %v; want error %q", tt.in, got, err, tt.wantErr)
		}
		if got != 0 {
			t.Errorf("ParseMinor(%q) returned %d with an error", tt.in, got)
		}
	}
}

func TestDevicePaths(t *testing.T) {
	m := Minor(7)
	for _, c := range [][2]string{
		{m.FrontPath(), "/dev/ublkb7"},
		{m.FrontCharPath(), "/dev/ublkc7"},
		{m.SnapshotPath(), "/dev/ublkb263"},
		{m.SnapshotCharPath(), "/dev/ublkc263"},
		{m.DattoPath(), "/dev/datto7"},
	} {
		if c[0] != c[1] {
			t.Errorf("got %s, want %s", c[0], c[1])
		}
	}
	for _, mm := range []Minor{0, 1, 254, 255} {
		back, ok := MinorOfSnapshot(mm.SnapshotID())
		if !ok || back != mm {
			t.Errorf("MinorOfSnapshot(%d) = %d, %v; want %d", mm.SnapshotID(), back, ok, mm)
		}
		if _, ok := MinorOfSnapshot(mm.FrontID()); ok {
			t.Errorf("front id %d taken for a snapshot id", mm.FrontID())
		}
	}
	if _, ok := MinorOfSnapshot(512); ok {
		t.Error("id 512 mapped to a minor")
	}
}

func TestModeText(t *testing.T) {
	for _, m := range []Mode{Passthrough, Snapshot, Incremental} {
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		var back Mode
		if err := json.Unmarshal(b, &back); err != nil || back != m {
			t.Errorf("%v -> %s -> %v, %v", m, b, back, err)
		}
	}
	if b, _ := json.Marshal(Snapshot); string(b) != `"snapshot"` {
		t.Errorf("Snapshot marshals as %s", b)
	}
	var m Mode
	if err := json.Unmarshal([]byte(`"frozen"`), &m); err == nil {
		t.Error("unknown mode accepted")
	}
	if _, err := Mode(9).MarshalText(); err == nil {
		t.Error("mode 9 marshalled")
	}
	if ActiveState(Snapshot) != 3 || ActiveState(Incremental) != 2 || ActiveState(Passthrough) != -1 {
		t.Error("active states are not dattobd's")
	}
}

func TestMinorJSON(t *testing.T) {
	var v struct{ M Minor }
	if err := json.Unmarshal([]byte(`{"M":42}`), &v); err != nil || v.M != 42 {
		t.Errorf("unmarshal 42 = %d, %v", v.M, err)
	}
	if err := json.Unmarshal([]byte(`{"M":256}`), &v); err == nil {
		t.Error("minor 256 accepted from JSON")
	}
	if b, _ := json.Marshal(v); string(b) != `{"M":42}` {
		t.Errorf("marshal = %s", b)
	}
}

func TestSnapshotMinor(t *testing.T) {
	for path, want := range map[string]int{
		"/dev/datto0": 0, "/dev/datto255": 255, "/dev/ublkb256": 0, "/dev/ublkb300": 44, "/dev/ublkb511": 255,
		"/dev/datto256": -1, "/dev/dattox": -1, "/dev/ublkb5": -1, "/dev/ublkb512": -1, "/dev/ublkb": -1,
		"/dev/ublkb+1": -1, "/dev/sda": -1, "/dev/datto": -1,
	} {
		m, ok := SnapshotMinor(path)
		if want < 0 {
			if ok {
				t.Errorf("SnapshotMinor(%q) = %d, want not a snapshot device", path, m)
			}
		} else if !ok || int(m) != want {
			t.Errorf("SnapshotMinor(%q) = %d, %v; want %d", path, m, ok, want)
		}
	}
}

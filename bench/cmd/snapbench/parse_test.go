package main

import "testing"

// A run with a read job and a write job at once (group reporting) keeps
// each side's bandwidth, which the both-disks-at-once row takes the
// slower of.
func TestFioTotalsKeepsReadAndWriteShares(t *testing.T) {
	const out = `fio-3.39 {"jobs": [{"error": 0,
		"read": {"iops": 700, "bw_bytes": 734003200, "total_ios": 2100},
		"write": {"iops": 400, "bw_bytes": 419430400, "total_ios": 1200}}]}`
	r, err := fioTotals(out)
	if err != nil {
		t.Fatal(err)
	}
	if r.readBW != 734003200 || r.writeBW != 419430400 || r.bw != 734003200+419430400 || r.iops != 1100 {
		t.Fatalf("fioTotals = %+v", r)
	}
}

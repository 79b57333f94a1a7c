package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// fioRun is one fio run's totals.
type fioRun struct {
	round int
	iops  float64 // I/O per second, reads and writes together
	bw    float64 // bytes per second
	ios   float64 // I/Os completed
	// The reads' and the writes' shares of bw (a run with a read job and
	// a write job at once has both).
	readBW, writeBW float64
}

// value is one @@VAL marker.
type value struct {
	round int
	v     float64
}

// data is everything the guest reported.
type data struct {
	fio  map[string][]fioRun // "group job variant"
	vals map[string][]value
}

func (d *data) runs(group, job, variant string) []fioRun {
	return d.fio[group+" "+job+" "+variant]
}

// parse reads the guest's markers: fio JSON between "@@FIO g j v r" and
// "@@END", and "@@VAL name round value" lines.
func parse(out string) (*data, error) {
	d := &data{fio: map[string][]fioRun{}, vals: map[string][]value{}}
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<24)
	var tag []string
	var js strings.Builder
	for sc.Scan() {
		line := sc.Text()
		// A marker may follow output that ended without a newline.
		if i := strings.Index(line, "@@"); i > 0 {
			if tag != nil {
				js.WriteString(line[:i])
			}
			line = line[i:]
		}
		switch {
		case strings.HasPrefix(line, "@@FIO "):
			tag = strings.Fields(line)[1:]
			if len(tag) != 4 {
				return nil, fmt.Errorf("bad marker %q", line)
			}
			js.Reset()
		case strings.HasPrefix(line, "@@END") && tag != nil:
			r, err := fioTotals(js.String())
			if err != nil {
				return nil, fmt.Errorf("%s: %w", strings.Join(tag, " "), err)
			}
			r.round, _ = strconv.Atoi(tag[3])
			k := strings.Join(tag[:3], " ")
			d.fio[k] = append(d.fio[k], r)
			tag = nil
		case strings.HasPrefix(line, "@@VAL "):
			f := strings.Fields(line)
			if len(f) < 3 {
				return nil, fmt.Errorf("bad marker %q", line)
			}
			round, _ := strconv.Atoi(f[2])
			v := 0.0
			if len(f) > 3 {
				var err error
				if v, err = strconv.ParseFloat(f[3], 64); err != nil {
					return nil, fmt.Errorf("bad value in %q", line)
				}
			}
			d.vals[f[1]] = append(d.vals[f[1]], value{round, v})
		case tag != nil:
			js.WriteString(line)
			js.WriteByte('\n')
		}
	}
	return d, sc.Err()
}

func fioTotals(text string) (fioRun, error) {
	if i := strings.Index(text, "{"); i > 0 {
		text = text[i:]
	}
	var doc struct {
		Jobs []struct {
			Error       int `json:"error"`
			Read, Write struct {
				IOPS     float64 `json:"iops"`
				BW       float64 `json:"bw_bytes"`
				TotalIOs float64 `json:"total_ios"`
			}
		} `json:"jobs"`
	}
	if err := json.Unmarshal([]byte(text), &doc); err != nil || len(doc.Jobs) == 0 {
		return fioRun{}, fmt.Errorf("unreadable fio output: %v", err)
	}
	j := doc.Jobs[0]
	if j.Error != 0 {
		return fioRun{}, fmt.Errorf("fio reported error %d", j.Error)
	}
	return fioRun{iops: j.Read.IOPS + j.Write.IOPS, bw: j.Read.BW + j.Write.BW, ios: j.Read.TotalIOs + j.Write.TotalIOs,
		readBW: j.Read.BW, writeBW: j.Write.BW}, nil
}

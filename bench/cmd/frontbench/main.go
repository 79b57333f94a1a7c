// Command frontbench measures the ublk front device against the raw disk
// under it, inside the VM rig: 4k random read and write at QD32, 1M
// sequential read and write, interleaved (raw, front, raw, front...) over
// several rounds, reported as medians and ratios, plus the server's CPU time
// per I/O. Where the kernel serves zero copy it measures copy mode (attach
// --copy) beside it; it measures the front device over null_blk against raw
// null_blk too, and the servers' memory. -kernel picks the rig's kernel
// (6.12: copy mode; 7.3: zero copy). With -record it appends the tables to
// bench/RESULTS.md.
package main

import (
	"bufio"
	"context"
	_ "embed"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/dbdublk/dbdublk/tests/vm"

	"github.com/dbdublk/dbdublk/bench/internal/stats"
)

//go:embed bench.sh
var script string

var (
	rounds  = flag.Int("rounds", 3, "interleaved rounds")
	runtime = flag.Int("runtime", 5, "seconds per fio run")
	record  = flag.String("record", "", "append the table to this markdown file (e.g. bench/RESULTS.md)")
	kernel  = flag.String("kernel", "", "kernel series of the VM rig (default $DBD_KERNEL or "+vm.DefaultKernel+")")
	attach  = flag.String("attach", "", "extra flags for every attach (e.g. \"--depth 64 --max-io 262144\"), to compare settings")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "frontbench:", err)
		os.Exit(1)
	}
}

// sample is one fio run.
type sample struct {
	iops, bw float64 // I/O per second, bytes per second
	ios      float64 // I/Os completed
	cpuTicks float64 // server CPU ticks (USER_HZ) during the run
}

func run() error {
	work, err := os.MkdirTemp("", "frontbench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	dbdctl := filepath.Join(work, "dbdctl")
	if err := vm.GoBuild("build", "-o", dbdctl, "./ctl/dbdctl"); err != nil {
		return err
	}
	sh := filepath.Join(work, "bench.sh")
	if err := os.WriteFile(sh, []byte(script), 0o755); err != nil {
		return err
	}
	// Fully allocated images, so neither side reads host-file holes.
	var disks []vm.Disk
	for _, name := range []string{"raw.img", "front.img", "copy.img"} {
		p := filepath.Join(work, name)
		if out, err := exec.Command("fallocate", "-l", "1G", p).CombinedOutput(); err != nil {
			return fmt.Errorf("fallocate: %v: %s", err, out)
		}
		disks = append(disks, vm.Disk{Path: p, Size: 1 << 30})
	}
	fmt.Printf("booting the VM; %d rounds x 4 jobs x 2 targets x %ds\n", *rounds, *runtime)
	res, err := vm.Run(context.Background(), vm.Config{
		Kernel:    *kernel,
		MemoryMiB: 3072, // null_blk keeps its 2 x 512 MiB in guest memory
		Disks:     disks,
		Files:     map[string]string{"/usr/local/bin/dbdctl": dbdctl, "/usr/local/bin/bench.sh": sh},
		Programs:  []string{"fio"},
		Modules:   []string{"ublk_drv", "null_blk"},
		Script:    fmt.Sprintf("mkdir -p /var/log\nROUNDS=%d RUNTIME=%d ATTACH='%s' /bin/sh /usr/local/bin/bench.sh", *rounds, *runtime, *attach),
		Timeout:   60 * time.Minute,
		Logf:      func(f string, a ...any) { fmt.Printf("[vm] "+f+"\n", a...) },
	})
	if err != nil {
		return err
	}
	if res.ExitCode != 0 || !strings.Contains(res.Output, "@@DONE") {
		return fmt.Errorf("bench script failed (status %d):\n%s", res.ExitCode, res.Output)
	}
	raw := filepath.Join(os.TempDir(), "frontbench-output.txt")
	os.WriteFile(raw, []byte(res.Output), 0o644)
	r, err := parse(res.Output)
	if err != nil {
		return fmt.Errorf("%w (guest output kept in %s)", err, raw)
	}
	tables := render(r)
	fmt.Print(tables)
	if *record != "" {
		f, err := os.OpenFile(*record, os.O_APPEND|os.O_WRONLY|os.O_CREATE, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		fmt.Fprintf(f, "\n## %s — front device vs raw, kernel %s, %s\n\n%s", time.Now().UTC().Format("2006-01-02"), r.kernel, r.dataPath, tables)
	}
	return nil
}

// results is what the guest reported.
type results struct {
	samples          map[string]map[string][]sample // job → target → runs
	dataPath, kernel string
	rss              map[string][2]int // target → VmRSS, VmHWM in KiB at the end
}

// parse reads the markers and fio JSON the guest printed.
func parse(out string) (results, error) {
	r := results{samples: map[string]map[string][]sample{}, rss: map[string][2]int{}}
	samples := r.samples
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<24)
	var job, target string
	var js strings.Builder
	for sc.Scan() {
		line := sc.Text()
		// fio's JSON may end without a newline before the next marker.
		if i := strings.Index(line, "@@"); i > 0 {
			if job != "" {
				js.WriteString(line[:i])
				js.WriteByte('\n')
			}
			line = line[i:]
		}
		switch f := strings.Fields(line); {
		case strings.HasPrefix(line, "@@DATAPATH ") && len(f) == 3:
			r.dataPath, r.kernel = f[1], f[2]
		case strings.HasPrefix(line, "@@RSS ") && len(f) == 4:
			rss, _ := strconv.Atoi(f[2])
			hwm, _ := strconv.Atoi(f[3])
			r.rss[f[1]] = [2]int{rss, hwm}
		case strings.HasPrefix(line, "@@JOB "):
			f := strings.Fields(line)
			job, target = f[2], f[3]
			js.Reset()
		case strings.HasPrefix(line, "@@CPU "):
			ticks, _ := strconv.ParseFloat(strings.Fields(line)[1], 64)
			s, err := fioSample(js.String())
			if err != nil {
				return r, fmt.Errorf("%s on %s: %w", job, target, err)
			}
			s.cpuTicks = ticks
			if samples[job] == nil {
				samples[job] = map[string][]sample{}
			}
			samples[job][target] = append(samples[job][target], s)
			job = ""
		default:
			if job != "" {
				js.WriteString(line)
				js.WriteByte('\n')
			}
		}
	}
	return r, nil
}

func fioSample(text string) (sample, error) {
	if i := strings.Index(text, "{"); i > 0 {
		text = text[i:]
	}
	var doc struct {
		Jobs []struct {
			Read, Write struct {
				IOPS     float64 `json:"iops"`
				BW       float64 `json:"bw_bytes"`
				TotalIOs float64 `json:"total_ios"`
			}
		} `json:"jobs"`
	}
	if err := json.Unmarshal([]byte(text), &doc); err != nil || len(doc.Jobs) == 0 {
		return sample{}, fmt.Errorf("unreadable fio output: %v", err)
	}
	j := doc.Jobs[0]
	return sample{iops: j.Read.IOPS + j.Write.IOPS, bw: j.Read.BW + j.Write.BW, ios: j.Read.TotalIOs + j.Write.TotalIOs}, nil
}

// pairs are the comparisons rendered, each a table: a target against its
// base, in the same run.
var pairs = []struct{ title, base, target string }{
	{"front device vs raw virtio disk", "raw", "front"},
	{"front device in copy mode (attach --copy) vs raw virtio disk", "raw", "copy"},
	{"front device over null_blk (memory backed) vs raw null_blk", "nullraw", "nullfront"},
}

func render(r results) string {
	var b strings.Builder
	for _, p := range pairs {
		if _, ok := r.samples["randread"][p.target]; !ok {
			continue
		}
		path := r.dataPath
		if p.target == "copy" {
			path = "copy"
		}
		fmt.Fprintf(&b, "%s (data path: %s):\n\n", p.title, path)
		renderPair(&b, r.samples, p.base, p.target)
		b.WriteString("\n")
	}
	if len(r.rss) > 0 {
		b.WriteString("Server memory at the end of the run (after every job above):\n\n| front device | VmRSS | VmHWM |\n|---|---|---|\n")
		for _, t := range []string{"front", "copy", "nullfront"} {
			if m, ok := r.rss[t]; ok {
				fmt.Fprintf(&b, "| %s | %.1f MiB | %.1f MiB |\n", t, float64(m[0])/1024, float64(m[1])/1024)
			}
		}
	}
	return b.String()
}

// renderPair is one table: each job's medians on base and target, their
// ratio (of medians and of sums over the rounds) and the server's CPU time
// per I/O on target (a 1M I/O is a MiB).
func renderPair(b *strings.Builder, samples map[string]map[string][]sample, base, target string) {
	fmt.Fprintf(b, "| job | %s (median) | %s (median) | %s/%s (medians) | %s/%s (sums) | server CPU per I/O |\n", base, target, target, base, target, base)
	b.WriteString("|---|---|---|---|---|---|\n")
	for _, job := range []string{"randread", "randwrite", "seqread", "seqwrite"} {
		raw, front := samples[job][base], samples[job][target]
		seq := strings.HasPrefix(job, "seq")
		val := func(s sample) float64 {
			if seq {
				return s.bw / 1e6
			}
			return s.iops
		}
		var rv, fv, cpu []float64
		var rs, fs float64
		for _, s := range raw {
			rv = append(rv, val(s))
			rs += val(s)
		}
		for _, s := range front {
			fv = append(fv, val(s))
			fs += val(s)
			if s.ios > 0 {
				cpu = append(cpu, s.cpuTicks*1e4/s.ios) // ticks are 10 ms: µs per I/O
			}
		}
		unit, name := "IOPS", map[string]string{"randread": "4k random read QD32", "randwrite": "4k random write QD32",
			"seqread": "1M sequential read QD8", "seqwrite": "1M sequential write QD8"}[job]
		if seq {
			unit = "MB/s"
		}
		mr, mf := stats.Median(rv), stats.Median(fv)
		ratio, sumRatio := 0.0, 0.0
		if mr > 0 {
			ratio = mf / mr
		}
		if rs > 0 {
			sumRatio = fs / rs
		}
		fmt.Fprintf(b, "| %s | %.0f %s | %.0f %s | %.2f | %.2f | %.1f µs |\n", name, mr, unit, mf, unit, ratio, sumRatio, stats.Median(cpu))
	}
}

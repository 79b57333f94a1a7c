package main

import (
	"fmt"
	"sort"
	"strings"

	"github.com/dbdublk/dbdublk/bench/internal/stats"
)

// byRound groups samples by round.
type byRound map[int][]float64

func (b byRound) all() []float64 {
	var xs []float64
	for _, v := range b {
		xs = append(xs, v...)
	}
	return xs
}

func (b byRound) rounds() []int {
	var rs []int
	for r := range b {
		rs = append(rs, r)
	}
	sort.Ints(rs)
	return rs
}

// cmp is num against den: the ratio of medians over all samples, and each
// round's ratio of its own medians (the spread shows how far to trust it).
type cmp struct {
	ratio    float64
	perRound []float64
}

func compare(num, den byRound) cmp {
	var c cmp
	if m := stats.Median(den.all()); m > 0 {
		c.ratio = stats.Median(num.all()) / m
	}
	for _, r := range num.rounds() {
		if d := stats.Median(den[r]); d > 0 && len(num[r]) > 0 {
			c.perRound = append(c.perRound, stats.Median(num[r])/d)
		}
	}
	return c
}

func (c cmp) rounds() string {
	if len(c.perRound) < 2 {
		return ""
	}
	var s []string
	for _, x := range c.perRound {
		s = append(s, fmt.Sprintf("%.2f", x))
	}
	return "; rounds " + strings.Join(s, " / ")
}

func verdict(ok bool) string {
	if ok {
		return "yes"
	}
	return "**no**"
}

// seqJob reports a job's throughput in MB/s rather than IOPS.
func seqJob(job string) bool { return strings.HasPrefix(job, "seq") }

func (d *data) fioVals(group, job, variant string) byRound {
	b := byRound{}
	for _, r := range d.runs(group, job, variant) {
		v := r.iops
		if seqJob(job) {
			v = r.bw / 1e6
		}
		b[r.round] = append(b[r.round], v)
	}
	return b
}

func (d *data) val(name string) byRound {
	b := byRound{}
	for _, v := range d.vals[name] {
		b[v.round] = append(b[v.round], v.v)
	}
	return b
}

// rate is a per-round quotient of two values (e.g. bytes / seconds).
func (d *data) rate(num, den string, scale float64) byRound {
	n, q := d.val(num), d.val(den)
	b := byRound{}
	for r, ns := range n {
		for i, x := range ns {
			if i < len(q[r]) && q[r][i] > 0 {
				b[r] = append(b[r], x/q[r][i]*scale)
			}
		}
	}
	return b
}

func unit(job string) string {
	if seqJob(job) {
		return "MB/s"
	}
	return "IOPS"
}

var jobName = map[string]string{
	"randwrite": "4k random write QD32", "seqwrite": "1M sequential write QD8",
	"randread": "4k random read QD32", "seqread": "1M sequential read QD8",
}

func render(d *data) string {
	var b strings.Builder
	row := func(cells ...string) { fmt.Fprintf(&b, "| %s |\n", strings.Join(cells, " | ")) }

	copied := stats.Median(d.val("copied_blocks_mixed").all())
	devBlocks := stats.Median(d.val("dev_blocks").all())
	pct := 0.0
	if devBlocks > 0 {
		pct = 100 * copied / devBlocks
	}

	fmt.Fprintf(&b, "%d interleaved rounds, %d s per timed fio run, %d MiB fio file in ext4; throughput ratios "+
		"are ratios of medians (per-round ratios after them); \"time\" is the inverse.\n\n", *rounds, *runtime, *fileMB)
	row("metric", "ours", "target", "met", "dattobd 0.12.1")
	row("---", "---", "---", "---", "---")

	// 1-3: snapshot first write, rewrite, incremental vs passthrough.
	type wm struct {
		variant, name string
		limit         float64 // time ratio target
		dattobd       map[string]string
	}
	for _, m := range []wm{
		{"first", "first write in snapshot mode", 2.5, map[string]string{"randwrite": "0.58", "seqwrite": "0.12"}},
		{"rewrite", "rewrite of an already-copied block", 1.05, map[string]string{"randwrite": "0.55", "seqwrite": "0.28"}},
		{"incr", "incremental mode", 1.03, map[string]string{"randwrite": "0.77", "seqwrite": "0.74"}},
	} {
		for _, job := range []string{"randwrite", "seqwrite"} {
			c := compare(d.fioVals("W", job, m.variant), d.fioVals("W", job, "pass"))
			tr := 0.0
			if c.ratio > 0 {
				tr = 1 / c.ratio
			}
			row(fmt.Sprintf("%s, %s, vs passthrough", m.name, jobName[job]),
				fmt.Sprintf("%.2f (%.2f× time)%s", c.ratio, tr, c.rounds()),
				fmt.Sprintf("≤ %.2f× time", m.limit), verdict(c.ratio > 0 && tr <= m.limit), m.dattobd[job])
		}
	}
	// 4: snapshot device reads vs raw disk.
	for _, job := range []string{"seqread", "randread"} {
		for _, phase := range []string{"pure", "mixed"} {
			c := compare(d.fioVals("R", job, "snap-"+phase), d.fioVals("R", job, "raw-"+phase))
			what := "nothing copied"
			if phase == "mixed" {
				what = fmt.Sprintf("%.0f%% of blocks copied", pct)
			}
			target, met, dtb := "—", "—", "—"
			if job == "seqread" {
				target, met = "≥ 0.90", verdict(c.ratio >= 0.90)
				if phase == "pure" {
					dtb = "0.39"
				}
			} else if phase == "pure" {
				dtb = "0.32"
			}
			row(fmt.Sprintf("snapshot device %s vs raw disk, %s", jobName[job], what),
				fmt.Sprintf("%.2f%s", c.ratio, c.rounds()), target, met, dtb)
		}
		c := compare(d.fioVals("R", job, "snap-pure"), d.fioVals("R", job, "front-pure"))
		row("… the same, nothing copied, vs the front device's own read (passthrough, same server)",
			fmt.Sprintf("%.2f%s", c.ratio, c.rounds()), "—", "—", "—")
	}
	// 5: update-img vs raw sequential read of the same bytes.
	for _, kind := range []string{"contig", "scatter"} {
		upd := d.rate("upd_"+kind+"_bytes", "upd_"+kind+"_secs", 1e-6)
		what := fmt.Sprintf("%d MiB changed by one sequential write", *updMB)
		if kind == "scatter" {
			what = fmt.Sprintf("%d MiB changed in scattered 4 KiB blocks", *scatMB)
		}
		fioRaw := d.fioVals("U", "seqread", "raw-"+kind)
		ddRaw := d.rate("dd_"+kind+"_bytes", "dd_"+kind+"_us", 1)
		c1, c2 := compare(upd, fioRaw), compare(upd, ddRaw)
		target, met := "≥ 0.80", verdict(c1.ratio >= 0.80)
		if kind == "scatter" {
			target, met = "— (its target is the block rate, next row)", "—"
		}
		row(fmt.Sprintf("update-img throughput vs raw sequential read of the same bytes (fio 1M QD8), %s", what),
			fmt.Sprintf("%.2f (%.0f vs %.0f MB/s)%s", c1.ratio, stats.Median(upd.all()), stats.Median(fioRaw.all()), c1.rounds()),
			target, met, "—")
		if kind == "scatter" {
			// The second target: scattered 4 KiB changes copied at
			// least at half the source disk's 4k random-read rate (both
			// read phases' raw runs).
			rawRand := byRound{}
			for _, v := range []string{"raw-pure", "raw-mixed"} {
				for r, xs := range d.fioVals("R", "randread", v) {
					rawRand[r] = append(rawRand[r], xs...)
				}
			}
			blocks := d.rate("upd_scatter_blocks", "upd_scatter_secs", 1)
			c := compare(blocks, rawRand)
			row(fmt.Sprintf("… blocks copied per second vs the raw disk's 4k random read QD32, %s", what),
				fmt.Sprintf("%.2f (%.0f blocks/s vs %.0f IOPS)%s", c.ratio, stats.Median(blocks.all()), stats.Median(rawRand.all()), c.rounds()),
				"≥ 0.50", verdict(c.ratio >= 0.50), "—")
		}
		imgWrite := d.fioVals("U", "seqwrite", "img-"+kind)
		c4 := compare(upd, imgWrite)
		row(fmt.Sprintf("… the same against a raw write of as many bytes to the image's disk (fio 1M QD8 `O_DIRECT` into an allocated file, fsync), %s", what),
			fmt.Sprintf("%.2f (%.0f MB/s)%s", c4.ratio, stats.Median(imgWrite.all()), c4.rounds()), "—", "—", "—")
		// A copy reads one disk and writes the other at once; in this rig
		// both disks' emulation shares the host's cores, so neither runs
		// at its own rate then. The slower side of the pair is the most
		// any copy here can do.
		both := byRound{}
		for _, r := range d.runs("U", "copy", "both-"+kind) {
			both[r.round] = append(both[r.round], min(r.readBW, r.writeBW)/1e6)
		}
		c5 := compare(upd, both)
		row(fmt.Sprintf("… the same against the raw disk read and the image's disk written at once (fio, 1M QD8 each, 3 s; the slower side), %s", what),
			fmt.Sprintf("%.2f (%.0f MB/s)%s", c5.ratio, stats.Median(both.all()), c5.rounds()), "—", "—", "—")
		row(fmt.Sprintf("… the same against `dd bs=1M iflag=direct` (one request at a time), %s", what),
			fmt.Sprintf("%.2f (%.0f MB/s)%s", c2.ratio, stats.Median(ddRaw.all()), c2.rounds()), "—", "—", "—")
		ddBuf := d.rate("dd_"+kind+"_bytes", "ddbuf_"+kind+"_us", 1)
		c3 := compare(upd, ddBuf)
		row(fmt.Sprintf("… the same against buffered `dd bs=1M` after dropping caches (page cache, as update-img reads), %s", what),
			fmt.Sprintf("%.2f (%.0f MB/s)%s", c3.ratio, stats.Median(ddBuf.all()), c3.rounds()), "—", "—", "—")
	}
	// 6: setup-snapshot latency.
	s1t, s1g := d.val("setup1t_us").all(), d.val("setup1g_us").all()
	row("setup-snapshot latency, 1 TiB sparse device (`-f 2100`, no filesystem mounted)",
		secs(s1t), "< 1 s", verdict(len(s1t) > 0 && stats.Median(s1t) < 1e6), "27 s reported by users")
	row("destroy latency, 1 TiB sparse device", secs(d.val("destroy1t_us").all()), "—", "—", "—")
	row("setup-snapshot latency, 1 GiB device, ext4 mounted (freeze/thaw included)",
		secs(s1g), "—", "—", "0.22 s on a 2 GiB device")
	// 7: server memory.
	for _, cache := range []string{"default", "314572800"} {
		name := "server memory, snapshot mode, default `-c` (24 MiB)"
		target, met := "< 64 MiB", verdict(stats.Median(d.val("rss_default_after_VmHWM_kb").all()) < 64<<10)
		if cache != "default" {
			name = "server memory, snapshot mode, `-c 314572800` (300 MiB, dattobd's default)"
			target, met = "—", "—"
		}
		row(name+fmt.Sprintf(", after %d s of 4k random writes QD32 over the whole 1 TiB device", *rssTime),
			rssCell(d, cache), target, met, "—")
	}

	// Absolute figures, so both systems compare end to end.
	b.WriteString("\nAbsolute medians of the write runs (fio on the file in ext4), and each against the raw disk with the same ext4 and file:\n\n")
	row("job", "raw disk", "passthrough", "snapshot, first write", "snapshot, rewrite", "incremental")
	row("---", "---", "---", "---", "---", "---")
	for _, job := range []string{"randwrite", "seqwrite"} {
		raw := stats.Median(d.fioVals("W", job, "raw").all())
		cells := []string{jobName[job], fmt.Sprintf("%.0f %s", raw, unit(job))}
		for _, v := range []string{"pass", "first", "rewrite", "incr"} {
			m := stats.Median(d.fioVals("W", job, v).all())
			r := 0.0
			if raw > 0 {
				r = m / raw
			}
			cells = append(cells, fmt.Sprintf("%.0f %s (%.2f of raw)", m, unit(job), r))
		}
		row(cells...)
	}
	b.WriteString("\nAbsolute medians of the read runs (whole 1 GiB device, O_DIRECT):\n\n")
	row("job", "raw disk", "front device (passthrough)", "snapshot device, nothing copied", "raw disk (mixed phase)", fmt.Sprintf("snapshot device, %.0f%% copied", pct))
	row("---", "---", "---", "---", "---", "---")
	for _, job := range []string{"seqread", "randread"} {
		cells := []string{jobName[job]}
		for _, v := range []string{"raw-pure", "front-pure", "snap-pure", "raw-mixed", "snap-mixed"} {
			cells = append(cells, fmt.Sprintf("%.0f %s", stats.Median(d.fioVals("R", job, v).all()), unit(job)))
		}
		row(cells...)
	}
	fmt.Fprintf(&b, "\nupdate-img copied %s bytes (%s blocks) in the contiguous case and %s bytes (%s blocks) in the scattered one (medians).\n",
		num(stats.Median(d.val("upd_contig_bytes").all())), num(stats.Median(d.val("upd_contig_blocks").all())),
		num(stats.Median(d.val("upd_scatter_bytes").all())), num(stats.Median(d.val("upd_scatter_blocks").all())))
	renderCPU(&b, d)
	return b.String()
}

func num(x float64) string { return fmt.Sprintf("%.0f", x) }

// secs renders microsecond samples as a median in seconds with the range.
func secs(us []float64) string {
	if len(us) == 0 {
		return "n/a"
	}
	s := append([]float64(nil), us...)
	sort.Float64s(s)
	return fmt.Sprintf("%.3f s (median of %d; %.3f–%.3f)", stats.Median(s)/1e6, len(s), s[0]/1e6, s[len(s)-1]/1e6)
}

func rssCell(d *data, cache string) string {
	get := func(k string) float64 { return stats.Median(d.val("rss_" + cache + "_" + k).all()) }
	runs := d.runs("M", "randwrite", "snap-"+cache)
	iops := 0.0
	if len(runs) > 0 {
		iops = runs[0].iops
	}
	s := fmt.Sprintf("VmRSS %.0f → %.0f MiB (anon %.0f, file %.0f), VmHWM %.0f MiB; index (cache and filter) in use %.0f MiB; %.0f blocks copied (%.0f IOPS)",
		get("before_VmRSS_kb")/1024, get("after_VmRSS_kb")/1024, get("after_RssAnon_kb")/1024, get("after_RssFile_kb")/1024,
		get("after_VmHWM_kb")/1024, get("cache_in_use")/(1<<20), get("changed"), iops)
	var curve []string
	c := d.val("rss_" + cache + "_curve")
	for _, t := range c.rounds() { // the "round" of a curve point is its second
		curve = append(curve, fmt.Sprintf("%.0f", stats.Median(c[t])/1024))
	}
	if len(curve) > 0 {
		s += "; VmRSS every 5 s: " + strings.Join(curve, ", ") + " MiB"
	}
	s += fmt.Sprintf("; of the final RSS, %.0f MiB are transparent huge pages", get("after_AnonHugePages_kb")/1024)
	if e := get("error"); e != 0 {
		s += fmt.Sprintf("; **snapshot failed with error %.0f**", e)
	}
	return s
}

// cpuPerIO is the server's CPU time per I/O, in µs, of each write run of
// job in variant: its ticks (10 ms) over the I/Os fio completed, run by
// run in the order both were reported.
func (d *data) cpuPerIO(job, variant string) []float64 {
	runs, ticks := d.runs("W", job, variant), d.vals["cpu_"+job+"_"+variant]
	var out []float64
	for i := 0; i < len(runs) && i < len(ticks); i++ {
		if runs[i].ios > 0 {
			out = append(out, ticks[i].v*1e4/runs[i].ios)
		}
	}
	return out
}

// renderCPU is the table of the server's CPU time per I/O in each mode
// against passthrough, from the same runs: steadier under TCG than
// throughput, so it can show a few percent.
func renderCPU(b *strings.Builder, d *data) {
	if len(d.vals) == 0 || len(d.cpuPerIO("randwrite", "pass")) == 0 {
		return
	}
	b.WriteString("\nServer CPU time per I/O during the write runs above (user + system ticks of 10 ms over the I/Os fio completed; a 1M I/O is a MiB), medians of the runs, and each mode against passthrough:\n\n")
	b.WriteString("| job | passthrough | snapshot, first write | snapshot, rewrite | incremental | first/pass | rewrite/pass | incremental/pass |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, job := range []string{"randwrite", "seqwrite"} {
		pass := stats.Median(d.cpuPerIO(job, "pass"))
		cells := []string{map[string]string{"randwrite": "4k random write QD32", "seqwrite": "1M sequential write QD8"}[job], fmt.Sprintf("%.1f µs", pass)}
		var ratios []string
		for _, v := range []string{"first", "rewrite", "incr"} {
			m := stats.Median(d.cpuPerIO(job, v))
			cells = append(cells, fmt.Sprintf("%.1f µs", m))
			if pass > 0 {
				ratios = append(ratios, fmt.Sprintf("%.2f×", m/pass))
			} else {
				ratios = append(ratios, "n/a")
			}
		}
		fmt.Fprintf(b, "| %s |\n", strings.Join(append(cells, ratios...), " | "))
	}
}

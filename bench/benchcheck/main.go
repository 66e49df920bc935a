// Command benchcheck reads the output of the micro benchmarks (go test
// -bench, one or several passes concatenated, see bench/micro.sh) and
// prints the goals of BENCHMARKS.md as a markdown table, met or not.
//
//	go run ./bench/benchcheck micro.txt
//
// A ratio between two benchmarks is taken within each pass (the n-th
// result of one over the n-th result of the other), so that when the
// passes ran interleaved both sides of a ratio saw the same load; the
// table gives the median over passes and the range. Not run by CI.
package main

import (
	"bufio"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// results[pkg-qualified name][unit] lists values in file order (one per
// pass).
type results map[string]map[string][]float64

var (
	benchLine = regexp.MustCompile(`^(Benchmark\S+?)(?:-\d+)?\s+\d+\s+(.*)$`)
	metric    = regexp.MustCompile(`([0-9.e+-]+)\s+(\S+)`)
)

func parse(paths []string) (results, error) {
	rs := results{}
	for _, path := range paths {
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		pkg := ""
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			if p, ok := strings.CutPrefix(line, "pkg: "); ok {
				pkg = p[strings.LastIndex(p, "/")+1:]
				continue
			}
			m := benchLine.FindStringSubmatch(line)
			if m == nil {
				continue
			}
			name := pkg + "." + m[1]
			if rs[name] == nil {
				rs[name] = map[string][]float64{}
			}
			for _, mm := range metric.FindAllStringSubmatch(m[2], -1) {
				v, err := strconv.ParseFloat(mm[1], 64)
				if err != nil {
					continue
				}
				rs[name][mm[2]] = append(rs[name][mm[2]], v)
			}
		}
		f.Close()
		if err := sc.Err(); err != nil {
			return nil, err
		}
	}
	return rs, nil
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func span(xs []float64) (lo, hi float64) {
	if len(xs) == 0 {
		return 0, 0
	}
	lo, hi = xs[0], xs[0]
	for _, x := range xs {
		lo, hi = min(lo, x), max(hi, x)
	}
	return lo, hi
}

// ratios returns a[i]/b[i] for each pass i.
func ratios(a, b []float64) []float64 {
	var out []float64
	for i := 0; i < len(a) && i < len(b); i++ {
		if b[i] != 0 {
			out = append(out, a[i]/b[i])
		}
	}
	return out
}

type row struct {
	goal, measured, target string
	ok                     bool
	missing                bool
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: benchcheck FILE...")
		os.Exit(2)
	}
	rs, err := parse(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchcheck:", err)
		os.Exit(1)
	}
	var rows []row
	get := func(name, unit string) []float64 { return rs[name][unit] }
	add := func(goal, target string, xs []float64, format string, ok func(float64) bool) {
		if len(xs) == 0 {
			rows = append(rows, row{goal: goal, target: target, missing: true})
			return
		}
		med := median(xs)
		lo, hi := span(xs)
		measured := fmt.Sprintf(format, med)
		if len(xs) > 1 && lo != hi {
			measured += fmt.Sprintf(" ("+format+"–"+format+")", lo, hi)
		}
		rows = append(rows, row{goal: goal, measured: measured, target: target, ok: ok(med)})
	}

	const sel = "affinity.BenchmarkSelect/"
	add("pinned path allocations, affinity N=16", "0 allocs/op",
		get(sel+"affinity/pinned/N=16", "allocs/op"), "%.0f allocs/op", func(v float64) bool { return v == 0 })
	const every = "affinity.BenchmarkSelectPinnedEvery/"
	add("pinned path time ÷ cookie policy's pinned path, N=16, sessions on every upstream in turn", "≤ 0.100",
		ratios(get(every+"affinity/N=16", "ns/op"), get(every+"cookie/N=16", "ns/op")),
		"%.4f", func(v float64) bool { return v <= 0.1 })
	add("  (BenchmarkSelect: cookie pinned to one upstream drawn at random per run)", "≤ 0.100",
		ratios(get(sel+"affinity/pinned/N=16", "ns/op"), get(sel+"cookie/pinned/N=16", "ns/op")),
		"%.4f", func(v float64) bool { return v <= 0.1 })
	add("new-session path time ÷ client_ip_hash, N=3", "≤ 1.00",
		ratios(get(sel+"affinity/new/N=3", "ns/op"), get(sel+"client_ip_hash/N=3", "ns/op")),
		"%.2f", func(v float64) bool { return v <= 1 })
	add("  (like for like: affinity keyed on client_ip ÷ client_ip_hash, N=3)", "≤ 1.00",
		ratios(get(sel+"affinity_client_ip/N=3", "ns/op"), get(sel+"client_ip_hash/N=3", "ns/op")),
		"%.2f", func(v float64) bool { return v <= 1 })
	for _, n := range []int{3, 16, 64, 1000} {
		name := fmt.Sprintf("hashring.BenchmarkLookup/N=%d", n)
		add(fmt.Sprintf("ring lookup (hash 32-byte key + table), N=%d", n), "≤ 15 ns",
			get(name, "ns/op"), "%.1f ns", func(v float64) bool { return v <= 15 })
		add(fmt.Sprintf("ring lookup allocations, N=%d", n), "0 allocs/op",
			get(name, "allocs/op"), "%.0f allocs/op", func(v float64) bool { return v == 0 })
	}
	add("ring build, N=1000", "≤ 5 ms",
		scale(get("hashring.BenchmarkBuild/N=1000", "ns/op"), 1e-6), "%.2f ms", func(v float64) bool { return v <= 5 })
	for _, n := range []string{"100000", "1000000"} {
		add("session table memory, "+n+" sessions (BenchmarkTableMemory)", "≤ 64 B/session",
			get("affinity.BenchmarkTableMemory/sessions="+n, "B/session"), "%.1f B", func(v float64) bool { return v <= 64 })
		add("session table memory, max_sessions "+n+", full (BenchmarkTableBytes)", "≤ 64 B/session",
			get("sessions.BenchmarkTableBytes/sessions="+n, "B/session"), "%.1f B", func(v float64) bool { return v <= 64 })
	}

	fmt.Println("| goal | measured: median (range over passes) | target | |")
	fmt.Println("|---|---|---|---|")
	for _, r := range rows {
		verdict := "met"
		switch {
		case r.missing:
			r.measured, verdict = "no result", "NOT measured"
		case !r.ok:
			verdict = "**NOT met**"
		}
		fmt.Printf("| %s | %s | %s | %s |\n", r.goal, r.measured, r.target, verdict)
	}
	fmt.Println()
	tables(rs)
}

// cell formats the median of a benchmark's unit with an SI-ish time
// unit, or "–" if it did not run.
func cell(rs results, name, unit string) string {
	xs := rs[name][unit]
	if len(xs) == 0 {
		return "–"
	}
	v := median(xs)
	switch unit {
	case "ns/op":
	case "B/op":
		if v >= 1024 {
			return fmt.Sprintf("%.0f KiB", v/1024)
		}
		return fmt.Sprintf("%.0f B", v)
	case "B/session":
		return fmt.Sprintf("%.1f B", v)
	default:
		return fmt.Sprintf("%.0f", v)
	}
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%.2f ms", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%.2f µs", v/1e3)
	default:
		return fmt.Sprintf("%.1f ns", v)
	}
}

// tables prints the comparison and scale tables of BENCHMARKS.md:
// medians over passes.
func tables(rs results) {
	selectName := func(n int, path string) string {
		if n > 64 {
			return fmt.Sprintf("affinity.BenchmarkSelectScale/%s/N=%d", path, n)
		}
		return fmt.Sprintf("affinity.BenchmarkSelect/%s/N=%d", path, n)
	}
	paths := []string{"affinity/pinned", "cookie/pinned", "affinity/new", "cookie/new", "affinity_client_ip", "client_ip_hash", "header", "round_robin"}
	fmt.Println("Select, time per call (allocs/op), median over passes:")
	fmt.Println()
	fmt.Print("| N |")
	for _, p := range paths {
		fmt.Printf(" %s |", p)
	}
	fmt.Println()
	fmt.Println("|---|" + strings.Repeat("---|", len(paths)))
	for _, n := range []int{3, 16, 64, 256, 1000} {
		fmt.Printf("| %d |", n)
		for _, p := range paths {
			name := selectName(n, p)
			if _, ok := rs[name]; !ok {
				fmt.Print(" – |")
				continue
			}
			fmt.Printf(" %s (%s) |", cell(rs, name, "ns/op"), cell(rs, name, "allocs/op"))
		}
		fmt.Println()
	}

	fmt.Println()
	fmt.Println("Pinned path with the sessions on every upstream in turn (BenchmarkSelectPinnedEvery):")
	fmt.Println()
	fmt.Println("| N | affinity | cookie | affinity ÷ cookie (per pass: median, range) |")
	fmt.Println("|---|---|---|---|")
	for _, n := range []int{3, 16, 64} {
		a := fmt.Sprintf("affinity.BenchmarkSelectPinnedEvery/affinity/N=%d", n)
		c := fmt.Sprintf("affinity.BenchmarkSelectPinnedEvery/cookie/N=%d", n)
		r := ratios(rs[a]["ns/op"], rs[c]["ns/op"])
		lo, hi := span(r)
		fmt.Printf("| %d | %s (%s allocs) | %s (%s allocs) | %.3f (%.3f–%.3f) |\n", n,
			cell(rs, a, "ns/op"), cell(rs, a, "allocs/op"), cell(rs, c, "ns/op"), cell(rs, c, "allocs/op"),
			median(r), lo, hi)
	}

	fmt.Println()
	fmt.Println("Ring (hashring.BenchmarkScale): build, lookup (hash a 32-byte key + table), and Caddy's rendezvous hashing on the same keys:")
	fmt.Println()
	fmt.Println("| N | build | build B/op | lookup | lookup allocs | rendezvous | rendezvous allocs |")
	fmt.Println("|---|---|---|---|---|---|---|")
	for _, n := range []int{3, 16, 64, 256, 1000} {
		b := fmt.Sprintf("hashring.BenchmarkScale/build/N=%d", n)
		l := fmt.Sprintf("hashring.BenchmarkScale/lookup/N=%d", n)
		r := fmt.Sprintf("hashring.BenchmarkScale/rendezvous/N=%d", n)
		fmt.Printf("| %d | %s | %s | %s | %s | %s | %s |\n", n,
			cell(rs, b, "ns/op"), cell(rs, b, "B/op"), cell(rs, l, "ns/op"), cell(rs, l, "allocs/op"),
			cell(rs, r, "ns/op"), cell(rs, r, "allocs/op"))
	}

	fmt.Println()
	fmt.Println("Session table by live sessions (sessions.BenchmarkTableScale, affinity.BenchmarkSelectSessions, sessions.BenchmarkTableBytes):")
	fmt.Println()
	fmt.Println("| sessions | get (hit) | put (known key) | put (new key, table full: evicts) | Select pinned, N=16, sessions taking turns | heap B/session (table full) |")
	fmt.Println("|---|---|---|---|---|---|")
	for _, n := range []int{1_000, 100_000, 1_000_000} {
		t := "sessions.BenchmarkTableScale/"
		fmt.Printf("| %d | %s | %s | %s | %s | %s |\n", n,
			cell(rs, fmt.Sprintf("%sget/sessions=%d", t, n), "ns/op"),
			cell(rs, fmt.Sprintf("%sput/known/sessions=%d", t, n), "ns/op"),
			cell(rs, fmt.Sprintf("%sput/new-full/sessions=%d", t, n), "ns/op"),
			cell(rs, fmt.Sprintf("affinity.BenchmarkSelectSessions/affinity/pinned/N=16/sessions=%d", n), "ns/op"),
			cell(rs, fmt.Sprintf("sessions.BenchmarkTableBytes/sessions=%d", n), "B/session"))
	}
}

func scale(xs []float64, f float64) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = x * f
	}
	return out
}

// Command e2e is the helper of bench/e2e.sh, the end-to-end benchmark of
// `lb_policy affinity` against Caddy's own policies. It is not part of
// the module's API and not run by CI.
//
//	e2e serve -n 16 -addrs FILE   N in-memory-session upstreams on loopback
//	e2e freeport                  print a free TCP port on 127.0.0.1
//	e2e wait -url URL             wait until URL answers 200
//	e2e fetch -url URL -out FILE  save a loopback URL's body (a CPU profile)
//	e2e report FILE [SELECT]      markdown tables of the results
//
// # The upstreams
//
// One process serves N upstreams, each on its own 127.0.0.1 port with its
// own session memory: a map from session id to a visit counter, like the
// demo app (demoapp) but without its HTML, JSON and SHA-256, so that the
// upstreams cost little next to the proxy. A request without a "sid"
// cookie gets a new session, whose id comes back in the X-Bench-Sid
// header; a request whose sid this upstream does not know (the session
// lives on another upstream) starts a new counter under that id, which the
// client sees as a visit count that did not go up by one. So a new
// session, a kept one and a broken one cost the upstream the same: one map
// operation. Every response echoes the request's X-Bench-Slot header (the
// wrk script's session slot) and carries X-Bench-Visits.
//
// The session id is not sent as Set-Cookie: wrk's Lua API gives a
// response's headers as a table keyed by name, so of several Set-Cookie
// lines a script sees only the last, and the proxy's own cookie (the pin
// of `affinity`, the lb cookie of `cookie`) must be the one it sees.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "freeport":
		err = freePort()
	case "wait":
		err = wait(os.Args[2:])
	case "fetch":
		err = fetch(os.Args[2:])
	case "report":
		err = report(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: e2e serve|freeport|wait|fetch|report ... (see bench/e2e.sh)")
	os.Exit(2)
}

// upstream is one in-memory-session app instance.
type upstream struct {
	name     string
	prefix   string // makes this process's session ids unique
	next     atomic.Uint64
	max      int
	mu       sync.Mutex
	sessions map[string]uint32 // session id -> visits
}

func (u *upstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	if slot := r.Header.Get("X-Bench-Slot"); slot != "" {
		h["X-Bench-Slot"] = []string{slot}
	}
	sid := ""
	if c, err := r.Cookie("sid"); err == nil {
		sid = c.Value
	}
	if sid == "" {
		sid = u.prefix + strconv.FormatUint(u.next.Add(1), 16)
		h["X-Bench-Sid"] = []string{sid}
	}
	u.mu.Lock()
	if len(u.sessions) >= u.max {
		// Bounded memory: a run creates a few thousand sessions, so this
		// only fires after many runs; all sessions are forgotten at once,
		// as a restart would.
		clear(u.sessions)
	}
	visits := u.sessions[sid] + 1
	u.sessions[sid] = visits
	u.mu.Unlock()
	h["X-Bench-Visits"] = []string{strconv.FormatUint(uint64(visits), 10)}
	h["X-Worker"] = []string{u.name}
	h["Content-Type"] = []string{"text/plain; charset=utf-8"}
	h["Cache-Control"] = []string{"no-store"}
	_, _ = io.WriteString(w, "ok\n")
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	n := fs.Int("n", 16, "number of upstreams (ports)")
	host := fs.String("host", "127.0.0.1", "loopback address to listen on")
	addrsFile := fs.String("addrs", "", "write the upstreams' addresses, space-separated, to this file once listening")
	lifetime := fs.Duration("lifetime", 2*time.Hour, "exit after this long even if nobody stops us")
	maxSessions := fs.Int("max-sessions", 200_000, "sessions kept per upstream before it forgets them all")
	_ = fs.Parse(args)
	if ip := net.ParseIP(*host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("-host %q: loopback addresses only", *host)
	}
	if *n < 1 || *n > 1024 {
		return fmt.Errorf("-n %d: want 1..1024", *n)
	}

	prefix := fmt.Sprintf("%08x", rand.Uint32())
	servers := make([]*http.Server, *n)
	addrs := make([]string, *n)
	for i := range servers {
		ln, err := net.Listen("tcp", net.JoinHostPort(*host, "0"))
		if err != nil {
			return err
		}
		u := &upstream{
			name:     fmt.Sprintf("u%d", i),
			prefix:   fmt.Sprintf("%s%02x", prefix, i),
			max:      *maxSessions,
			sessions: make(map[string]uint32),
		}
		srv := &http.Server{Handler: u, ReadHeaderTimeout: 10 * time.Second}
		servers[i] = srv
		addrs[i] = ln.Addr().String()
		go func() { _ = srv.Serve(ln) }()
	}
	line := strings.Join(addrs, " ") + "\n"
	if *addrsFile != "" {
		tmp := *addrsFile + ".tmp"
		if err := os.WriteFile(tmp, []byte(line), 0o644); err != nil {
			return err
		}
		if err := os.Rename(tmp, *addrsFile); err != nil {
			return err
		}
	}
	fmt.Print("upstreams ", line)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	select {
	case <-ctx.Done():
	case <-time.After(*lifetime):
		fmt.Fprintln(os.Stderr, "e2e serve: lifetime over, exiting")
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, s := range servers {
		_ = s.Shutdown(sctx)
	}
	return nil
}

func freePort() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	fmt.Println(ln.Addr().(*net.TCPAddr).Port)
	return nil
}

func wait(args []string) error {
	fs := flag.NewFlagSet("wait", flag.ExitOnError)
	url := fs.String("url", "", "URL to poll (loopback)")
	timeout := fs.Duration("timeout", 30*time.Second, "give up after")
	_ = fs.Parse(args)
	if err := loopbackURL(*url); err != nil {
		return err
	}
	client := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(*timeout)
	var last error
	for time.Now().Before(deadline) {
		resp, err := client.Get(*url)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("status %s", resp.Status)
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready after %s: %v", *url, *timeout, last)
}

func loopbackURL(u string) error {
	if !strings.HasPrefix(u, "http://127.") && !strings.HasPrefix(u, "http://localhost") {
		return fmt.Errorf("-url %q: loopback http URLs only", u)
	}
	return nil
}

func fetch(args []string) error {
	fs := flag.NewFlagSet("fetch", flag.ExitOnError)
	url := fs.String("url", "", "URL to get (loopback)")
	out := fs.String("out", "", "file to write the body to")
	timeout := fs.Duration("timeout", 2*time.Minute, "give up after")
	_ = fs.Parse(args)
	if err := loopbackURL(*url); err != nil {
		return err
	}
	client := &http.Client{Timeout: *timeout}
	resp, err := client.Get(*url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", *url, resp.Status)
	}
	f, err := os.Create(*out)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// result is one measurement, a line of the results file written by
// bench/e2e.sh:
//
//	round N policy rps p50_us p99_us requests errors kept broken cpu_us
//
// cpu_us is the Caddy process's CPU time (user+system) per request.
type result struct {
	round        int
	n            int
	policy       string
	rps          float64
	p50, p99     float64
	requests     int
	errors       int
	kept, broken int
	cpu          float64
}

func report(args []string) error {
	if len(args) < 1 || len(args) > 2 {
		return errors.New("usage: e2e report RESULTS.tsv [SELECT.tsv]")
	}
	f, err := os.Open(args[0])
	if err != nil {
		return err
	}
	defer f.Close()
	var rs []result
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		var r result
		if _, err := fmt.Sscanf(line, "%d %d %s %g %g %g %d %d %d %d %g",
			&r.round, &r.n, &r.policy, &r.rps, &r.p50, &r.p99, &r.requests, &r.errors, &r.kept, &r.broken, &r.cpu); err != nil {
			return fmt.Errorf("%s: bad line %q: %v", args[0], line, err)
		}
		rs = append(rs, r)
	}
	if err := sc.Err(); err != nil {
		return err
	}

	// rr[n][round] is the base policy's measurement that the others of
	// the same round are divided by: round_robin, or E2E_BASE (such as
	// affinity_local when comparing the session stores).
	base := "round_robin"
	if b := os.Getenv("E2E_BASE"); b != "" {
		base = b
	}
	rr := map[int]map[int]result{}
	sizes := map[int]bool{}
	// Policies in the order they first appear.
	var policies []string
	seen := map[string]bool{}
	for _, r := range rs {
		if !seen[r.policy] {
			seen[r.policy] = true
			policies = append(policies, r.policy)
		}
		sizes[r.n] = true
		if r.policy == base {
			if rr[r.n] == nil {
				rr[r.n] = map[int]result{}
			}
			rr[r.n][r.round] = r
		}
	}
	var ns []int
	for n := range sizes {
		ns = append(ns, n)
	}
	sort.Sort(sort.Reverse(sort.IntSlice(ns)))

	fmt.Printf("Medians over rounds; each ratio is to %s in the same round (median, min–max of the per-round ratios).\n", base)
	fmt.Println()
	abbr := "rr"
	if base != "round_robin" {
		abbr = base
	}
	fmt.Printf("| N | policy | rounds | req/s | req/s ÷ %[1]s | p50 ms | p50 ÷ %[1]s | p99 ms | p99 ÷ %[1]s | Caddy CPU µs/req | CPU ÷ %[1]s | sessions kept | errors |\n", abbr)
	fmt.Println("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
	medRatio := map[int]map[string]float64{}
	medCPU := map[int]map[string]float64{}
	for _, n := range ns {
		medRatio[n] = map[string]float64{}
		medCPU[n] = map[string]float64{}
		for _, p := range policies {
			var rps, p50, p99, cpu, ratio, r50, r99, rcpu []float64
			kept, broken, errs := 0, 0, 0
			for _, r := range rs {
				if r.n != n || r.policy != p {
					continue
				}
				rps = append(rps, r.rps)
				p50 = append(p50, r.p50/1000)
				p99 = append(p99, r.p99/1000)
				cpu = append(cpu, r.cpu)
				if base, ok := rr[n][r.round]; ok && base.rps > 0 {
					ratio = append(ratio, r.rps/base.rps)
					r50 = append(r50, r.p50/base.p50)
					r99 = append(r99, r.p99/base.p99)
					rcpu = append(rcpu, r.cpu/base.cpu)
				}
				kept += r.kept
				broken += r.broken
				errs += r.errors
			}
			if len(rps) == 0 {
				continue
			}
			keptPct := "–"
			if kept+broken > 0 {
				keptPct = fmt.Sprintf("%.1f %%", 100*float64(kept)/float64(kept+broken))
			}
			medRatio[n][p] = median(ratio)
			medCPU[n][p] = median(rcpu)
			fmt.Printf("| %d | %s | %d | %.0f | %.3f (%.3f–%.3f) | %.2f | %.2f | %.2f | %.2f | %.1f | %.3f (%.3f–%.3f) | %s | %d |\n",
				n, p, len(rps), median(rps), median(ratio), minOf(ratio), maxOf(ratio),
				median(p50), median(r50), median(p99), median(r99),
				median(cpu), median(rcpu), minOf(rcpu), maxOf(rcpu), keptPct, errs)
		}
	}
	if m, ok := medRatio[16]; ok && seen["affinity"] && seen["cookie"] && seen["round_robin"] {
		aff, cookie := m["affinity"], m["cookie"]
		verdict := func(ok bool) string {
			if ok {
				return "met"
			}
			return "NOT met"
		}
		fmt.Println()
		fmt.Printf("Goal at N=16: affinity ≥ 0.98 × round_robin req/s: %.3f, %s; ahead of cookie: %.3f vs %.3f, %s.\n",
			aff, verdict(aff >= 0.98), aff, cookie, verdict(aff > cookie))
		fmt.Printf("Caddy CPU per request at N=16, ÷ round_robin: affinity %.3f, cookie %.3f, client_ip_hash %.3f.\n",
			medCPU[16]["affinity"], medCPU[16]["cookie"], medCPU[16]["client_ip_hash"])
	}
	if len(args) == 2 {
		return reportSelect(args[1])
	}
	return nil
}

// reportSelect prints the share of Caddy's CPU profile samples spent in
// each policy's Select, from lines "N policy percent seconds total".
func reportSelect(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	fmt.Println()
	fmt.Println("Share of Caddy's CPU spent in the policy's Select (CPU profiles of every measurement, merged per N and policy):")
	fmt.Println()
	fmt.Println("| N | policy | Select, % of Caddy CPU samples | Select, s of CPU | profiled CPU, s |")
	fmt.Println("|---|---|---|---|---|")
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		f := strings.Fields(line)
		if len(f) != 5 || strings.HasPrefix(line, "#") {
			continue
		}
		fmt.Printf("| %s | %s | %s %% | %s | %s |\n", f[0], f[1], f[2], f[3], f[4])
	}
	return nil
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func minOf(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	m := xs[0]
	for _, x := range xs {
		m = min(m, x)
	}
	return m
}

func maxOf(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	m := xs[0]
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}

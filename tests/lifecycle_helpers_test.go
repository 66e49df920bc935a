package tests

// Helpers of the upstream lifecycle and fault tests (lifecycle_test.go,
// faults_test.go): the affinity admin API, backends whose listener can be
// stopped and started again without losing their sessions, config reloads
// and restarts of a Caddy process on its own ports, and a steady load of
// browsers that keep visiting until told to stop.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-affinity/caddy-affinity/demoapp"
)

// ---------------------------------------------------------------------
// The affinity admin API.

// affinityUpstream is one entry of GET /affinity/upstreams.
type affinityUpstream struct {
	Upstream string  `json:"upstream"`
	State    string  `json:"state"`
	SetBy    string  `json:"set_by"`
	Healthy  bool    `json:"healthy"`
	Sessions int64   `json:"sessions"`
	Requests uint64  `json:"requests"`
	Drained  bool    `json:"drained"`
	Since    *string `json:"since"`
	// LastOrder: who set the state, and when (issue 16).
	LastOrder *orderStatus `json:"last_order"`
}

func (u affinityUpstream) String() string {
	return fmt.Sprintf("%s{state=%s set_by=%q healthy=%v sessions=%d requests=%d drained=%v}",
		u.Upstream, u.State, u.SetBy, u.Healthy, u.Sessions, u.Requests, u.Drained)
}

var adminClient = &http.Client{
	Timeout:   10 * time.Second,
	Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true},
}

// adminCall does one request to a Caddy admin listener and returns the
// status, the headers and the body.
func adminCall(method, rawURL, contentType string, body []byte) (int, http.Header, []byte, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, rawURL, rd)
	if err != nil {
		return 0, nil, nil, err
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := adminClient.Do(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, resp.Header, b, err
}

// fetchAffinity returns GET /affinity/upstreams of an admin listener, by
// dial address. It does not touch t, so pollers may call it from any
// goroutine.
func fetchAffinity(admin string) (map[string]affinityUpstream, error) {
	status, _, body, err := adminCall(http.MethodGet, admin+"/affinity/upstreams", "", nil)
	if err != nil {
		return nil, err
	}
	if status != http.StatusOK {
		return nil, fmt.Errorf("GET /affinity/upstreams: status %d: %s", status, body)
	}
	var list []affinityUpstream
	if err := json.Unmarshal(body, &list); err != nil {
		return nil, fmt.Errorf("GET /affinity/upstreams: %v: %s", err, body)
	}
	m := make(map[string]affinityUpstream, len(list))
	for _, u := range list {
		m[u.Upstream] = u
	}
	return m, nil
}

// affinity returns the instance's GET /affinity/upstreams by dial address.
func (p *caddyProc) affinity(t *testing.T) map[string]affinityUpstream {
	t.Helper()
	m, err := fetchAffinity(p.Admin)
	if err != nil {
		t.Fatalf("caddy %s: %v", p.name, err)
	}
	return m
}

// setState POSTs a lifecycle state for dial and expects 200 with the
// upstream's new status.
func (p *caddyProc) setState(t *testing.T, dial, state string) affinityUpstream {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"upstream": dial, "state": state})
	status, _, resp, err := adminCall(http.MethodPost, p.Admin+"/affinity/upstreams/state", "application/json", body)
	if err != nil {
		t.Fatalf("caddy %s: POST state %s %s: %v", p.name, dial, state, err)
	}
	if status != http.StatusOK {
		t.Fatalf("caddy %s: POST state %s %s: status %d: %s", p.name, dial, state, status, resp)
	}
	var u affinityUpstream
	if err := json.Unmarshal(resp, &u); err != nil {
		t.Fatalf("caddy %s: POST state answer: %v: %s", p.name, err, resp)
	}
	if u.Upstream != dial || u.State != state {
		t.Fatalf("caddy %s: POST state %s %s answered %s", p.name, dial, state, u)
	}
	t.Logf("caddy %s: %s set to %s: %s", p.name, dial, state, u)
	return u
}

// waitUntil polls cond every `every` until it holds, for at most max,
// and returns how long that took. cond returns whether it holds and what
// it saw (for the failure message).
func waitUntil(t *testing.T, what string, max, every time.Duration, cond func() (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		ok, seen := cond()
		if ok {
			return time.Since(start)
		}
		if time.Since(start) > max {
			t.Fatalf("%s: not within %s; last seen: %s", what, max, seen)
		}
		time.Sleep(every)
	}
}

// ---------------------------------------------------------------------
// Backends whose listener the test controls.

// ctlBackend is a demoapp worker served by the harness's own HTTP server,
// so that the listener can be stopped and started again on the same
// address while the worker, and its session store, stay: a worker
// process that restarts in a second and keeps its sessions (a state
// server, a warm standby, a paused container). Its probe path answers 200
// or 503 as the test says.
type ctlBackend struct {
	name, addr string
	w          *demoapp.Worker
	probePath  string
	drain      atomic.Bool // probe path answers 503 when set

	mu  sync.Mutex
	srv *http.Server
}

// startCtlBackends starts n workers named A, B, C... on 127.0.0.1:0,
// stopped on cleanup. probePath, if not empty, is answered 200 "ready"
// (503 "draining" once drain is set) instead of being a visit.
func startCtlBackends(t *testing.T, n int, probePath string) []*ctlBackend {
	t.Helper()
	bs := make([]*ctlBackend, n)
	for i := range bs {
		b := &ctlBackend{name: string(rune('A' + i)), probePath: probePath}
		b.w = demoapp.NewWorker(b.name, appCookie)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("listening for worker %s: %v", b.name, err)
		}
		b.addr = ln.Addr().String()
		b.serve(ln)
		bs[i] = b
		t.Cleanup(func() { b.closeListener(true) })
	}
	return bs
}

func (b *ctlBackend) handler() http.Handler {
	app := b.w.Handler()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if b.probePath != "" && r.URL.Path == b.probePath {
			if b.drain.Load() {
				http.Error(w, "draining", http.StatusServiceUnavailable)
				return
			}
			_, _ = io.WriteString(w, "ready")
			return
		}
		app.ServeHTTP(w, r)
	})
}

func (b *ctlBackend) serve(ln net.Listener) {
	srv := &http.Server{Handler: b.handler(), ReadHeaderTimeout: 10 * time.Second}
	b.mu.Lock()
	b.srv = srv
	b.mu.Unlock()
	go func() { _ = srv.Serve(ln) }()
}

// closeListener takes the worker off the network: the listener closes at
// once (new connections are refused), idle connections close, and, unless
// abrupt, requests in flight are answered first (at most 2 s). The
// session store is kept.
func (b *ctlBackend) closeListener(abrupt bool) {
	b.mu.Lock()
	srv := b.srv
	b.srv = nil
	b.mu.Unlock()
	if srv == nil {
		return
	}
	if abrupt {
		_ = srv.Close()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if srv.Shutdown(ctx) != nil {
		_ = srv.Close()
	}
}

// relisten puts the worker back on its address, same sessions.
func (b *ctlBackend) relisten(t *testing.T) {
	t.Helper()
	var ln net.Listener
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; {
		if ln, err = net.Listen("tcp", b.addr); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("worker %s: listening again on %s: %v", b.name, b.addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	b.serve(ln)
}

func ctlAddrs(bs []*ctlBackend) []string {
	out := make([]string, len(bs))
	for i, b := range bs {
		out[i] = b.addr
	}
	return out
}

// ---------------------------------------------------------------------
// Caddy: reloads, and restarts on the same ports.

// ports returns the site and admin ports of the running instance.
func (p *caddyProc) ports(t *testing.T) (site, admin int) {
	t.Helper()
	for i, raw := range []string{p.URL, p.Admin} {
		u, err := url.Parse(raw)
		if err != nil {
			t.Fatal(err)
		}
		var n int
		if _, err := fmt.Sscanf(u.Port(), "%d", &n); err != nil {
			t.Fatalf("port of %s: %v", raw, err)
		}
		if i == 0 {
			site = n
		} else {
			admin = n
		}
	}
	return site, admin
}

// reload writes cfg (same ports, same storage unless cfg says otherwise)
// and applies it with `caddy reload`, which adapts the Caddyfile and
// POSTs it to the admin API's /load; it returns once the new config runs.
func (p *caddyProc) reload(t *testing.T, cfg proxyConfig) {
	t.Helper()
	if cfg.Storage == "" {
		cfg.Storage = p.cfg.Storage
	}
	site, admin := p.ports(t)
	text := cfg.caddyfile(site, admin)
	if err := os.WriteFile(p.File, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, caddyBin, "reload", "--config", p.File, "--adapter", "caddyfile",
		"--address", strings.TrimPrefix(p.Admin, "http://"))
	cmd.Dir = p.dir
	cmd.Env = isolatedEnv(p.dir)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("caddy reload of %s: %v\n%s\nCaddyfile:\n%s", p.name, err, out, text)
	}
	p.cfg, p.Config = cfg, text
	fmt.Fprintf(p.out, "---- test harness: reloaded caddy %s (upstreams %s)\n", p.name, strings.Join(cfg.Upstreams, " "))
	t.Logf("caddy %s reloaded in %s: upstreams %s", p.name, time.Since(start).Round(time.Millisecond), strings.Join(cfg.Upstreams, " "))
}

// stopNow stops the running process: with `caddy stop` through its admin
// API (how = "caddy stop") or with a signal, and waits until it exited.
// The caddyProc can then be started again with startAgain.
func (p *caddyProc) stopNow(t *testing.T, how string) {
	t.Helper()
	run := p.run
	start := time.Now()
	switch how {
	case "caddy stop":
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, caddyBin, "stop", "--address", strings.TrimPrefix(p.Admin, "http://"))
		cmd.Dir = p.dir
		cmd.Env = isolatedEnv(p.dir)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("caddy stop of %s: %v\n%s", p.name, err, out)
		}
	case "SIGTERM":
		_ = run.cmd.Process.Signal(syscall.SIGTERM)
	default:
		t.Fatalf("stopNow: unknown way %q", how)
	}
	select {
	case <-run.exited:
	case <-time.After(20 * time.Second):
		t.Fatalf("caddy %s did not exit within 20s of %s", p.name, how)
	}
	t.Logf("caddy %s stopped (%s) in %s", p.name, how, time.Since(start).Round(time.Millisecond))
}

// startAgain starts the stopped process again with the same Caddyfile
// (same ports, same storage) and waits until it serves.
func (p *caddyProc) startAgain(t *testing.T) {
	t.Helper()
	select {
	case <-p.run.exited:
	default:
		t.Fatalf("caddy %s is still running", p.name)
	}
	fmt.Fprintf(p.out, "---- test harness: starting caddy %s again on the same ports\n", p.name)
	var run *caddyRun
	for attempt := 1; ; attempt++ {
		run = &caddyRun{exited: make(chan struct{}), outFrom: len(p.out.String())}
		run.cmd = exec.Command(caddyBin, "run", "--config", p.File, "--adapter", "caddyfile")
		run.cmd.Dir = p.dir
		run.cmd.Env = isolatedEnv(p.dir)
		run.cmd.Stdout, run.cmd.Stderr = p.out, p.out
		if err := run.cmd.Start(); err != nil {
			t.Fatalf("starting caddy %s again: %v", p.name, err)
		}
		go func(r *caddyRun) {
			r.waitErr = r.cmd.Wait()
			close(r.exited)
		}(run)
		p.run = run
		if !p.pollReady(t, 30*time.Second) {
			// Exited before it was ready: a port still held?
			if strings.Contains(p.out.String()[run.outFrom:], "address already in use") && attempt < 20 {
				time.Sleep(250 * time.Millisecond)
				continue
			}
			t.Fatalf("caddy %s exited when started again (%v):\n%s", p.name, run.waitErr, tailLines(p.out.String(), 60))
		}
		return
	}
}

// pollReady waits for GET /healthz through the proxy to answer 200, and
// reports false if the process exited first.
func (p *caddyProc) pollReady(t *testing.T, max time.Duration) bool {
	t.Helper()
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	deadline := time.Now().Add(max)
	for {
		select {
		case <-p.run.exited:
			return false
		default:
		}
		if resp, err := hc.Get(p.URL + "/healthz"); err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return true
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy %s not ready within %s:\n%s", p.name, max, tailLines(p.out.String(), 60))
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// ---------------------------------------------------------------------
// Steady load.

// phase is a named part of a steady load; a visit belongs to the phase in
// which it was sent.
type phase struct {
	name string
	*stats
	latMu  sync.Mutex
	maxLat time.Duration
	slow   int // visits that took more than a second
}

func newPhase(name string) *phase { return &phase{name: name, stats: newStats()} }

func (ph *phase) latency(d time.Duration) {
	ph.latMu.Lock()
	defer ph.latMu.Unlock()
	ph.maxLat = max(ph.maxLat, d)
	if d > time.Second {
		ph.slow++
	}
}

func (ph *phase) String() string {
	ph.latMu.Lock()
	maxLat, slow := ph.maxLat, ph.slow
	ph.latMu.Unlock()
	return fmt.Sprintf("%s: %s; slowest visit %s, %d over 1s", ph.name, ph.stats, maxLat.Round(time.Millisecond), slow)
}

// load is a steady load: every client visits, waits a think time (random
// within ±50%), and visits again, until stopped or maxVisits.
type load struct {
	clients []*client
	cur     atomic.Pointer[phase]
	stopCh  chan struct{}
	done    sync.WaitGroup
	stopped sync.Once
	// counts[i] is the number of visits client i has completed.
	counts []atomic.Int64
	// fallbacks counts visits that went to another instance because the
	// first one refused the connection (see startLoadMulti).
	fallbacks atomic.Int64
	// own is each client's worker as of its last successful visit.
	ownMu sync.Mutex
	own   map[*client]string
	// hook, if set, sees every visit (from the clients' goroutines).
	hook atomic.Pointer[visitHook]
}

// visitHook is told of one visit: who, when it was sent and answered,
// and the answer.
type visitHook func(c *client, sent, done time.Time, r visitResult)

// watch makes fn see every visit completed from now on.
func (l *load) watch(fn visitHook) { l.hook.Store(&fn) }

// startLoad starts a steady load on base: one goroutine per client, at
// most one request in flight per client, at most maxVisits visits each.
// The load stops on l.stop or at the test's cleanup.
func startLoad(t *testing.T, clients []*client, base string, think time.Duration, maxVisits int, first *phase) *load {
	return startLoadMulti(t, clients, func(*client, int) []string { return []string{base} }, think, maxVisits, first)
}

// startLoadMulti is startLoad where each visit goes to the first of the
// bases targets returns for it; a visit whose connection is refused (or
// reset before any answer) is made again at once to the next one, as a
// browser does with the several addresses of a name.
func startLoadMulti(t *testing.T, clients []*client, targets func(c *client, i int) []string, think time.Duration, maxVisits int, first *phase) *load {
	t.Helper()
	l := &load{clients: clients, stopCh: make(chan struct{}), counts: make([]atomic.Int64, len(clients)),
		own: make(map[*client]string, len(clients))}
	l.cur.Store(first)
	for i, c := range clients {
		l.done.Add(1)
		go func() {
			defer l.done.Done()
			rng := rand.New(rand.NewPCG(uint64(c.id), 7))
			// Spread the first visits over one think time.
			if !l.pause(time.Duration(rng.Int64N(int64(think) + 1))) {
				return
			}
			for n := 0; n < maxVisits; n++ {
				ph := l.cur.Load()
				start := time.Now()
				var r visitResult
				bases := targets(c, n)
				for k, base := range bases {
					r = c.visit(base)
					if !refused(r) || k+1 == len(bases) {
						break
					}
					l.fallbacks.Add(1)
				}
				ph.latency(time.Since(start))
				if h := l.hook.Load(); h != nil {
					(*h)(c, start, time.Now(), r)
				}
				ph.record(c, r)
				l.ownMu.Lock()
				l.own[c] = c.worker
				l.ownMu.Unlock()
				l.counts[i].Add(1)
				if !l.pause(think/2 + time.Duration(rng.Int64N(int64(think)+1))) {
					return
				}
			}
		}()
	}
	t.Cleanup(l.stop)
	return l
}

// refused reports whether a visit failed before any answer because the
// connection was refused, reset or closed: what a browser retries on the
// next address of a name (for a GET).
func refused(r visitResult) bool {
	return r.Err != nil && r.Status == 0 &&
		(errors.Is(r.Err, syscall.ECONNREFUSED) || errors.Is(r.Err, syscall.ECONNRESET) ||
			errors.Is(r.Err, io.EOF) || errors.Is(r.Err, io.ErrUnexpectedEOF))
}

func (l *load) pause(d time.Duration) bool {
	select {
	case <-l.stopCh:
		return false
	case <-time.After(d):
		return true
	}
}

// setPhase makes later visits count in ph.
func (l *load) setPhase(ph *phase) { l.cur.Store(ph) }

// mark returns every client's visit count now.
func (l *load) mark() []int64 {
	m := make([]int64, len(l.counts))
	for i := range l.counts {
		m[i] = l.counts[i].Load()
	}
	return m
}

// waitEach waits until every client made at least k visits since mark
// (or all it may make).
func (l *load) waitEach(t *testing.T, mark []int64, k int64, max time.Duration) time.Duration {
	t.Helper()
	return waitUntil(t, fmt.Sprintf("every client visits %d more times", k), max, 20*time.Millisecond, func() (bool, string) {
		behind := 0
		for i := range l.counts {
			if l.counts[i].Load() < mark[i]+k {
				behind++
			}
		}
		return behind == 0, fmt.Sprintf("%d of %d clients behind", behind, len(l.counts))
	})
}

// owners returns each client's worker as of its last successful visit
// (safe while the load runs).
func (l *load) owners() map[*client]string {
	l.ownMu.Lock()
	defer l.ownMu.Unlock()
	m := make(map[*client]string, len(l.own))
	for c, w := range l.own {
		m[c] = w
	}
	return m
}

// busiestOf returns the worker holding the most sessions in owner.
func busiestOf(owner map[*client]string) string {
	n := map[string]int{}
	for _, w := range owner {
		n[w]++
	}
	best, bestN := "", -1
	for w, k := range n {
		if k > bestN || (k == bestN && w < best) {
			best, bestN = w, k
		}
	}
	return best
}

// stop ends the load and waits for the visits in flight.
func (l *load) stop() {
	l.stopped.Do(func() { close(l.stopCh) })
	l.done.Wait()
}

// ---------------------------------------------------------------------
// Figures.

// faultsFull reports whether the long form of the fault suite was asked
// for (AFFINITY_FAULTS=full).
func faultsFull() bool { return os.Getenv("AFFINITY_FAULTS") == "full" }

// scale returns short or full by the fault suite's form.
func scale[T any](short, full T) T {
	if faultsFull() {
		return full
	}
	return short
}

// figures is one row of RELIABILITY.md.
type figures struct {
	event                                               string
	clients, requests, broken, failed, restarted, moved int
}

// logFigures logs a row in a fixed format, for RELIABILITY.md.
func logFigures(t *testing.T, f figures) {
	t.Helper()
	t.Logf("FIGURES | %s | %d | %d | %d | %d | %d | %d |",
		f.event, f.clients, f.requests, f.broken, f.failed, f.restarted, f.moved)
}

// sumStats adds phases up.
func sumStats(phs ...*phase) (requests, failed int) {
	for _, ph := range phs {
		ph.mu.Lock()
		requests += ph.requests
		failed += ph.failed
		ph.mu.Unlock()
	}
	return requests, failed
}

// sessionReport sums up, per client over phases, the breaks of a steady
// load: restarted are the sessions of the affected workers (victims) that
// restarted exactly once and never broke otherwise; broken are all the
// other sessions that broke, and the affected ones that broke more than
// once or otherwise.
type sessionReport struct {
	restarted, broken int
	victims           int
	bad               []string
}

func reportSessions(clients []*client, owner map[*client]string, victims map[string]bool, phs ...*phase) sessionReport {
	var r sessionReport
	for _, c := range clients {
		restarts, breaks := 0, 0
		for _, ph := range phs {
			ph.mu.Lock()
			restarts += ph.restartsOf[c]
			breaks += ph.brokenOf[c]
			ph.mu.Unlock()
		}
		if victims[owner[c]] {
			r.victims++
			if restarts == 1 && breaks == 1 {
				r.restarted++
				continue
			}
			if breaks == 0 {
				continue // a session of the affected worker that never broke
			}
		} else if breaks == 0 {
			continue
		}
		r.broken++
		if len(r.bad) < 8 {
			r.bad = append(r.bad, fmt.Sprintf("on %s: %d restarts, %d breaks: %s", owner[c], restarts, breaks, c))
		}
	}
	return r
}

// movedBack counts clients that were served by worker w, then by
// another worker, and later by w again.
func movedBack(clients []*client, w string) int {
	n := 0
	for _, c := range clients {
		wasOn, left := false, false
		for _, s := range c.trail {
			name := strings.TrimRight(s, "0123456789")
			if name == "ERR" {
				continue
			}
			if name == w {
				if left {
					n++
					break
				}
				wasOn = true
			} else if wasOn {
				left = true
			}
		}
	}
	return n
}

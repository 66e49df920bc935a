// Package tests holds the integration and fault tests of caddy-affinity:
// a real Caddy binary built from ./cmd/caddy, run as a subprocess in front
// of real in-memory-session backends (demoapp), driven by simulated
// browsers (one cookie jar and one loopback source address each).
//
// Everything talks to 127.0.0.0/8 only, every load loop is bounded in
// count and time, and every process and listener a test starts is
// stopped by the test's cleanup.
//
// Environment:
//
//	AFFINITY_RACE_BINARY=1   build the Caddy binary with -race too (data
//	                         races in Caddy or the module fail the test
//	                         that ran that process)
//	AFFINITY_CADDY_BIN=path  use this prebuilt binary instead of building
//	                         ./cmd/caddy
//
// With -short, the tests that need the binary are skipped and it is not
// built.
package tests

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-affinity/caddy-affinity/demoapp"
)

const (
	// appCookie is the demoapp's session cookie: the app's own session
	// key, which the policy reads with `key cookie session_id`.
	appCookie = "session_id"
	// pinCookie is the policy's default pin cookie name.
	pinCookie = "caddy_affinity"

	// healthInterval is the active health check interval of every
	// generated Caddyfile; tests wait in multiples of it.
	healthInterval = 250 * time.Millisecond
)

var (
	repoRoot      string
	caddyBin      string
	caddyBuildErr error
	caddyBuildOut string
)

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	root, err := findRepoRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "tests:", err)
		return 1
	}
	repoRoot = root
	if bin := os.Getenv("AFFINITY_CADDY_BIN"); bin != "" && !testing.Short() {
		caddyBin, caddyBuildErr = filepath.Abs(bin)
		if caddyBuildErr == nil {
			_, caddyBuildErr = os.Stat(caddyBin)
		}
		fmt.Fprintf(os.Stderr, "tests: using the prebuilt %s (AFFINITY_CADDY_BIN)\n", caddyBin)
	} else if !testing.Short() {
		dir, err := os.MkdirTemp("", "caddy-affinity-tests-")
		if err != nil {
			fmt.Fprintln(os.Stderr, "tests:", err)
			return 1
		}
		defer os.RemoveAll(dir)
		start := time.Now()
		caddyBin, caddyBuildOut, caddyBuildErr = buildCaddy(dir)
		if caddyBuildErr == nil {
			fmt.Fprintf(os.Stderr, "tests: built %s in %s (race=%v)\n", caddyBin, time.Since(start).Round(time.Millisecond), raceBinary())
		} else {
			fmt.Fprintf(os.Stderr, "tests: building the Caddy binary failed: %v\n%s\n", caddyBuildErr, caddyBuildOut)
		}
	}
	return m.Run()
}

func raceBinary() bool { return os.Getenv("AFFINITY_RACE_BINARY") == "1" }

// findRepoRoot returns the module root: the nearest parent of the working
// directory (the package directory under go test) holding go.mod.
func findRepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// buildCaddy builds ./cmd/caddy into dir, with -race when asked.
func buildCaddy(dir string) (bin, output string, err error) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin = filepath.Join(dir, "caddy")
	args := []string{"build", "-o", bin}
	if raceBinary() {
		args = append(args, "-race")
	}
	args = append(args, "./cmd/caddy")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goTool, args...)
	cmd.Dir = repoRoot
	out, err := cmd.CombinedOutput()
	return bin, string(out), err
}

// needCaddy skips in -short mode and fails when the binary did not build.
func needCaddy(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: needs the Caddy binary (not built with -short)")
	}
	if caddyBuildErr != nil {
		t.Fatalf("the Caddy binary did not build (go build ./cmd/caddy): %v\n%s", caddyBuildErr, caddyBuildOut)
	}
}

// ---------------------------------------------------------------------
// Backends: demoapp workers in this process.

// backend is one demoapp worker and what the test knows about it.
type backend struct {
	name string
	addr string
	w    *demoapp.Worker
	mu   sync.Mutex
	up   bool
}

// startBackends starts n workers named A, B, C... on 127.0.0.1:0. They
// are killed on cleanup.
func startBackends(t *testing.T, n int) []*backend {
	t.Helper()
	return startCookieBackends(t, n, appCookie)
}

// startCookieBackends is startBackends with the app's session cookie
// called cookie.
func startCookieBackends(t *testing.T, n int, cookie string) []*backend {
	t.Helper()
	bs := make([]*backend, n)
	for i := range bs {
		name := string(rune('A' + i))
		w := demoapp.NewWorker(name, cookie)
		if err := w.Start("127.0.0.1:0"); err != nil {
			t.Fatalf("starting worker %s: %v", name, err)
		}
		b := &backend{name: name, addr: w.Addr(), w: w, up: true}
		bs[i] = b
		t.Cleanup(b.kill)
	}
	return bs
}

// kill stops the worker abruptly (listener and connections closed,
// sessions lost). Killing a dead worker does nothing.
func (b *backend) kill() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.up {
		b.w.Kill()
		b.up = false
	}
}

// restart starts the worker again on its old address, with an empty
// session store.
func (b *backend) restart(t *testing.T) {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.up {
		t.Fatalf("worker %s is already up", b.name)
	}
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; {
		if err = b.w.Start(b.addr); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("restarting worker %s on %s: %v", b.name, b.addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got := b.w.Addr(); got != b.addr {
		t.Fatalf("worker %s restarted on %s, want %s", b.name, got, b.addr)
	}
	b.up = true
}

func addrsOf(bs []*backend) []string {
	out := make([]string, len(bs))
	for i, b := range bs {
		out[i] = b.addr
	}
	return out
}

func backendNamed(bs []*backend, name string) *backend {
	for _, b := range bs {
		if b.name == name {
			return b
		}
	}
	return nil
}

// ---------------------------------------------------------------------
// Caddy: a subprocess of the built binary.

// proxyConfig describes one generated Caddyfile.
type proxyConfig struct {
	Upstreams []string
	// Policy is the body of the `lb_policy affinity { ... }` block, one
	// option a line.
	Policy string
	// Global is added to the global options block.
	Global string
	// Storage is the file_system storage folder; a fresh temp dir if
	// empty.
	Storage string
	// FailDuration is the passive health check window; default 10s.
	FailDuration string
	// Retries is the lb_retries value; default 2, "off" leaves the line
	// out (then lb_try_duration alone bounds the retries).
	Retries string
	// TryDuration is the lb_try_duration value; default 3s.
	TryDuration string
	// HealthTimeout is the health_timeout value; default 1s.
	HealthTimeout string
	// ProxyExtra is added to the reverse_proxy block, one directive (or
	// block) a line, e.g. a transport block.
	ProxyExtra string
	// Extra is appended to the Caddyfile as it is: more sites, named
	// routes.
	Extra string
}

func indent(s, prefix string) string {
	var b strings.Builder
	for _, line := range strings.Split(strings.TrimSpace(s), "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		b.WriteString(prefix)
		b.WriteString(line)
		b.WriteByte('\n')
	}
	return b.String()
}

// indentBlock indents every non-empty line of s by prefix plus its own
// leading tabs, so that nested blocks keep their shape.
func indentBlock(s, prefix string) string {
	var b strings.Builder
	for _, line := range strings.Split(s, "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		b.WriteString(prefix)
		b.WriteString(strings.TrimRight(line, " \t"))
		b.WriteByte('\n')
	}
	return b.String()
}

// caddyfile renders cfg for a site on sitePort and the admin API on
// adminPort.
func (cfg proxyConfig) caddyfile(sitePort, adminPort int) string {
	fail := cfg.FailDuration
	if fail == "" {
		fail = "10s"
	}
	orDefault := func(v, def string) string {
		if v == "" {
			return def
		}
		return v
	}
	retries := "lb_retries " + orDefault(cfg.Retries, "2") + "\n\t\t"
	if cfg.Retries == "off" {
		retries = ""
	}
	return globalOptions(adminPort, cfg.Storage, cfg.Global) + fmt.Sprintf(`
http://127.0.0.1:%d {
	bind 127.0.0.1
	reverse_proxy %s {
		lb_policy affinity {
%s		}
		%slb_try_duration %s
		health_uri /healthz
		health_interval %s
		health_timeout %s
		fail_duration %s
%s	}
}
%s`, sitePort,
		strings.Join(cfg.Upstreams, " "), indent(cfg.Policy, "\t\t\t"),
		retries, orDefault(cfg.TryDuration, "3s"),
		healthInterval, orDefault(cfg.HealthTimeout, "1s"), fail,
		indentBlock(cfg.ProxyExtra, "\t\t"), cfg.Extra)
}

// globalOptions is the global options block of every test Caddyfile: the
// admin API on adminPort, no automatic HTTPS, storage in the given
// folder, and extra lines (one option a line).
func globalOptions(adminPort int, storage, extra string) string {
	return fmt.Sprintf(`{
	admin 127.0.0.1:%d
	auto_https off
	storage file_system %s
	persist_config off
	grace_period 1s
%s}
`, adminPort, storage, indent(extra, "\t"))
}

// syncBuffer is a goroutine-safe output sink.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// caddyProc is one running `caddy run`.
type caddyProc struct {
	name   string
	URL    string // http://127.0.0.1:port
	Admin  string // http://127.0.0.1:port
	File   string // the Caddyfile
	Config string // its text
	dir    string
	cfg    proxyConfig
	// render, if set, writes the Caddyfile instead of cfg.
	render   func(sitePort, adminPort int) string
	out      *syncBuffer
	run      *caddyRun
	attempts int
	stopOnce sync.Once
}

// caddyRun is one process of a caddyProc (a port clash restarts it on
// other ports).
type caddyRun struct {
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error // set before exited is closed
	outFrom int   // where its output starts in the caddyProc's out
}

// freePort returns a port on 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// isolatedEnv is the environment for a Caddy subprocess: the test's,
// with Caddy's home folders in dir (nothing is written to the real home).
func isolatedEnv(dir string) []string {
	env := []string{}
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME",
			"HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy":
			continue
		}
		env = append(env, kv)
	}
	return append(env,
		"HOME="+dir,
		"XDG_DATA_HOME="+filepath.Join(dir, "data"),
		"XDG_CONFIG_HOME="+filepath.Join(dir, "config"),
		"XDG_CACHE_HOME="+filepath.Join(dir, "cache"),
	)
}

// startCaddy launches Caddy with cfg and waits until the site answers.
func startCaddy(t *testing.T, name string, cfg proxyConfig) *caddyProc {
	t.Helper()
	p := launchCaddy(t, name, cfg)
	p.waitReady(t)
	return p
}

// launchCaddy starts `caddy run` and returns at once; see waitReady.
// The process is stopped on cleanup, and its output is logged when the
// test failed (or the binary reported a data race).
func launchCaddy(t *testing.T, name string, cfg proxyConfig) *caddyProc {
	t.Helper()
	dir := t.TempDir()
	if cfg.Storage == "" {
		cfg.Storage = filepath.Join(dir, "storage")
	}
	p := &caddyProc{
		name: name,
		File: filepath.Join(dir, "Caddyfile"),
		dir:  dir,
		cfg:  cfg,
		out:  new(syncBuffer),
	}
	p.spawn(t)
	p.stopOnCleanup(t)
	return p
}

// spawn picks ports, writes the Caddyfile and starts the process.
// stopOnCleanup stops the process when the test ends, fails the test if
// Caddy reported a data race, and logs its Caddyfile and output if the
// test failed.
func (p *caddyProc) stopOnCleanup(t *testing.T) {
	t.Cleanup(func() {
		p.stop()
		out := p.out.String()
		if strings.Contains(out, "WARNING: DATA RACE") {
			t.Errorf("caddy %s reported a data race", p.name)
		}
		if t.Failed() {
			t.Logf("---- caddy %s (%s) Caddyfile:\n%s", p.name, p.URL, p.Config)
			t.Logf("---- caddy %s output (last 150 lines):\n%s", p.name, tailLines(out, 150))
		}
	})
}

func (p *caddyProc) spawn(t *testing.T) {
	t.Helper()
	p.attempts++
	sitePort, adminPort := freePort(t), freePort(t)
	for adminPort == sitePort {
		adminPort = freePort(t)
	}
	p.URL = fmt.Sprintf("http://127.0.0.1:%d", sitePort)
	p.Admin = fmt.Sprintf("http://127.0.0.1:%d", adminPort)
	if p.render != nil {
		p.Config = p.render(sitePort, adminPort)
	} else {
		p.Config = p.cfg.caddyfile(sitePort, adminPort)
	}
	if err := os.WriteFile(p.File, []byte(p.Config), 0o644); err != nil {
		t.Fatal(err)
	}
	if p.attempts > 1 {
		fmt.Fprintf(p.out, "---- test harness: starting caddy %s again on other ports (attempt %d)\n", p.name, p.attempts)
	}
	run := &caddyRun{exited: make(chan struct{}), outFrom: len(p.out.String())}
	run.cmd = exec.Command(caddyBin, "run", "--config", p.File, "--adapter", "caddyfile")
	run.cmd.Dir = p.dir
	run.cmd.Env = isolatedEnv(p.dir)
	run.cmd.Stdout = p.out
	run.cmd.Stderr = p.out
	if err := run.cmd.Start(); err != nil {
		t.Fatalf("starting caddy %s: %v", p.name, err)
	}
	go func() {
		run.waitErr = run.cmd.Wait()
		close(run.exited)
	}()
	p.run = run
}

// waitReady polls GET /healthz through the proxy until it answers 200.
// If Caddy could not listen because another process took a port between
// freePort and Caddy's bind, it is started again on other ports.
func (p *caddyProc) waitReady(t *testing.T) {
	t.Helper()
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	deadline := time.Now().Add(30 * time.Second)
	var last string
	for {
		select {
		case <-p.run.exited:
			out := p.out.String()
			if strings.Contains(out[p.run.outFrom:], "address already in use") && p.attempts < 4 {
				p.spawn(t)
				continue
			}
			t.Fatalf("caddy %s exited before it was ready (%v); output:\n%s\nCaddyfile:\n%s", p.name, p.run.waitErr, tailLines(out, 80), p.Config)
		default:
		}
		resp, err := hc.Get(p.URL + "/healthz")
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy %s not ready after 30s (last: %s); output:\n%s", p.name, last, tailLines(p.out.String(), 80))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop interrupts Caddy and waits for it, killing it if it lingers.
func (p *caddyProc) stop() {
	p.stopOnce.Do(func() {
		run := p.run
		if run == nil || run.cmd.Process == nil {
			return
		}
		select {
		case <-run.exited:
			return
		default:
		}
		_ = run.cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-run.exited:
		case <-time.After(15 * time.Second):
			_ = run.cmd.Process.Kill()
			<-run.exited
		}
	})
}

// upstreamStatus is one entry of the admin API's /reverse_proxy/upstreams.
type upstreamStatus struct {
	Address     string `json:"address"`
	NumRequests int    `json:"num_requests"`
	Fails       int    `json:"fails"`
}

// upstreams returns Caddy's view of its upstreams, by address.
func (p *caddyProc) upstreams(t *testing.T) map[string]upstreamStatus {
	t.Helper()
	hc := &http.Client{Timeout: 5 * time.Second}
	resp, err := hc.Get(p.Admin + "/reverse_proxy/upstreams")
	if err != nil {
		t.Fatalf("admin API of caddy %s: %v", p.name, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("admin API of caddy %s: %s: %s", p.name, resp.Status, body)
	}
	var list []upstreamStatus
	if err := json.Unmarshal(body, &list); err != nil {
		t.Fatalf("admin API of caddy %s: %v: %s", p.name, err, body)
	}
	m := make(map[string]upstreamStatus, len(list))
	for _, u := range list {
		m[u.Address] = u
	}
	return m
}

// waitNoFails waits until Caddy's passive health check has forgotten
// every failure of addr (fail_duration after the last one), then for two
// more active health check intervals.
func (p *caddyProc) waitNoFails(t *testing.T, addr string, max time.Duration) {
	t.Helper()
	start := time.Now()
	for {
		u, ok := p.upstreams(t)[addr]
		if !ok || u.Fails == 0 {
			break
		}
		if time.Since(start) > max {
			t.Fatalf("caddy %s still counts %d failures of %s after %s", p.name, u.Fails, addr, max)
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(2 * healthInterval)
	t.Logf("caddy %s: %s clear of failures after %s", p.name, addr, time.Since(start).Round(10*time.Millisecond))
}

// Caddy's active health checker logs (at INFO) "HTTP request failed"
// for each failed check (one failure marks the upstream down) and
// "host is up" when an upstream down becomes healthy again.
const (
	logCheckFailed = "HTTP request failed"
	logHostUp      = "host is up"
)

// countLog counts Caddy's log lines with the message msg about host.
func (p *caddyProc) countLog(msg, host string) int {
	n := 0
	for _, line := range strings.Split(p.out.String(), "\n") {
		if strings.Contains(line, `"msg":"`+msg+`"`) && strings.Contains(line, `"host":"`+host+`"`) {
			n++
		}
	}
	return n
}

// waitLog waits until Caddy has logged more than `after` lines with the
// message msg about host.
func (p *caddyProc) waitLog(t *testing.T, msg, host string, after int, max time.Duration) {
	t.Helper()
	start := time.Now()
	for p.countLog(msg, host) <= after {
		if time.Since(start) > max {
			t.Fatalf("caddy %s did not log %q for %s within %s", p.name, msg, host, max)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("caddy %s logged %q for %s after %s", p.name, msg, host, time.Since(start).Round(10*time.Millisecond))
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("... (%d lines before)", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

// ---------------------------------------------------------------------
// Clients: simulated browsers.

// clientSeq numbers clients across the whole package, so that every
// client gets its own loopback source address.
var clientSeq atomic.Int64

// client is one simulated browser: a cookie jar, and connections from a
// loopback address of its own (127.1.x.y), so that Caddy sees a distinct
// client IP per client.
type client struct {
	id  int
	ip  net.IP
	jar *cookiejar.Jar
	tr  *http.Transport
	hc  *http.Client // with the jar
	raw *http.Client // no jar: requests with hand-made Cookie headers

	dropMu  sync.Mutex
	dropped map[string]bool // cookies this browser refuses to keep

	// What the client last saw (successful visits only).
	worker  string
	visits  int
	session string
	trail   []string // "A1", "A2", "B1", "ERR"...
}

func newClient(t *testing.T) *client {
	t.Helper()
	n := clientSeq.Add(1)
	ip := net.IPv4(127, 1, byte(n/250), byte(n%250+1))
	jar, err := cookiejar.New(nil)
	if err != nil {
		t.Fatal(err)
	}
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: ip}, Timeout: 5 * time.Second}
	tr := &http.Transport{
		Proxy:               nil, // never an environment proxy: loopback only
		DialContext:         dialer.DialContext,
		MaxIdleConnsPerHost: 2,
		IdleConnTimeout:     30 * time.Second,
		DisableCompression:  true,
	}
	c := &client{
		id:  int(n),
		ip:  ip,
		jar: jar,
		tr:  tr,
		raw: &http.Client{Transport: tr, Timeout: 15 * time.Second},
	}
	c.hc = &http.Client{Jar: (*browserJar)(c), Transport: tr, Timeout: 15 * time.Second}
	t.Cleanup(tr.CloseIdleConnections)
	return c
}

// browserJar is the client's jar as its http.Client sees it: cookies the
// client was told to drop are never stored.
type browserJar client

func (j *browserJar) SetCookies(u *url.URL, cookies []*http.Cookie) {
	c := (*client)(j)
	c.jar.SetCookies(u, c.keep(cookies))
}

func (j *browserJar) Cookies(u *url.URL) []*http.Cookie {
	return (*client)(j).jar.Cookies(u)
}

// dropCookie makes the client refuse to store the named cookie, like a
// browser or an API client that keeps only the app's cookie.
func (c *client) dropCookie(name string) {
	c.dropMu.Lock()
	defer c.dropMu.Unlock()
	if c.dropped == nil {
		c.dropped = map[string]bool{}
	}
	c.dropped[name] = true
}

func (c *client) keep(cookies []*http.Cookie) []*http.Cookie {
	c.dropMu.Lock()
	defer c.dropMu.Unlock()
	if len(c.dropped) == 0 {
		return cookies
	}
	kept := cookies[:0:0]
	for _, ck := range cookies {
		if !c.dropped[ck.Name] {
			kept = append(kept, ck)
		}
	}
	return kept
}

func newClients(t *testing.T, n int) []*client {
	t.Helper()
	cs := make([]*client, n)
	for i := range cs {
		cs[i] = newClient(t)
	}
	return cs
}

// visitResult is one GET / through the proxy.
type visitResult struct {
	Status  int
	Err     error
	Worker  string
	Visits  int
	Session string
	Header  http.Header
}

func (r visitResult) failed() bool { return r.Err != nil || r.Status != http.StatusOK }

func (r visitResult) String() string {
	if r.Err != nil {
		return "error: " + r.Err.Error()
	}
	if r.Status != http.StatusOK {
		return fmt.Sprintf("status %d", r.Status)
	}
	return fmt.Sprintf("%s%d", r.Worker, r.Visits)
}

// visit does GET base/ with the client's jar.
func (c *client) visit(base string) visitResult {
	req, err := http.NewRequest(http.MethodGet, base+"/", nil)
	if err != nil {
		return visitResult{Err: err}
	}
	return readVisit(c.hc.Do(req))
}

// visitWith does GET base/ with exactly the given Cookie header (the jar
// is not consulted) and extra headers; cookies the response sets are
// stored in the jar as a browser would.
func (c *client) visitWith(base, cookieHeader string, extra http.Header) visitResult {
	u, err := url.Parse(base + "/")
	if err != nil {
		return visitResult{Err: err}
	}
	req, err := http.NewRequest(http.MethodGet, u.String(), nil)
	if err != nil {
		return visitResult{Err: err}
	}
	for k, vs := range extra {
		req.Header[k] = vs
	}
	if cookieHeader != "" {
		req.Header.Set("Cookie", cookieHeader)
	}
	res := readVisit(c.raw.Do(req))
	if res.Header != nil {
		resp := &http.Response{Header: res.Header}
		if cs := c.keep(resp.Cookies()); len(cs) > 0 {
			c.jar.SetCookies(u, cs)
		}
	}
	return res
}

func readVisit(resp *http.Response, err error) visitResult {
	if err != nil {
		return visitResult{Err: err}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	res := visitResult{Status: resp.StatusCode, Header: resp.Header}
	if err != nil {
		res.Err = err
		return res
	}
	if resp.StatusCode != http.StatusOK {
		return res
	}
	var page struct {
		Worker  string `json:"worker"`
		Visits  int    `json:"visits"`
		Session string `json:"session"`
	}
	if err := json.Unmarshal(body, &page); err != nil {
		res.Err = fmt.Errorf("decoding %q: %v", truncate(string(body), 200), err)
		return res
	}
	res.Worker, res.Visits, res.Session = page.Worker, page.Visits, page.Session
	if res.Worker == "" || res.Visits < 1 {
		res.Err = fmt.Errorf("unexpected body %q", truncate(string(body), 200))
	}
	return res
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// cookie returns the value of the named cookie in the client's jar for
// base, and whether it is there.
func (c *client) cookie(base, name string) (string, bool) {
	u, err := url.Parse(base + "/")
	if err != nil {
		return "", false
	}
	for _, ck := range c.jar.Cookies(u) {
		if ck.Name == name {
			return ck.Value, true
		}
	}
	return "", false
}

// event classifies a visit against what the client saw before.
type event int

const (
	evOK      event = iota // visits == previous+1 on the same worker
	evNew                  // first visit of a fresh client: visits == 1
	evRestart              // the session restarted: visits == 1 again
	evBroken               // any other visit count
	evFailed               // non-200 or transport error
)

func (e event) String() string {
	return [...]string{"ok", "new", "restart", "broken", "failed"}[e]
}

// observe updates the client's state with a visit and classifies it.
func (c *client) observe(r visitResult) event {
	if r.failed() {
		c.trail = append(c.trail, "ERR")
		return evFailed
	}
	prevW, prevV := c.worker, c.visits
	c.worker, c.visits, c.session = r.Worker, r.Visits, r.Session
	c.trail = append(c.trail, r.String())
	switch {
	case prevV == 0:
		if r.Visits == 1 {
			return evNew
		}
		return evBroken
	case r.Visits == prevV+1 && r.Worker == prevW:
		return evOK
	case r.Visits == 1:
		return evRestart
	default:
		return evBroken
	}
}

func (c *client) String() string {
	return fmt.Sprintf("client#%d(%s) [%s]", c.id, c.ip, strings.Join(c.trail, " "))
}

// stats is the tracker of one phase of a scenario.
type stats struct {
	mu           sync.Mutex
	requests     int
	ok, news     int
	restarts     int // visits == 1 again (counted in broken too)
	broken       int // every visit whose count is not previous+1
	failed       int // non-200 or transport error
	status5xx    int
	moved        int // successful visits on another worker than the previous one
	perWorker    map[string]int
	newPerWorker map[string]int
	restartsOf   map[*client]int
	brokenOf     map[*client]int
	failedOf     map[*client]int
	samples      []string
}

func newStats() *stats {
	return &stats{
		perWorker:    map[string]int{},
		newPerWorker: map[string]int{},
		restartsOf:   map[*client]int{},
		brokenOf:     map[*client]int{},
		failedOf:     map[*client]int{},
	}
}

// record classifies r for c and counts it.
func (s *stats) record(c *client, r visitResult) event {
	prevW := c.worker
	ev := c.observe(r)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests++
	if r.Status >= 500 {
		s.status5xx++
	}
	if ev != evFailed {
		s.perWorker[r.Worker]++
		if prevW != "" && r.Worker != prevW {
			s.moved++
		}
	}
	switch ev {
	case evOK:
		s.ok++
	case evNew:
		s.news++
		s.newPerWorker[r.Worker]++
	case evRestart:
		s.restarts++
		s.broken++
		s.restartsOf[c]++
		s.brokenOf[c]++
	case evBroken:
		s.broken++
		s.brokenOf[c]++
	case evFailed:
		s.failed++
		s.failedOf[c]++
	}
	if ev != evOK && ev != evNew && len(s.samples) < 10 {
		s.samples = append(s.samples, fmt.Sprintf("%s: %s, %s", ev, r, c))
	}
	return ev
}

func (s *stats) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return fmt.Sprintf("requests=%d ok=%d new=%d broken=%d (restarts=%d) failed=%d 5xx=%d moved=%d per-worker=%v new-per-worker=%v",
		s.requests, s.ok, s.news, s.broken, s.restarts, s.failed, s.status5xx, s.moved,
		sortedMap(s.perWorker), sortedMap(s.newPerWorker))
}

func (s *stats) samplesText() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.samples) == 0 {
		return "(none)"
	}
	return "\n\t" + strings.Join(s.samples, "\n\t")
}

func sortedMap(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s:%d", k, m[k])
	}
	return "{" + strings.Join(parts, " ") + "}"
}

// forEach runs fn for every client, at most conc at a time, and returns
// when all are done. Each client's fn runs in one goroutine, so its
// visits are sequential, like a user's.
func forEach(clients []*client, conc int, fn func(c *client)) {
	sem := make(chan struct{}, conc)
	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Add(1)
		sem <- struct{}{}
		go func(c *client) {
			defer wg.Done()
			defer func() { <-sem }()
			fn(c)
		}(c)
	}
	wg.Wait()
}

// visitAll makes every client visit base n times, conc clients at a
// time, and returns the phase's figures.
func visitAll(clients []*client, base string, n, conc int) *stats {
	s := newStats()
	forEach(clients, conc, func(c *client) {
		for range n {
			s.record(c, c.visit(base))
		}
	})
	return s
}

// sessionsByWorker counts clients by the worker their session is on.
func sessionsByWorker(clients []*client) map[string]int {
	m := map[string]int{}
	for _, c := range clients {
		m[c.worker]++
	}
	return m
}

// busiest returns the worker holding the most sessions.
func busiest(clients []*client) string {
	best, bestN := "", -1
	for w, n := range sessionsByWorker(clients) {
		if n > bestN || (n == bestN && w < best) {
			best, bestN = w, n
		}
	}
	return best
}

// expectClean fails the test if the phase had any failed request or any
// broken session.
func expectClean(t *testing.T, phase string, s *stats) {
	t.Helper()
	t.Logf("%s: %s", phase, s)
	if s.failed != 0 || s.broken != 0 {
		t.Errorf("%s: %d failed requests and %d broken sessions (%d restarts), want none; samples:%s",
			phase, s.failed, s.broken, s.restarts, s.samplesText())
	}
}

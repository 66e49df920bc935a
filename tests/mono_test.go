package tests

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Cookieless ASP.NET sessions of the older form against the real Mono:
// three Mono System.Web workers run an InProc app (tests/testdata/mono)
// whose session id travels in the URL as Mono writes it,
// `/(37F197D4325DAC58DC804F4A)/Default.aspx`, behind the real Caddy with
// `key aspnet_cookieless`, `pin_cookie off` and `affinity_learn`.
//
// The workers are hosted by tests/testdata/mono/MonoHost.cs (an
// HttpListener handing requests to System.Web's HttpRuntime, as xsp4
// does), compiled with mcs at test time: Debian's xsp4 4.2 does not
// start on its Mono 6.8 (see MonoHost.cs).

// monoPackages are the Debian packages the test needs; .ci/run installs
// them.
const monoPackages = "mono-runtime mono-mcs libmono-system-web4.0-cil"

// monoSessionPath is where Mono's System.Web puts a new cookieless
// session: the id, 24 upper-case hex digits, as a whole path segment
// after the application path ("/").
var monoSessionPath = regexp.MustCompile(`^/\(([0-9A-F]{24})\)/Default\.aspx$`)

// monoPage is what Default.aspx prints.
var monoPage = regexp.MustCompile(`^count=(\d+) worker=(\S+) pid=\d+ session=([0-9A-F]{24})\s*$`)

// needMono skips the test, loudly, when Mono or its compiler is missing.
func needMono(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"mono", "mcs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("!!! %s not found: the test against the real Mono System.Web is SKIPPED. "+
				"Install it (Debian: apt-get install -y --no-install-recommends %s; .ci/run does).", tool, monoPackages)
		}
	}
}

// monoWorker is one Mono process serving the test app.
type monoWorker struct {
	name, addr string
	cmd        *exec.Cmd
	out        *syncBuffer
	exited     chan struct{}
}

// buildMonoHost compiles MonoHost.cs into dir and returns the assembly.
func buildMonoHost(t *testing.T, dir string) string {
	t.Helper()
	exe := filepath.Join(dir, "MonoHost.exe")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "mcs", "-nologo", "-out:"+exe, "-r:System.Web.dll",
		filepath.Join(repoRoot, "tests", "testdata", "mono", "MonoHost.cs")).CombinedOutput()
	if err != nil {
		t.Fatalf("mcs MonoHost.cs: %v\n%s", err, out)
	}
	return exe
}

// startMonoWorkers starts n Mono workers on free 127.0.0.1 ports, each
// with its own copy of the app (and its own temporary files), and waits
// until each has served a first session. Each is killed on cleanup.
func startMonoWorkers(t *testing.T, n int) []*monoWorker {
	t.Helper()
	host := buildMonoHost(t, t.TempDir())
	ws := make([]*monoWorker, n)
	for i := range ws {
		ws[i] = startMonoWorker(t, fmt.Sprintf("mono%d", i+1), host)
	}
	// Compiling Default.aspx on the first request takes the workers a
	// few seconds: do it for all of them at once, before the clients.
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i, w := range ws {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = w.firstSession()
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("mono worker %s: %v\noutput:\n%s", ws[i].name, err, tailLines(ws[i].out.String(), 40))
		}
	}
	return ws
}

func startMonoWorker(t *testing.T, name, host string) *monoWorker {
	t.Helper()
	dir := t.TempDir()
	app := filepath.Join(dir, "app")
	for _, d := range []string{filepath.Join(app, "bin"), filepath.Join(dir, "tmp")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"web.config", "Default.aspx"} {
		copyFile(t, filepath.Join(repoRoot, "tests", "testdata", "mono", f), filepath.Join(app, f))
	}
	// System.Web loads the host's type into the application's AppDomain
	// from the application's bin directory.
	copyFile(t, host, filepath.Join(app, "bin", "MonoHost.exe"))
	for attempt := 1; ; attempt++ {
		w, portTaken := launchMonoWorker(t, name, dir, app)
		if !portTaken || attempt == 4 {
			if portTaken {
				t.Fatalf("mono worker %s: no free port in 4 attempts; output:\n%s", name, tailLines(w.out.String(), 40))
			}
			return w
		}
	}
}

// launchMonoWorker starts the worker on a free port and waits until it
// listens. portTaken is true when it exited because another process took
// the port meanwhile.
func launchMonoWorker(t *testing.T, name, dir, app string) (w *monoWorker, portTaken bool) {
	t.Helper()
	port := freePort(t)
	w = &monoWorker{name: name, addr: fmt.Sprintf("127.0.0.1:%d", port), out: new(syncBuffer), exited: make(chan struct{})}
	w.cmd = exec.Command("mono", filepath.Join(app, "bin", "MonoHost.exe"), "127.0.0.1", strconv.Itoa(port), app)
	w.cmd.Dir = app
	w.cmd.Env = append(isolatedEnv(dir), "TMPDIR="+filepath.Join(dir, "tmp"), "AFFINITY_MONO_WORKER="+name)
	w.cmd.Stdout, w.cmd.Stderr = w.out, w.out
	if err := w.cmd.Start(); err != nil {
		t.Fatalf("starting mono worker %s: %v", name, err)
	}
	go func() {
		_ = w.cmd.Wait()
		close(w.exited)
	}()
	t.Cleanup(w.stop)
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(w.out.String(), "listening on") {
		select {
		case <-w.exited:
			if strings.Contains(w.out.String(), "in use") {
				return w, true
			}
			t.Fatalf("mono worker %s exited before listening; output:\n%s", name, tailLines(w.out.String(), 40))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("mono worker %s not listening after 20s; output:\n%s", name, tailLines(w.out.String(), 40))
		}
		time.Sleep(50 * time.Millisecond)
	}
	return w, false
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// stop kills the worker (its sessions are of no further use).
func (w *monoWorker) stop() {
	select {
	case <-w.exited:
		return
	default:
	}
	_ = w.cmd.Process.Kill()
	select {
	case <-w.exited:
	case <-time.After(10 * time.Second):
	}
}

// firstSession asks the worker directly for a new session: it must
// answer with Mono's cookieless redirect, whose target serves count=1.
// The first request also compiles the page.
func (w *monoWorker) firstSession() error {
	hc := &http.Client{
		Timeout:       60 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	resp, err := hc.Get("http://" + w.addr + "/Default.aspx")
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	loc := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusFound || !monoSessionPath.MatchString(loc) {
		return fmt.Errorf("a new session: %s, Location %q; want 302 to /(<24 hex digits>)/Default.aspx", resp.Status, loc)
	}
	resp, err = hc.Get("http://" + w.addr + loc)
	if err != nil {
		return err
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if m := monoPage.FindSubmatch(body); resp.StatusCode != http.StatusOK || m == nil || string(m[1]) != "1" || string(m[2]) != w.name {
		return fmt.Errorf("GET %s: %s %q", loc, resp.Status, truncate(string(body), 300))
	}
	return nil
}

// monoSite renders the Caddyfile of the issue: affinity_learn and the
// affinity policy keyed on the cookieless id only, no pin cookie. The
// harness's readiness probe, /healthz, is answered by Caddy itself.
func monoSite(upstreams []string) func(sitePort, adminPort int, storage string) string {
	return func(sitePort, adminPort int, storage string) string {
		return globalOptions(adminPort, storage, "") + fmt.Sprintf(`
http://127.0.0.1:%d {
	bind 127.0.0.1
	respond /healthz 200
	affinity_learn
	reverse_proxy %s {
		lb_policy affinity {
			key aspnet_cookieless
			pin_cookie off
		}
	}
}
`, sitePort, strings.Join(upstreams, " "))
	}
}

// TestMonoCookielessSessions: 30 clients without cookies each start a
// session through Caddy (following Mono's redirect into the URL that
// carries the id) and visit it 8 times. Every visit must reach the
// worker that holds the session in memory: the counter goes 1, 2, ... 8
// on one worker under one id, and no visit after the first is redirected.
//
// Mono's System.Web answers a request for a session it does not hold
// with a redirect to the same URL (it reissues the id it was given), so
// a client that follows redirects tries again on whatever worker the
// next placement picks, and a stray visit is seen as a redirect before it
// is seen as a lost counter. Without reading Mono's `/(<id>)/` form, the
// id is no key, each request is placed at random, about two visits in
// three stray, and a session breaks when ten redirects in a row miss.
func TestMonoCookielessSessions(t *testing.T) {
	needCaddy(t)
	needMono(t)
	const nClients, nVisits, conc = 30, 8, 10
	start := time.Now()
	ws := startMonoWorkers(t, 3)
	addrs := make([]string, len(ws))
	for i, w := range ws {
		addrs[i] = w.addr
	}
	t.Logf("3 mono workers serving after %s", time.Since(start).Round(time.Millisecond))
	p := startCaddySite(t, "mono", monoSite(addrs))

	type result struct {
		worker, id string
		requests   int    // requests sent, redirects followed included
		strays     int    // requests answered by a worker without the session
		broken     string // why the session's counter broke, or ""
	}
	results := make([]result, nClients)
	clients := newClients(t, nClients)
	index := map[*client]int{}
	for i, c := range clients {
		index[c] = i
	}
	forEach(clients, conc, func(c *client) {
		r := &results[index[c]]
		// No cookie jar; redirects are followed, at most 10 per visit.
		hc := &http.Client{Transport: c.tr, Timeout: 15 * time.Second}
		url := p.URL + "/Default.aspx"
		for v := 1; v <= nVisits; v++ {
			resp, err := hc.Get(url)
			if err != nil {
				r.broken = fmt.Sprintf("visit %d: %v", v, err)
				return
			}
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
			resp.Body.Close()
			redirects := 0
			for q := resp.Request; q.Response != nil; q = q.Response.Request {
				redirects++
			}
			r.requests += redirects + 1
			// The first visit is redirected once, into the new session's
			// URL; later visits not at all.
			if want := min(v, 2) - 1; redirects > 1-want {
				r.strays += redirects - (1 - want)
			}
			m := monoPage.FindSubmatch(body)
			if resp.StatusCode != http.StatusOK || m == nil {
				r.broken = fmt.Sprintf("visit %d: %s %q", v, resp.Status, truncate(string(bytes.TrimSpace(body)), 200))
				return
			}
			count, _ := strconv.Atoi(string(m[1]))
			worker, id := string(m[2]), string(m[3])
			if v == 1 {
				// Mono redirected the new session into its URL.
				pm := monoSessionPath.FindStringSubmatch(resp.Request.URL.Path)
				if pm == nil || pm[1] != id || redirects == 0 {
					r.broken = fmt.Sprintf("visit 1 ended at %s after %d redirects, not at the session's /(%s)/ URL", resp.Request.URL.Path, redirects, id)
					return
				}
				r.worker, r.id = worker, id
				url = p.URL + resp.Request.URL.Path
			}
			if count != v || worker != r.worker || id != r.id {
				r.broken = fmt.Sprintf("visit %d: count=%d worker=%s session=%s (the session: %s on %s)", v, count, worker, id, r.id, r.worker)
				return
			}
		}
	})

	broken, strayed, strays, requests, perWorker := 0, 0, 0, 0, map[string]int{}
	for i, r := range results {
		strays += r.strays
		requests += r.requests
		if r.strays > 0 {
			strayed++
		}
		if r.broken != "" {
			broken++
			if broken <= 5 {
				t.Logf("session of client %d broke: %s", i, r.broken)
			}
			continue
		}
		perWorker[r.worker]++
	}
	t.Logf("%d of %d sessions broken; %d sessions had requests that reached a worker without the session (%d of %d requests); intact sessions per worker: %s; %s in all",
		broken, nClients, strayed, strays, requests, sortedMap(perWorker), time.Since(start).Round(time.Millisecond))
	if broken != 0 {
		t.Errorf("%d of %d cookieless Mono sessions broke", broken, nClients)
	}
	if strays != 0 {
		t.Errorf("%d requests of %d sessions reached a worker that does not hold the session", strays, strayed)
	}
	if len(perWorker) < 2 {
		t.Errorf("all sessions on %v: the test does not show that sessions stay on different workers", perWorker)
	}
}

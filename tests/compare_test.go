package tests

// The README's "Compared with Caddy's own policies" table, measured: the
// same scenarios, in one run, against Caddy's `cookie`, `ip_hash` and
// `client_ip_hash` policies and two `affinity` configurations, each in
// front of its own three real in-memory-session workers (demoapp).
//
// What Caddy v2.11.9's policies do, from their code
// (modules/caddyhttp/reverseproxy/selectionpolicies.go):
//
//   - `cookie` (CookieHashSelection.Select): the cookie holds
//     HMAC-SHA256(secret, dial) of the chosen upstream. A request with a
//     cookie gets the first *available* upstream, in pool order, whose
//     HMAC matches; if none does (no cookie, or its upstream is down) the
//     fallback policy (random) chooses and a new cookie is set.
//   - `ip_hash` / `client_ip_hash`: rendezvous hashing of the client
//     address over the available upstreams; nothing is remembered.
//   - A retry (lb_retries) calls Select again with the same request. With
//     passive health checks (fail_duration) the failed attempt has
//     already counted a failure, which (max_fails 1) makes the upstream
//     unavailable, so the retry goes elsewhere; without them every policy
//     above picks the same upstream again.

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// compareSetup is one column of the comparison: a policy, how it is
// configured, and what the README says it does.
type compareSetup struct {
	name      string
	siteLines string // lines of the site block before reverse_proxy
	lbPolicy  string // the lb_policy line or block
	// proxyCookie is the cookie the proxy sets ("" if it sets none);
	// the "no proxy cookie" clients refuse it.
	proxyCookie string

	// What is expected (and asserted).
	natOneWorker   bool // many clients behind one address all land on one worker
	movesBack      bool // after a failover, sessions go back to the returning worker
	noCookieBreaks bool // clients that refuse the proxy's cookie lose their sessions
	retryRepeats   bool // with no health checks, a retry picks the dead upstream again
}

// compareSetups are the columns: Caddy's own sticky policies as their
// docs show them, `affinity` with the keys of Caddyfile.example, and
// `affinity` with no proxy cookie at all, learning the app's cookie.
var compareSetups = []compareSetup{
	{name: "cookie", lbPolicy: "lb_policy cookie", proxyCookie: "lb",
		noCookieBreaks: true, retryRepeats: true},
	{name: "ip_hash", lbPolicy: "lb_policy ip_hash",
		natOneWorker: true, movesBack: true, retryRepeats: true},
	{name: "client_ip_hash", lbPolicy: "lb_policy client_ip_hash",
		natOneWorker: true, movesBack: true, retryRepeats: true},
	{name: "affinity", lbPolicy: "lb_policy affinity {\n\tkey cookie " + appCookie + "\n\tkey client_ip\n}", proxyCookie: pinCookie,
		natOneWorker: true},
	{name: "affinity_learn", siteLines: "affinity_learn",
		lbPolicy: "lb_policy affinity {\n\tkey cookie " + appCookie + "\n\tpin_cookie off\n}"},
}

// The reverse_proxy lines of each health-check mode.
const (
	compareHealthFull = "lb_retries 2\nlb_try_duration 3s\nhealth_uri /healthz\nhealth_interval 250ms\nhealth_timeout 1s\nfail_duration 10s"
	// No health check at all: a retry is the only thing that can notice
	// a dead upstream.
	compareHealthNone = "lb_retries 2\nlb_try_duration 3s"
	// Passive checks only: a failed attempt marks the upstream down.
	compareHealthPassive = "lb_retries 2\nlb_try_duration 3s\nfail_duration 10s"
)

// compareSite renders the site of a setup with the given reverse_proxy
// lines (retries and health checks).
func compareSite(upstreams []string, s compareSetup, proxyLines string) func(sitePort, adminPort int, storage string) string {
	return func(sitePort, adminPort int, storage string) string {
		return globalOptions(adminPort, storage, "") + fmt.Sprintf(`
http://127.0.0.1:%d {
	bind 127.0.0.1
%s	reverse_proxy %s {
%s%s	}
}
`, sitePort, indent(s.siteLines, "\t"), strings.Join(upstreams, " "),
			indentBlock(s.lbPolicy, "\t\t"), indent(proxyLines, "\t\t"))
	}
}

// reloadForce applies the process's Caddyfile again with
// `caddy reload --force` (an unchanged config is otherwise not reloaded),
// so that every module is provisioned anew and the old config stopped.
func (p *caddyProc) reloadForce(t *testing.T) time.Duration {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, caddyBin, "reload", "--config", p.File, "--adapter", "caddyfile",
		"--address", strings.TrimPrefix(p.Admin, "http://"), "--force")
	cmd.Dir = p.dir
	cmd.Env = isolatedEnv(p.dir)
	start := time.Now()
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("caddy reload --force of %s: %v\n%s", p.name, err, out)
	}
	fmt.Fprintf(p.out, "---- test harness: reloaded caddy %s (--force)\n", p.name)
	return time.Since(start)
}

// newClientsBehind returns n clients that all connect from ip, as users
// behind one NAT address or corporate proxy do; each has its own cookie
// jar.
func newClientsBehind(t *testing.T, n int, ip net.IP) []*client {
	t.Helper()
	cs := newClients(t, n)
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: ip}, Timeout: 5 * time.Second}
	for _, c := range cs {
		c.ip = ip
		c.tr.DialContext = dialer.DialContext
	}
	return cs
}

// brokenClients counts the clients with at least one broken visit in s.
func brokenClients(s *stats) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, b := range s.brokenOf {
		if b > 0 {
			n++
		}
	}
	return n
}

// spread is the share of new sessions of the least and the most loaded
// of the workers, e.g. "12/27" of 60 over three workers (a worker with
// none counts as 0).
func spread(newPerWorker map[string]int, workers []*backend) (least, most int) {
	least = -1
	for _, b := range workers {
		n := newPerWorker[b.name]
		if least < 0 || n < least {
			least = n
		}
		most = max(most, n)
	}
	return least, most
}

// compareFigures are one setup's measurements.
type compareFigures struct {
	// new sessions, 60 clients with an address each, 3 visits
	placeNew     map[string]int
	placeLeast   int
	placeBad     int // broken or failed visits
	reloadVisits int
	reloadBad    int // broken, failed or moved visits during and after the reload
	reloadTook   time.Duration
	// failover (active health check notices), then the worker returns
	victims        int
	victimsOnce    int // victim sessions that restarted exactly once elsewhere
	othersHurt     int // other sessions that broke or moved
	movedBack      int // sessions on the returned worker again
	returnBroken   int // sessions broken after the return
	natNew         map[string]int
	natMost        int
	natBad         int
	noCookieBroken int // of 60 clients refusing the proxy's cookie
	noCookieFailed int
	// lb_retries 2 and a dead worker, no health checks / passive only
	retryNoneVictims    int
	retryNoneFailed     int // victims' visits that failed (2 each)
	retryNoneOthers     int // other sessions that broke or failed
	retryPassiveVictims int
	retryPassiveFailed  int
	retryPassiveOthers  int
}

const (
	compareClients = 60
	compareConc    = 30
)

// TestCompareWithCaddyPolicies runs each row of the README's comparison
// table that can be measured, for every setup in compareSetups, and logs
// the figures as a table. Each setup has its own three workers and its own
// Caddy processes.
func TestCompareWithCaddyPolicies(t *testing.T) {
	needCaddy(t)
	figs := make([]*compareFigures, len(compareSetups))
	for i, s := range compareSetups {
		t.Run(s.name, func(t *testing.T) {
			f := &compareFigures{}
			figs[i] = f
			compareMain(t, s, f)
			compareRetry(t, s, f)
		})
	}
	logCompareTable(t, figs)
}

// compareMain measures placement, a reload, NAT, clients without the
// proxy's cookie, and a failover with the worker's return, against one
// Caddy with active and passive health checks.
func compareMain(t *testing.T, s compareSetup, f *compareFigures) {
	bs := startBackends(t, 3)
	p := startCaddySite(t, "cmp-"+s.name, compareSite(addrsOf(bs), s, compareHealthFull))

	// New session placement.
	own := newClients(t, compareClients)
	s1 := visitAll(own, p.URL, 3, compareConc)
	f.placeNew = s1.newPerWorker
	f.placeLeast, _ = spread(s1.newPerWorker, bs)
	f.placeBad = s1.broken + s1.failed
	t.Logf("%s: placement (%d clients x 3): %s", s.name, compareClients, s1)
	if f.placeBad != 0 || f.placeLeast < compareClients/10 {
		t.Errorf("%s: new sessions %s (want every worker at least %d of %d), %d broken or failed visits (want 0); samples:%s",
			s.name, sortedMap(s1.newPerWorker), compareClients/10, compareClients, f.placeBad, s1.samplesText())
	}

	// Reload mid-run: every client visits every 20 ms until the reload
	// has returned, then once more.
	var reloaded atomic.Bool
	s2 := newStats()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		forEach(own, len(own), func(c *client) {
			for range 100 {
				after := reloaded.Load()
				s2.record(c, c.visit(p.URL))
				if after {
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}()
	time.Sleep(100 * time.Millisecond)
	f.reloadTook = p.reloadForce(t)
	reloaded.Store(true)
	wg.Wait()
	f.reloadVisits = s2.requests
	f.reloadBad = s2.broken + s2.failed + s2.moved
	t.Logf("%s: visits during and after a reload (took %s): %s", s.name, f.reloadTook.Round(time.Millisecond), s2)
	if f.reloadBad != 0 {
		t.Errorf("%s: %d broken, failed or moved visits around a config reload, want 0; samples:%s", s.name, f.reloadBad, s2.samplesText())
	}

	// NAT: clients sharing one source address, each with its own jar.
	nat := newClientsBehind(t, compareClients, net.IPv4(127, 2, 0, 1))
	s3 := visitAll(nat, p.URL, 3, compareConc)
	f.natNew = s3.newPerWorker
	least, most := spread(s3.newPerWorker, bs)
	f.natMost, f.natBad = most, s3.broken+s3.failed
	t.Logf("%s: NAT, %d clients behind 127.2.0.1 x 3: %s", s.name, compareClients, s3)
	if f.natBad != 0 {
		t.Errorf("%s: behind one address, %d broken or failed visits, want 0; samples:%s", s.name, f.natBad, s3.samplesText())
	}
	if s.natOneWorker && most != compareClients {
		t.Errorf("%s: behind one address, new sessions %s: expected all on one worker", s.name, sortedMap(s3.newPerWorker))
	}
	if !s.natOneWorker && least < compareClients/10 {
		t.Errorf("%s: behind one address, new sessions %s: expected every worker to get at least %d", s.name, sortedMap(s3.newPerWorker), compareClients/10)
	}

	// Clients that keep the app's cookie but not the proxy's.
	nc := newClients(t, compareClients)
	if s.proxyCookie != "" {
		for _, c := range nc {
			c.dropCookie(s.proxyCookie)
		}
	}
	s4 := visitAll(nc, p.URL, 3, compareConc)
	f.noCookieBroken, f.noCookieFailed = brokenClients(s4), s4.failed
	t.Logf("%s: %d clients refusing the proxy's cookie %q x 3: %s (%d sessions broke)", s.name, compareClients, s.proxyCookie, s4, f.noCookieBroken)
	if f.noCookieFailed != 0 {
		t.Errorf("%s: %d failed requests without the proxy's cookie", s.name, f.noCookieFailed)
	}
	if s.noCookieBreaks && f.noCookieBroken < compareClients/3 {
		t.Errorf("%s: only %d of %d sessions broke without the proxy's cookie: expected most (random placement on every visit)", s.name, f.noCookieBroken, compareClients)
	}
	if !s.noCookieBreaks && f.noCookieBroken != 0 {
		t.Errorf("%s: %d of %d sessions broke without the proxy's cookie, want 0; samples:%s", s.name, f.noCookieBroken, compareClients, s4.samplesText())
	}

	// Failover, then the old worker returns. The active health check
	// notices the death before any request reaches the dead worker.
	owner := ownerMap(own)
	victim := backendNamed(bs, busiest(own))
	failLogs, upLogs := p.countLog(logCheckFailed, victim.addr), p.countLog(logHostUp, victim.addr)
	victim.kill()
	p.waitLog(t, logCheckFailed, victim.addr, failLogs, 20*time.Second)
	time.Sleep(healthInterval / 5)
	s5 := visitAll(own, p.URL, 2, compareConc)
	for _, c := range own {
		if owner[c] == victim.name {
			f.victims++
			if s5.restartsOf[c] == 1 && s5.brokenOf[c] == 1 && c.worker != victim.name && c.visits == 2 {
				f.victimsOnce++
			}
		} else if s5.brokenOf[c] != 0 || s5.failedOf[c] != 0 || c.worker != owner[c] {
			f.othersHurt++
		}
	}
	t.Logf("%s: after %s died (%d of its sessions) x 2: %s", s.name, victim.name, f.victims, s5)
	if s5.failed != 0 || f.victimsOnce != f.victims || f.othersHurt != 0 {
		t.Errorf("%s: after %s died: %d failed requests, %d of its %d sessions restarted exactly once elsewhere, %d other sessions hurt; want 0, all, 0; samples:%s",
			s.name, victim.name, s5.failed, f.victimsOnce, f.victims, f.othersHurt, s5.samplesText())
	}

	victim.restart(t)
	p.waitLog(t, logHostUp, victim.addr, upLogs, 20*time.Second)
	before := ownerMap(own)
	s6 := visitAll(own, p.URL, 2, compareConc)
	for _, c := range own {
		if c.worker == victim.name && before[c] != victim.name {
			f.movedBack++
		}
	}
	f.returnBroken = brokenClients(s6)
	t.Logf("%s: after %s returned x 2: %s; %d sessions moved back to it, %d broke", s.name, victim.name, s6, f.movedBack, f.returnBroken)
	if s6.failed != 0 {
		t.Errorf("%s: %d failed requests after %s returned", s.name, s6.failed, victim.name)
	}
	if f.victims == 0 {
		t.Errorf("%s: the killed worker held no session", s.name)
	}
	if s.movesBack && (f.movedBack != f.victims || f.returnBroken != f.victims) {
		t.Errorf("%s: %d sessions moved back and %d broke when %s returned: expected all %d of its old sessions to move back and restart",
			s.name, f.movedBack, f.returnBroken, victim.name, f.victims)
	}
	if !s.movesBack && (f.movedBack != 0 || f.returnBroken != 0) {
		t.Errorf("%s: %d sessions moved back and %d broke when %s returned, want 0 and 0; samples:%s",
			s.name, f.movedBack, f.returnBroken, victim.name, s6.samplesText())
	}
}

// compareRetry measures what a retry does when a worker refuses
// connections: with no health checks (the retry alone must notice) and
// with passive checks only. Each mode has its own workers and Caddy.
func compareRetry(t *testing.T, s compareSetup, f *compareFigures) {
	for _, mode := range []struct{ name, lines string }{{"none", compareHealthNone}, {"passive", compareHealthPassive}} {
		bs := startBackends(t, 3)
		p := startCaddySite(t, "cmp-"+s.name+"-retry-"+mode.name, compareSite(addrsOf(bs), s, mode.lines))
		cs := newClients(t, 30)
		s1 := visitAll(cs, p.URL, 2, compareConc)
		if s1.broken+s1.failed != 0 {
			t.Fatalf("%s, health checks %s: %s before the kill; samples:%s", s.name, mode.name, s1, s1.samplesText())
		}
		owner := ownerMap(cs)
		victim := backendNamed(bs, busiest(cs))
		victim.kill()
		s2 := visitAll(cs, p.URL, 2, compareConc)
		victims, victimFailed, others := 0, 0, 0
		for _, c := range cs {
			if owner[c] == victim.name {
				victims++
				victimFailed += s2.failedOf[c]
			} else if s2.brokenOf[c] != 0 || s2.failedOf[c] != 0 {
				others++
			}
		}
		t.Logf("%s, health checks %s: after %s died (%d of its sessions) x 2: %s", s.name, mode.name, victim.name, victims, s2)
		if victims == 0 {
			t.Errorf("%s: the killed worker held no session", s.name)
		}
		if others != 0 {
			t.Errorf("%s, health checks %s: %d sessions of other workers broke or failed; samples:%s", s.name, mode.name, others, s2.samplesText())
		}
		switch {
		case mode.name == "none":
			f.retryNoneVictims, f.retryNoneFailed, f.retryNoneOthers = victims, victimFailed, others
			if s.retryRepeats && victimFailed != 2*victims {
				t.Errorf("%s, no health checks: %d of the %d visits of the dead worker's sessions failed: expected every one (each retry picks the dead worker again)",
					s.name, victimFailed, 2*victims)
			}
			if !s.retryRepeats && victimFailed != 0 {
				t.Errorf("%s, no health checks: %d of the %d visits of the dead worker's sessions failed, want 0 (the retry fails over); samples:%s",
					s.name, victimFailed, 2*victims, s2.samplesText())
			}
		default:
			f.retryPassiveVictims, f.retryPassiveFailed, f.retryPassiveOthers = victims, victimFailed, others
			if victimFailed != 0 {
				t.Errorf("%s, passive health checks: %d of the %d visits of the dead worker's sessions failed, want 0; samples:%s",
					s.name, victimFailed, 2*victims, s2.samplesText())
			}
		}
		// Free this mode's processes before the next.
		p.stop()
		for _, b := range bs {
			b.kill()
		}
	}
}

// logCompareTable logs the figures, one row per measurement and one
// column per setup.
func logCompareTable(t *testing.T, figs []*compareFigures) {
	rows := []struct {
		what string
		cell func(f *compareFigures) string
	}{
		{"new sessions per worker (60 clients)", func(f *compareFigures) string { return sortedWorkers(f.placeNew) }},
		{"visits broken/failed/moved around a reload", func(f *compareFigures) string {
			return fmt.Sprintf("%d of %d", f.reloadBad, f.reloadVisits)
		}},
		{"killed worker's sessions restarted once elsewhere", func(f *compareFigures) string {
			return fmt.Sprintf("%d of %d", f.victimsOnce, f.victims)
		}},
		{"...moved back when it returned", func(f *compareFigures) string { return fmt.Sprintf("%d of %d", f.movedBack, f.victims) }},
		{"...sessions broken after the return", func(f *compareFigures) string { return fmt.Sprint(f.returnBroken) }},
		{"NAT: new sessions per worker (60 behind 1 IP)", func(f *compareFigures) string { return sortedWorkers(f.natNew) }},
		{"NAT: broken visits", func(f *compareFigures) string { return fmt.Sprint(f.natBad) }},
		{"no proxy cookie: sessions broken of 60", func(f *compareFigures) string { return fmt.Sprint(f.noCookieBroken) }},
		{"retry, no health checks: dead worker's visits failed", func(f *compareFigures) string {
			return fmt.Sprintf("%d of %d", f.retryNoneFailed, 2*f.retryNoneVictims)
		}},
		{"retry, passive checks: dead worker's visits failed", func(f *compareFigures) string {
			return fmt.Sprintf("%d of %d", f.retryPassiveFailed, 2*f.retryPassiveVictims)
		}},
	}
	var b strings.Builder
	b.WriteString("| |")
	for _, s := range compareSetups {
		fmt.Fprintf(&b, " %s |", s.name)
	}
	b.WriteString("\n|---|")
	b.WriteString(strings.Repeat("---|", len(compareSetups)))
	for _, r := range rows {
		fmt.Fprintf(&b, "\n| %s |", r.what)
		for _, f := range figs {
			if f == nil {
				b.WriteString(" - |")
				continue
			}
			fmt.Fprintf(&b, " %s |", r.cell(f))
		}
	}
	t.Logf("comparison with Caddy's own policies:\n%s", b.String())
}

// sortedWorkers prints per-worker counts as "A/B/C", e.g. "21/19/20".
func sortedWorkers(m map[string]int) string {
	names := []string{"A", "B", "C"}
	for k := range m {
		if k != "A" && k != "B" && k != "C" {
			names = append(names, k)
		}
	}
	sort.Strings(names[3:])
	parts := make([]string, len(names))
	for i, n := range names {
		parts[i] = fmt.Sprint(m[n])
	}
	return strings.Join(parts, "/")
}

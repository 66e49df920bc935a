package tests

// Issue "upstream lifecycle": drain, maintenance, hold, slow start, the
// drain probe and the admin API, through a real Caddy binary.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

const keyPolicy = "key cookie " + appCookie

// clientsOn returns the clients whose session is on worker w.
func clientsOn(clients []*client, w string) []*client {
	var out []*client
	for _, c := range clients {
		if c.worker == w {
			out = append(out, c)
		}
	}
	return out
}

// TestDrainUnderLoad is the acceptance scenario of the issue "upstream
// lifecycle". Three workers; 150 clients get sessions (3 visits each).
// An operator drains worker B through the admin API
// (POST /affinity/upstreams/state {"upstream":"<B>","state":"draining"}).
// Then, at the same time, 150 new clients (3 visits each) get no session
// on B, and B's own clients go on visiting it (5 more visits each) with no
// broken session and no failed request. Once B's clients stop, B's
// `sessions` in GET /affinity/upstreams falls to 0 and `drained` turns
// true as their session-table entries expire (session_ttl 3s here, so
// within about 6 s: TTL, plus the table's one-second clock, plus the 2 s
// sweep).
func TestDrainUnderLoad(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	p := startCaddy(t, "drain", proxyConfig{
		Upstreams: addrsOf(bs),
		Policy:    keyPolicy + "\nsession_ttl 3s",
	})
	clients := newClients(t, 150)
	expectClean(t, "sessions before the drain (150 clients x 3)", visitAll(clients, p.URL, 3, 50))
	if t.Failed() {
		t.FailNow()
	}
	victim := backendNamed(bs, "B")
	onB := clientsOn(clients, "B")
	t.Logf("sessions per worker: %s; draining B (%s)", sortedMap(sessionsByWorker(clients)), victim.addr)
	if len(onB) == 0 {
		t.Fatal("no session landed on B: nothing to drain")
	}

	// `drained` means "can be taken down without cutting a session": it
	// must not be true while B's sessions are live, whatever the age of
	// the last session count.
	falselyDrained := func(when string, u affinityUpstream) string {
		if u.Drained {
			return fmt.Sprintf("%s: drained=true although %d sessions pinned to B are live (%s)", when, len(onB), u)
		}
		return ""
	}
	var lies []string
	if lie := falselyDrained("POST answer", p.setState(t, victim.addr, "draining")); lie != "" {
		lies = append(lies, lie)
	}
	u := p.affinity(t)[victim.addr]
	if u.State != "draining" || u.SetBy != "operator" {
		t.Errorf("GET after the drain: %s, want state draining set by operator", u)
	}
	if lie := falselyDrained("GET right after", u); lie != "" {
		lies = append(lies, lie)
	}

	// Watch B's session count while the two crowds visit.
	var maxSeen int64
	var pollErr error
	stopPoll := make(chan struct{})
	var pollWG sync.WaitGroup
	pollWG.Add(1)
	go func() {
		defer pollWG.Done()
		for {
			m, err := fetchAffinity(p.Admin)
			if err != nil {
				pollErr = err
				return
			}
			maxSeen = max(maxSeen, m[victim.addr].Sessions)
			if lie := falselyDrained("GET while B's clients visit", m[victim.addr]); lie != "" {
				lies = append(lies, lie)
			}
			select {
			case <-stopPoll:
				return
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()

	fresh := newClients(t, 150)
	var sNew, sOld *stats
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); sNew = visitAll(fresh, p.URL, 3, 40) }()
	go func() { defer wg.Done(); sOld = visitAll(onB, p.URL, 5, 20) }()
	wg.Wait()
	lastVisit := time.Now()

	expectClean(t, "150 new clients x 3 while B drains", sNew)
	if n := sNew.perWorker["B"]; n != 0 {
		t.Errorf("draining B served %d visits of new clients (%d new sessions), want 0", n, sNew.newPerWorker["B"])
	}
	expectClean(t, fmt.Sprintf("B's %d clients x 5 while B drains", len(onB)), sOld)
	strayed := 0
	for _, c := range onB {
		if c.worker != "B" || c.visits != 8 {
			strayed++
			if strayed <= 5 {
				t.Errorf("a session of draining B did not stay on it: %s", c)
			}
		}
	}

	// B's sessions are counted while they live...
	close(stopPoll)
	pollWG.Wait()
	waitUntil(t, "B's live sessions counted", 2500*time.Millisecond, 100*time.Millisecond, func() (bool, string) {
		u := p.affinity(t)[victim.addr]
		maxSeen = max(maxSeen, u.Sessions)
		return maxSeen > 0, u.String()
	})
	if pollErr != nil {
		t.Errorf("polling the admin API: %v", pollErr)
	}
	t.Logf("B's session count peaked at %d while its %d clients visited", maxSeen, len(onB))
	if len(lies) > 0 {
		t.Errorf("B was reported drained %d times while its sessions were live (an operator waiting for drained would cut them); first: %s",
			len(lies), lies[0])
	}
	if maxSeen > int64(len(onB)) {
		t.Errorf("B's session count reached %d, but only %d sessions are on B", maxSeen, len(onB))
	}
	// ...and once they expire, B is drained.
	var last affinityUpstream
	waitUntil(t, "B drained (sessions 0, drained true)", 10*time.Second, 100*time.Millisecond, func() (bool, string) {
		last = p.affinity(t)[victim.addr]
		return last.Sessions == 0 && last.Drained, last.String()
	})
	took := time.Since(lastVisit)
	t.Logf("B drained %s after its clients' last visit (session_ttl 3s): %s", took.Round(10*time.Millisecond), last)
	if last.State != "draining" {
		t.Errorf("B drained but its state is %q", last.State)
	}
	if took > 7*time.Second {
		t.Errorf("B took %s to show drained after the last visit, want about 6 s at most (3 s TTL + 1 s clock + 2 s sweep)", took)
	}
	logFigures(t, figures{event: "drain B (operator)", clients: 300, requests: 450 + sNew.requests + sOld.requests,
		broken: sNew.broken + sOld.broken + strayed, failed: sNew.failed + sOld.failed, restarted: sOld.restarts})
}

// TestMaintenanceFailsOverOnce: the sessions of a worker put in
// maintenance restart exactly once, on other workers, and never again:
// not while it stays in maintenance, and not when it is set back to up
// (they stay where they landed; new sessions use it again).
func TestMaintenanceFailsOverOnce(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	p := startCaddy(t, "maint", proxyConfig{Upstreams: addrsOf(bs), Policy: keyPolicy})
	clients := newClients(t, 90)
	expectClean(t, "before (90 clients x 3)", visitAll(clients, p.URL, 3, 30))
	if t.Failed() {
		t.FailNow()
	}
	owner := ownerMap(clients)
	victim := backendNamed(bs, busiest(clients))
	t.Logf("sessions per worker: %s; maintenance for %s", sortedMap(sessionsByWorker(clients)), victim.name)
	p.setState(t, victim.addr, "maintenance")

	s2 := visitAll(clients, p.URL, 3, 30)
	checkFailover(t, "in maintenance (90 x 3)", clients, owner, victim.name, 3, s2)
	if n := s2.perWorker[victim.name]; n != 0 {
		t.Errorf("%s in maintenance served %d visits", victim.name, n)
	}
	landed := ownerMap(clients)
	s3 := visitAll(clients, p.URL, 3, 30)
	expectStayed(t, "still in maintenance (90 x 3)", clients, landed, victim.name, s3)

	p.setState(t, victim.addr, "up")
	s4 := visitAll(clients, p.URL, 3, 30)
	expectStayed(t, "set back to up (90 x 3)", clients, landed, victim.name, s4)

	fresh := newClients(t, 45)
	s5 := visitAll(fresh, p.URL, 2, 30)
	expectClean(t, "new clients after it is up (45 x 2)", s5)
	if s5.newPerWorker[victim.name] == 0 {
		t.Errorf("none of 45 new sessions landed on %s after it was set up: %s", victim.name, sortedMap(s5.newPerWorker))
	}
	logFigures(t, figures{event: "maintenance " + victim.name + ", then up", clients: 135,
		requests: 270 + s2.requests + s3.requests + s4.requests + s5.requests,
		broken:   s3.broken + s4.broken + s5.broken + (s2.broken - s2.restarts), failed: s2.failed + s3.failed + s4.failed + s5.failed,
		restarted: s2.restarts, moved: movedBack(clients, victim.name)})
}

// TestHoldThroughRestart: with `hold 4s` (lb_try_duration 8s, no
// lb_retries), a worker whose listener goes away and comes back within
// about 1.5 s, keeping its session store, keeps every one of its
// sessions: the requests sent during the gap wait and are served by it
// once it is back. No request fails, no session restarts or moves.
//
// Twice: with the passive health check window of the README's example
// configuration (fail_duration 10s, longer than the hold), and with one
// shorter than the hold. A failed dial during the gap is a passive
// failure, which keeps Caddy's Upstream.Available() false for
// fail_duration even after the worker is back.
func TestHoldThroughRestart(t *testing.T) {
	needCaddy(t)
	t.Run("fail_duration 10s", func(t *testing.T) { holdThroughRestart(t, "10s") })
	t.Run("fail_duration 1s", func(t *testing.T) { holdThroughRestart(t, "1s") })
}

// orNow returns t, or the present if t is zero.
func orNow(t time.Time) time.Time {
	if t.IsZero() {
		return time.Now()
	}
	return t
}

func holdThroughRestart(t *testing.T, failDuration string) {
	bs := startCtlBackends(t, 3, "")
	p := startCaddy(t, "hold", proxyConfig{
		Upstreams:    ctlAddrs(bs),
		Policy:       keyPolicy + "\nhold 4s",
		Retries:      "off",
		TryDuration:  "8s",
		FailDuration: failDuration,
	})
	// lead is a session on the worker that will go away; it visits the
	// moment the worker is gone, before the active health check (every
	// 250 ms here) can notice, as some request nearly always does in
	// production, where health checks come every few seconds.
	lead := newClient(t)
	leadFirst := lead.visit(p.URL)
	if leadFirst.failed() || leadFirst.Visits != 1 {
		t.Fatalf("lead's first visit: %s", leadFirst)
	}
	clients := newClients(t, 60)
	before := newPhase("before")
	l := startLoad(t, clients, p.URL, 200*time.Millisecond, 1000, before)
	l.waitEach(t, l.mark(), 2, 30*time.Second)
	owner := l.owners()
	var victim *ctlBackend
	for _, b := range bs {
		if b.name == leadFirst.Worker {
			victim = b
		}
	}
	victims := 0
	for _, w := range owner {
		if w == victim.name {
			victims++
		}
	}

	// The visits of the worker's sessions in flight while it is away.
	var gapMu sync.Mutex
	var down, back time.Time
	through := map[*client]int{}
	l.watch(func(c *client, sent, done time.Time, r visitResult) {
		gapMu.Lock()
		defer gapMu.Unlock()
		if owner[c] == victim.name && r.Worker == victim.name && !down.IsZero() &&
			sent.Before(orNow(back)) && done.After(down) {
			through[c]++
		}
	})
	gap := newPhase("gap")
	failLogs, upLogs := p.countLog(logCheckFailed, victim.addr), p.countLog(logHostUp, victim.addr)
	l.setPhase(gap)
	gapMu.Lock()
	down = time.Now()
	gapMu.Unlock()
	victim.closeListener(false)
	leadDone := make(chan visitResult, 1)
	go func() { leadDone <- lead.visit(p.URL) }()
	t.Logf("worker %s (%d sessions) off the network", victim.name, victims)
	p.waitLog(t, logCheckFailed, victim.addr, failLogs, 5*time.Second)
	if d := 1500*time.Millisecond - time.Since(down); d > 0 {
		time.Sleep(d) // the outage itself, not a wait for a condition
	}
	victim.relisten(t)
	gapMu.Lock()
	back = time.Now()
	gapMu.Unlock()
	t.Logf("worker %s back after %s, same session store", victim.name, back.Sub(down).Round(time.Millisecond))
	p.waitLog(t, logHostUp, victim.addr, upLogs, 10*time.Second)
	after := newPhase("after")
	l.setPhase(after)
	l.waitEach(t, l.mark(), 3, 30*time.Second)
	l.stop()
	lr := <-leadDone
	t.Logf("lead's visit sent as %s went away: %s", victim.name, lr)
	if lr.failed() || lr.Worker != victim.name || lr.Visits != 2 {
		t.Errorf("lead's visit sent as %s went away: %s, want %s2 (its session waited for its worker)", victim.name, lr, victim.name)
	}

	for _, ph := range []*phase{before, gap, after} {
		t.Log(ph)
	}
	rep := reportSessions(clients, owner, map[string]bool{}, before, gap, after)
	requests, failed := sumStats(before, gap, after)
	if failed != 0 {
		t.Errorf("%d requests failed, want 0: %s %s", failed, gap.samplesText(), after.samplesText())
	}
	if rep.broken != 0 {
		t.Errorf("%d sessions broke, want 0: %s", rep.broken, strings.Join(rep.bad, "\n\t"))
	}
	moved := 0
	for _, c := range clients {
		if c.worker != owner[c] {
			moved++
			if moved <= 5 {
				t.Errorf("session moved from %s to %s: %s", owner[c], c.worker, c)
			}
		}
	}
	gapMu.Lock()
	waited := len(through)
	gapMu.Unlock()
	t.Logf("%d of the %d sessions of %s had a visit in flight while it was away, answered by it", waited, victims, victim.name)
	if waited < victims {
		t.Errorf("only %d of the %d sessions of %s had a visit in flight during the gap that %s answered: the others did not wait for it",
			waited, victims, victim.name, victim.name)
	}
	logFigures(t, figures{event: fmt.Sprintf("worker %s off the network ~1.5 s, hold 4s, fail_duration %s", victim.name, failDuration), clients: len(clients),
		requests: requests, broken: rep.broken, failed: failed, moved: movedBack(clients, victim.name)})
}

// newSessionsDuring starts new clients, conc at a time, spread evenly
// over window from t0 (maxClients in all), each visiting twice.
// It returns each client's worker and when its first visit was sent
// (since t0). A session that does not go on at its second visit fails
// the test.
func newSessionsDuring(t *testing.T, base string, t0 time.Time, window time.Duration, conc, maxClients int) (workers []string, at []time.Duration) {
	t.Helper()
	var mu sync.Mutex
	var bad []string
	var wg sync.WaitGroup
	next := 0
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				if next >= maxClients || time.Since(t0) >= window {
					mu.Unlock()
					return
				}
				due := t0.Add(window * time.Duration(next) / time.Duration(maxClients))
				next++
				mu.Unlock()
				time.Sleep(time.Until(due))
				c := newClient(t)
				sent := time.Since(t0)
				r1 := c.visit(base)
				r2 := c.visit(base)
				mu.Lock()
				if r1.failed() || r2.failed() || r1.Visits != 1 || r2.Visits != 2 || r1.Worker != r2.Worker {
					bad = append(bad, fmt.Sprintf("%s then %s", r1, r2))
				} else {
					workers = append(workers, r1.Worker)
					at = append(at, sent)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(bad) > 0 {
		t.Errorf("%d new sessions failed or did not go on: %v", len(bad), bad[:min(len(bad), 5)])
	}
	return workers, at
}

func share(workers []string, w string) float64 {
	n := 0
	for _, x := range workers {
		if x == w {
			n++
		}
	}
	if len(workers) == 0 {
		return 0
	}
	return float64(n) / float64(len(workers))
}

// TestSlowStartRamp: with `slow_start 6s`, an upstream added by a config
// reload (`caddy reload`, which POSTs the new config to the admin API's
// /load) gets a clearly smaller share of new sessions in the first 1.5 s
// than after 6 s. Loose bounds: the first window's share must be less
// than half the later one.
//
// The ramp must start with the reload itself (when the new pool is first
// used), not with the module's next look at the running config (about once
// a second): the first 500 ms are checked on their own. The reload comes
// 1.1 s after warming, which would fall just after such a look.
func TestSlowStartRamp(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	cfg := proxyConfig{Upstreams: addrsOf(bs[:2]), Policy: keyPolicy + "\nslow_start 6s"}
	p := startCaddy(t, "slowstart", cfg)
	warm := newClients(t, 20)
	expectClean(t, "sessions on A and B (20 x 2)", visitAll(warm, p.URL, 2, 10))
	tick := time.Now()
	time.Sleep(1100 * time.Millisecond)

	cfg.Upstreams = addrsOf(bs)
	p.reload(t, cfg)
	t.Logf("reloaded %s after warming", time.Since(tick).Round(time.Millisecond))
	t0 := time.Now()
	const window = 1500 * time.Millisecond
	early, earlyAt := newSessionsDuring(t, p.URL, t0, window, 24, 300)
	var buckets []string
	for b := time.Duration(0); b < window; b += 250 * time.Millisecond {
		var in []string
		for i, at := range earlyAt {
			if at >= b && at < b+250*time.Millisecond {
				in = append(in, early[i])
			}
		}
		buckets = append(buckets, fmt.Sprintf("%s-%s: %d/%d on C", b, b+250*time.Millisecond, int(share(in, "C")*float64(len(in))+0.5), len(in)))
	}
	t.Logf("first %s after the reload, per 250 ms: %s", window, strings.Join(buckets, "; "))

	time.Sleep(time.Until(t0.Add(6500 * time.Millisecond))) // the ramp is a time: wait it out
	t1 := time.Now()
	late, _ := newSessionsDuring(t, p.URL, t1, window, 24, 300)

	se, sl := share(early, "C"), share(late, "C")
	t.Logf("C's share of new sessions: %.1f%% of %d in the first %s, %.1f%% of %d after 6.5 s (full share: 33.3%%)",
		100*se, len(early), window, 100*sl, len(late))
	if sl < 0.2 {
		t.Errorf("after the ramp C took %.1f%% of new sessions, want about a third", 100*sl)
	}
	if se >= sl/2 {
		t.Errorf("in the first %s C took %.1f%% of new sessions, not clearly less than its %.1f%% after the ramp (want under half)",
			window, 100*se, 100*sl)
	}
	// The ramp starts with the reload: in its first 500 ms a linear ramp
	// gives C under 9% of its share; allow half of it.
	var first []string
	for i, at := range earlyAt {
		if at < 500*time.Millisecond {
			first = append(first, early[i])
		}
	}
	if s0 := share(first, "C"); len(first) >= 20 && s0 >= sl/2 {
		t.Errorf("in the first 500 ms after the reload C took %.1f%% of %d new sessions, its full share being %.1f%%: the ramp did not start with the reload",
			100*s0, len(first), 100*sl)
	}
	expectClean(t, "the sessions from before the reload (x 1)", visitAll(warm, p.URL, 1, 30))
}

// TestTwoInstancesShareDrain: two Caddy processes share one
// `storage file_system` folder. A drain set through instance one's admin
// API shows on instance two's within 5 s, and from then on no new
// session through instance two reaches the drained worker, while its
// sessions there go on.
func TestTwoInstancesShareDrain(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	cfg := proxyConfig{Upstreams: addrsOf(bs), Policy: keyPolicy, Storage: t.TempDir()}
	one := launchCaddy(t, "one", cfg)
	two := launchCaddy(t, "two", cfg)
	one.waitReady(t)
	two.waitReady(t)
	clients := newClients(t, 60)
	expectClean(t, "sessions through two (60 x 2)", visitAll(clients, two.URL, 2, 30))
	victim := backendNamed(bs, "B")
	onB := clientsOn(clients, "B")
	if u := two.affinity(t)[victim.addr]; u.State != "up" {
		t.Fatalf("before the drain, instance two shows %s", u)
	}

	start := time.Now()
	one.setState(t, victim.addr, "draining")
	var seen affinityUpstream
	waitUntil(t, "instance two shows B draining", 5*time.Second, 25*time.Millisecond, func() (bool, string) {
		m, err := fetchAffinity(two.Admin)
		if err != nil {
			return false, err.Error()
		}
		seen = m[victim.addr]
		return seen.State == "draining", seen.String()
	})
	took := time.Since(start)
	t.Logf("instance two shows B draining %s after the POST to instance one: %s", took.Round(time.Millisecond), seen)
	if took > 5*time.Second {
		t.Errorf("the drain took %s to reach instance two, want at most 5 s", took)
	}
	if seen.SetBy != "operator" {
		t.Errorf("instance two: set_by %q, want operator", seen.SetBy)
	}

	fresh := newClients(t, 120)
	var sNew, sOld *stats
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); sNew = visitAll(fresh, two.URL, 3, 40) }()
	go func() { defer wg.Done(); sOld = visitAll(onB, two.URL, 3, 20) }()
	wg.Wait()
	expectClean(t, "120 new clients x 3 through two", sNew)
	if n := sNew.perWorker["B"]; n != 0 {
		t.Errorf("instance two sent %d visits of new clients to drained B (%d new sessions)", n, sNew.newPerWorker["B"])
	}
	expectClean(t, fmt.Sprintf("B's %d clients x 3 through two", len(onB)), sOld)
	for _, c := range onB {
		if c.worker != "B" {
			t.Errorf("a session of draining B left it: %s", c)
			break
		}
	}
	// The session table is per process: each instance counts the
	// sessions it has seen. Logged, for operators polling `drained`.
	u1, u2 := one.affinity(t)[victim.addr], two.affinity(t)[victim.addr]
	t.Logf("after the phase, B as instance one sees it: %s; as instance two sees it: %s", u1, u2)
	logFigures(t, figures{event: "drain on instance one, seen by two in " + took.Round(time.Millisecond).String(),
		clients: 180, requests: 120 + sNew.requests + sOld.requests, broken: sNew.broken + sOld.broken, failed: sNew.failed + sOld.failed})
}

// TestAdminBadRequests: malformed state changes through the real admin
// listener get 400, an unknown upstream 404, a wrong method 405 (with
// Allow), each with a JSON {"error":"..."} that says what is wrong; and
// none of them changes any state.
func TestAdminBadRequests(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 2)
	p := startCaddy(t, "admin", proxyConfig{Upstreams: addrsOf(bs), Policy: keyPolicy})
	a, b := bs[0].addr, bs[1].addr
	statePath, listPath := p.Admin+"/affinity/upstreams/state", p.Admin+"/affinity/upstreams"

	cases := []struct {
		name, method, url, ctype, body string
		status                         int
		want                           string // in the error, case-insensitive
		allow                          string
	}{
		{"empty body", "POST", statePath, "application/json", "", 400, "empty body", ""},
		{"not JSON", "POST", statePath, "application/json", "upstream=" + a, 400, "invalid json", ""},
		{"truncated JSON", "POST", statePath, "application/json", `{"upstream":"` + a, 400, "invalid json", ""},
		{"array", "POST", statePath, "application/json", `["` + a + `","draining"]`, 400, "invalid json", ""},
		{"unknown field", "POST", statePath, "application/json", `{"upstream":"` + a + `","state":"draining","weight":3}`, 400, "weight", ""},
		{"two objects", "POST", statePath, "application/json", `{"upstream":"` + a + `","state":"draining"}{"upstream":"` + b + `","state":"draining"}`, 400, "after the object", ""},
		{"unknown state", "POST", statePath, "application/json", `{"upstream":"` + a + `","state":"sleeping"}`, 400, "sleeping", ""},
		{"state in capitals", "POST", statePath, "application/json", `{"upstream":"` + a + `","state":"DRAINING"}`, 400, "unknown state", ""},
		{"state not a string", "POST", statePath, "application/json", `{"upstream":"` + a + `","state":1}`, 400, "invalid json", ""},
		{"no upstream", "POST", statePath, "application/json", `{"state":"draining"}`, 400, `missing field "upstream"`, ""},
		{"no state", "POST", statePath, "application/json", `{"upstream":"` + a + `"}`, 400, `missing field "state"`, ""},
		{"empty object", "POST", statePath, "application/json", `{}`, 400, "missing fields", ""},
		{"unknown upstream", "POST", statePath, "application/json", `{"upstream":"127.0.0.1:1","state":"draining"}`, 404, "unknown upstream", ""},
		{"upstream by name", "POST", statePath, "application/json", `{"upstream":"A","state":"maintenance"}`, 404, "unknown upstream", ""},
		{"GET on state", "GET", statePath, "", "", 405, "method get not allowed", "POST"},
		{"PUT on state", "PUT", statePath, "application/json", `{"upstream":"` + a + `","state":"draining"}`, 405, "not allowed", "POST"},
		{"DELETE on state", "DELETE", statePath, "", "", 405, "not allowed", "POST"},
		{"POST on list", "POST", listPath, "application/json", `{"upstream":"` + a + `","state":"draining"}`, 405, "method post not allowed", "GET"},
		{"DELETE on list", "DELETE", listPath, "", "", 405, "not allowed", "GET"},
	}
	for _, tc := range cases {
		var body []byte
		if tc.body != "" || tc.method == "POST" {
			body = []byte(tc.body)
		}
		status, hdr, resp, err := adminCall(tc.method, tc.url, tc.ctype, body)
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		var e struct {
			Error string `json:"error"`
		}
		jerr := json.Unmarshal(resp, &e)
		t.Logf("%-18s %s %s -> %d %s", tc.name, tc.method, strings.TrimPrefix(tc.url, p.Admin), status, strings.TrimSpace(string(resp)))
		switch {
		case status != tc.status:
			t.Errorf("%s: status %d, want %d: %s", tc.name, status, tc.status, resp)
		case jerr != nil || e.Error == "":
			t.Errorf("%s: body is not a JSON {\"error\":...}: %q", tc.name, resp)
		case !strings.Contains(strings.ToLower(e.Error), strings.ToLower(tc.want)):
			t.Errorf("%s: error %q does not say %q", tc.name, e.Error, tc.want)
		}
		if ct := hdr.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
			t.Errorf("%s: Content-Type %q, want application/json", tc.name, ct)
		}
		if tc.allow != "" && hdr.Get("Allow") != tc.allow {
			t.Errorf("%s: Allow %q, want %q", tc.name, hdr.Get("Allow"), tc.allow)
		}
	}

	// Nothing changed; then the control: a good request works.
	m := p.affinity(t)
	var got []string
	for _, u := range m {
		got = append(got, u.Upstream+"="+u.State)
		if u.State != "up" || u.Since != nil {
			t.Errorf("after the bad requests: %s, want up and never changed", u)
		}
	}
	sort.Strings(got)
	if len(m) != 2 || m[a].Upstream != a || m[b].Upstream != b {
		t.Errorf("GET /affinity/upstreams lists %v, want exactly %s and %s", got, a, b)
	}
	u := p.setState(t, a, "draining")
	if u.Since == nil {
		t.Errorf("a state change answered no since: %s", u)
	}
	status, _, resp, err := adminCall(http.MethodPost, statePath, "application/json", []byte(`{"upstream":"`+a+`","state":"up"}`))
	if err != nil || status != http.StatusOK {
		t.Errorf("setting %s up again: %d %v %s", a, status, err, resp)
	}
}

// TestProbeDrain: a worker whose probe path answers 503 (the default
// drain_status) is drained by the probe: new sessions avoid it, its
// sessions stay; when it answers 200 again it is up and takes new
// sessions again.
func TestProbeDrain(t *testing.T) {
	needCaddy(t)
	bs := startCtlBackends(t, 3, "/drain-status")
	p := startCaddy(t, "probe", proxyConfig{
		Upstreams: ctlAddrs(bs),
		Policy:    keyPolicy + "\nprobe /drain-status {\ninterval 250ms\npasses 2\n}",
	})
	clients := newClients(t, 90)
	expectClean(t, "before (90 clients x 3)", visitAll(clients, p.URL, 3, 30))
	if t.Failed() {
		t.FailNow()
	}
	victim := bs[1]
	onB := clientsOn(clients, victim.name)
	t.Logf("sessions per worker: %s; %s's probe path now answers 503", sortedMap(sessionsByWorker(clients)), victim.name)
	victim.drain.Store(true)
	took := waitUntil(t, "the probe drains B", 10*time.Second, 50*time.Millisecond, func() (bool, string) {
		u := p.affinity(t)[victim.addr]
		return u.State == "draining" && u.SetBy == "probe", u.String()
	})
	t.Logf("B draining (set_by probe) %s after it started answering 503 (interval 250ms, passes 2)", took.Round(time.Millisecond))

	fresh := newClients(t, 90)
	var sNew, sOld *stats
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); sNew = visitAll(fresh, p.URL, 3, 30) }()
	go func() { defer wg.Done(); sOld = visitAll(onB, p.URL, 3, 20) }()
	wg.Wait()
	expectClean(t, "90 new clients x 3 while B asks to drain", sNew)
	if n := sNew.perWorker[victim.name]; n != 0 {
		t.Errorf("B, drained by its probe, served %d visits of new clients", n)
	}
	expectClean(t, fmt.Sprintf("B's %d clients x 3 while it drains", len(onB)), sOld)
	for _, c := range onB {
		if c.worker != victim.name || c.visits != 6 {
			t.Errorf("a session of B did not stay on it: %s", c)
			break
		}
	}

	victim.drain.Store(false)
	took = waitUntil(t, "the probe brings B back up", 10*time.Second, 50*time.Millisecond, func() (bool, string) {
		u := p.affinity(t)[victim.addr]
		return u.State == "up", u.String()
	})
	t.Logf("B up again %s after its probe path answered 200", took.Round(time.Millisecond))
	later := newClients(t, 60)
	s3 := visitAll(later, p.URL, 2, 30)
	expectClean(t, "60 new clients x 2 after B is back", s3)
	if s3.newPerWorker[victim.name] == 0 {
		t.Errorf("no new session on B after the probe brought it back: %s", sortedMap(s3.newPerWorker))
	}
	logFigures(t, figures{event: "probe drains B (503), then undrains", clients: 240,
		requests: 270 + sNew.requests + sOld.requests + s3.requests, broken: sNew.broken + sOld.broken + s3.broken,
		failed: sNew.failed + sOld.failed + s3.failed})
}

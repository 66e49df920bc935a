package tests

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-affinity/caddy-affinity/internal/testredis"
)

// `store redis`: several instances share a Redis, and every one of them
// agrees on the sessions any one learned or moved. Each test starts its
// own redis-server on a free loopback port, without persistence.

// redisInstances starts n Caddy instances in learn mode (pin_cookie off,
// the app's own cookie, affinity_learn) sharing Redis at addr, in front
// of the same workers.
func redisInstances(t *testing.T, n int, upstreams []string, addr string) []*caddyProc {
	ps := make([]*caddyProc, n)
	for i := range ps {
		ps[i] = startCaddySite(t, fmt.Sprintf("redis%d", i+1), learnSite(upstreams, "affinity_learn",
			storePolicy("store redis "+addr)))
	}
	return ps
}

// rotate makes every client visit n times, each visit on the next of the
// given instances (a client starts at its own offset), and returns the
// phase's figures. The trail grows by one each visit, so two instances
// alternate (c.visits, which also grows, would make the step two).
func rotate(clients []*client, ps []*caddyProc, n, conc int) *stats {
	s := newStats()
	forEach(clients, conc, func(c *client) {
		for range n {
			s.record(c, c.visit(ps[(c.id+len(c.trail))%len(ps)].URL))
		}
	})
	return s
}

// TestStoreRedisInstances: three instances share store redis, clients
// rotate among them on every visit: 300 clients x 10 visits, no session
// breaks. Then one instance is SIGKILLed mid-run, and Redis is stopped
// for 10 s and started empty.
func TestStoreRedisInstances(t *testing.T) {
	needCaddy(t)
	const nClients, conc = 300, 50

	t.Run("rotating", func(t *testing.T) {
		rd := testredis.Start(t)
		bs := startCookieBackends(t, 3, expressCookie)
		ps := redisInstances(t, 3, addrsOf(bs), rd.Addr)
		before := rd.Commands(t)
		clients := newClients(t, nClients)
		s := rotate(clients, ps, 10, conc)
		cmds := rd.Commands(t) - before
		expectClean(t, "store redis, 3 instances, 300 clients x 10 visits rotating", s)
		t.Logf("Redis session commands: %d for %d sessions x 10 visits = %.2f per session", cmds, nClients, float64(cmds)/nClients)
		if s.requests != nClients*10 {
			t.Errorf("%d requests, want %d", s.requests, nClients*10)
		}

		// Control: the same without a store breaks sessions.
		bs2 := startCookieBackends(t, 3, expressCookie)
		var ps2 []*caddyProc
		for i := range 3 {
			ps2 = append(ps2, startCaddySite(t, fmt.Sprintf("mem%d", i+1), learnSite(addrsOf(bs2), "affinity_learn", storePolicy("store memory"))))
		}
		control := rotate(newClients(t, 100), ps2, 5, conc)
		t.Logf("control, store memory, 3 instances, 100 clients x 5 visits rotating: %s", control)
		if control.broken == 0 {
			t.Error("no session broke without a shared store: the run above shows nothing")
		}
	})

	t.Run("sigkill", func(t *testing.T) {
		rd := testredis.Start(t)
		bs := startCookieBackends(t, 3, expressCookie)
		ps := redisInstances(t, 3, addrsOf(bs), rd.Addr)
		clients := newClients(t, nClients)
		s1 := rotate(clients, ps, 5, conc)
		_ = ps[2].run.cmd.Process.Kill()
		<-ps[2].run.exited
		s2 := rotate(clients, ps[:2], 5, conc)
		expectClean(t, "before the SIGKILL, 3 instances", s1)
		expectClean(t, "after one of 3 instances was SIGKILLed, the other 2", s2)
	})

	t.Run("redis-outage", func(t *testing.T) {
		rd := testredis.Start(t)
		bs := startCookieBackends(t, 3, expressCookie)
		ps := redisInstances(t, 3, addrsOf(bs), rd.Addr)
		clients := newClients(t, 150)
		s1 := rotate(clients, ps, 3, conc)
		rd.Stop()
		stopped := time.Now()
		s2 := rotate(clients, ps, 3, conc)
		more := newClients(t, 50) // sessions created while Redis is down
		s2b := rotate(more, ps, 3, conc)
		time.Sleep(time.Until(stopped.Add(10 * time.Second)))
		down := time.Since(stopped)
		rd.Run(t)
		// Every instance writes its live sessions back (it finds Redis
		// restarted within a second, then writes in the background):
		// the sessions learned during the outage, and those Redis lost.
		back := time.Now()
		waitUntil(t, "every instance to write its sessions back to Redis", 10*time.Second, 50*time.Millisecond, func() (bool, string) {
			n := 0
			for _, p := range ps {
				if strings.Contains(p.out.String(), "wrote this instance's live sessions back to redis") {
					n++
				}
			}
			return n == len(ps), fmt.Sprintf("%d of %d instances wrote back", n, len(ps))
		})
		took := time.Since(back)
		s3 := rotate(append(clients, more...), ps, 4, conc)
		t.Logf("before the outage: %s", s1)
		t.Logf("Redis down (%s): old sessions %s", down.Round(time.Second), s2)
		t.Logf("Redis down: sessions created meanwhile %s", s2b)
		t.Logf("Redis back, empty; every instance wrote back within %s of its start", took.Round(10*time.Millisecond))
		t.Logf("Redis back, empty, written back: %s", s3)
		// The sessions created during the outage broke then (an
		// instance that did not create one could not know it); once
		// written back, none breaks.
		if s3.broken != 0 {
			t.Errorf("%d sessions broke after Redis came back and the instances wrote back, want none", s3.broken)
		}
		failed := s1.failed + s2.failed + s2b.failed + s3.failed
		broken := s1.broken + s2.broken + s2b.broken + s3.broken
		t.Logf("redis outage of 10s: %d failed requests, %d broken sessions (of %d)", failed, broken, 200)
		if failed != 0 {
			t.Errorf("%d requests failed during or after the Redis outage, want none", failed)
		}
		for i, p := range ps {
			if n := strings.Count(p.out.String(), "the redis session store failed"); n > 3 {
				t.Errorf("instance %d logged the outage %d times, want it once (per outage)", i+1, n)
			}
		}
	})
}

// TestStoreRedisDrainSeenEverywhere: sessions created through one
// instance are counted by another that never saw them, so a drain
// watched from either says drained only once the sessions are gone.
func TestStoreRedisDrainSeenEverywhere(t *testing.T) {
	needCaddy(t)
	rd := testredis.Start(t)
	bs := startCookieBackends(t, 3, expressCookie)
	policy := storePolicy("store redis "+rd.Addr) + "\nsession_ttl 4s"
	one := startCaddySite(t, "drain1", learnSite(addrsOf(bs), "affinity_learn", policy))
	two := startCaddySite(t, "drain2", learnSite(addrsOf(bs), "affinity_learn", policy))

	clients := newClients(t, 30)
	s := visitAll(clients, one.URL, 2, 10)
	expectClean(t, "30 sessions through instance one", s)
	victim := backendNamed(bs, busiest(clients))
	onVictim := sessionsByWorker(clients)[victim.name]

	// Instance two has seen no request, yet counts them all.
	waitUntil(t, "instance two to count the sessions of instance one", 10*time.Second, 100*time.Millisecond, func() (bool, string) {
		total := int64(0)
		m := two.affinity(t)
		for _, b := range bs {
			total += m[b.addr].Sessions
		}
		return total == 30 && m[victim.addr].Sessions == int64(onVictim), fmt.Sprint(m)
	})
	start := time.Now()
	for _, p := range []*caddyProc{one, two} {
		if u := p.setState(t, victim.addr, "draining"); u.Drained {
			t.Fatalf("caddy %s says %s is drained while it holds %d sessions", p.name, victim.addr, onVictim)
		}
	}
	// Drained on both once the sessions expired (TTL 4s, counted until
	// Redis lets them go, a quarter later, read every second).
	for _, p := range []*caddyProc{one, two} {
		waitUntil(t, "caddy "+p.name+" to see the drain complete", 15*time.Second, 100*time.Millisecond, func() (bool, string) {
			u := p.affinity(t)[victim.addr]
			return u.Drained, u.String()
		})
	}
	took := time.Since(start)
	t.Logf("%s with %d sessions drained, as both instances see it, after %s (session_ttl 4s)", victim.name, onVictim, took.Round(100*time.Millisecond))
	if took < 2*time.Second {
		t.Errorf("drained after %s, before the sessions' TTL could pass", took)
	}
}

// firstVisits makes n first visits (no cookie: each a new session) to
// url, conc at a time, and returns how many failed.
func firstVisits(url string, n, conc int) int {
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: conc}}
	defer hc.CloseIdleConnections()
	var wg sync.WaitGroup
	var failed atomic.Int64
	next := make(chan struct{})
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				resp, err := hc.Get(url + "/")
				if err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				if err != nil || resp.StatusCode != http.StatusOK {
					failed.Add(1)
				}
			}
		}()
	}
	for range n {
		next <- struct{}{}
	}
	close(next)
	wg.Wait()
	return int(failed.Load())
}

// TestStoreRedisBalanceFactorCluster: balance_factor bounds the
// cluster-wide loads. Instance one first places 600 sessions on worker A
// alone (B and C draining there); then both instances place 900 new
// sessions each, at the same time, with balance_factor 1.05, at about
// 90 new sessions a second each (10 s). Instance two never saw the 600,
// but counts them through Redis: the workers end within 1.06 of the mean
// (with local counts alone A would end with none of the new sessions
// and B and C near 1.125 of the mean). Each instance knows the other's
// placements as of the last read of the counts (every second), so an
// upstream may get up to a second of the other instances' placements
// more than its bound: at 150 a second each, max/mean was 1.036-1.048;
// two instances placing thousands of sessions within one second see
// each other only after it (1.21 in a run that placed 1800 in 0.6 s).
func TestStoreRedisBalanceFactorCluster(t *testing.T) {
	needCaddy(t)
	const skew, half, conc = 600, 900, 8
	rd := testredis.Start(t)
	bs := startCookieBackends(t, 3, expressCookie)
	policy := storePolicy("store redis "+rd.Addr) + "\nbalance_factor 1.05"
	one := startCaddySite(t, "bf1", learnSite(addrsOf(bs), "affinity_learn", policy))
	two := startCaddySite(t, "bf2", learnSite(addrsOf(bs), "affinity_learn", policy))

	for _, b := range bs[1:] {
		one.setState(t, b.addr, "draining")
	}
	if n := firstVisits(one.URL, skew, conc); n != 0 {
		t.Fatalf("%d of %d first visits failed", n, skew)
	}
	for _, b := range bs[1:] {
		one.setState(t, b.addr, "up")
	}
	if got := bs[0].w.Sessions(); got != skew {
		t.Fatalf("worker A holds %d sessions after the skewed phase, want %d", got, skew)
	}
	// Instance two counts them (read every second).
	waitUntil(t, "instance two to count the 600 sessions on A", 10*time.Second, 100*time.Millisecond, func() (bool, string) {
		m := two.affinity(t)
		return m[bs[0].addr].Sessions == skew, fmt.Sprint(m)
	})

	start := time.Now()
	var wg sync.WaitGroup
	failed := make([]int, 2)
	for i, p := range []*caddyProc{one, two} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// 30 at a time, 0.3 s apart.
			for range half / 30 {
				failed[i] += firstVisits(p.URL, 30, conc/2)
				time.Sleep(300 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	if failed[0]+failed[1] != 0 {
		t.Fatalf("%v first visits failed", failed)
	}
	total, most := 0, 0
	var per []string
	for _, b := range bs {
		s := b.w.Sessions()
		total += s
		most = max(most, s)
		per = append(per, fmt.Sprintf("%s:%d", b.name, s))
	}
	ratio := float64(most) / (float64(total) / 3)
	t.Logf("balance_factor 1.05, store redis: %d sessions on A through instance one, then %d new sessions through each instance at once over %s: per worker %s, max/mean %.4f",
		skew, half, time.Since(start).Round(100*time.Millisecond), strings.Join(per, " "), ratio)
	if total != skew+2*half || ratio > 1.06 {
		t.Errorf("%d sessions in the workers (want %d), cluster-wide max/mean %.4f (want at most 1.06)", total, skew+2*half, ratio)
	}
}

// TestStoreRedisBusySessionOutlivesTTL (issue 15, fault 0): a session
// kept busy on one instance for 3.5 x session_ttl is still found by
// another that never saw it. Its shared entry used never to be written
// again after its first write: it expired at 1.25 x session_ttl however
// busy the session, and the other instance placed the session anew.
func TestStoreRedisBusySessionOutlivesTTL(t *testing.T) {
	needCaddy(t)
	rd := testredis.Start(t)
	bs := startCookieBackends(t, 3, expressCookie)
	policy := storePolicy("store redis "+rd.Addr) + "\nsession_ttl 2s"
	one := startCaddySite(t, "busy1", learnSite(addrsOf(bs), "affinity_learn", policy))
	two := startCaddySite(t, "busy2", learnSite(addrsOf(bs), "affinity_learn", policy))
	clients := newClients(t, 30)
	s := newStats()
	for end := time.Now().Add(7 * time.Second); time.Now().Before(end); {
		forEach(clients, 10, func(c *client) { s.record(c, c.visit(one.URL)) })
		time.Sleep(400 * time.Millisecond)
	}
	expectClean(t, "30 sessions busy on instance one for 3.5 x session_ttl", s)
	other := visitAll(clients, two.URL, 1, 10)
	t.Logf("then on instance two: %s", other)
	if other.broken != 0 || other.failed != 0 {
		t.Errorf("%d of 30 busy sessions broke on the instance that had not seen them (%d failed)", other.broken, other.failed)
	}
}

// TestStoreRedisBurstAlternating (issue 15, fault 4): a burst of 200 new
// sessions alternating between two instances, with the default timeout,
// breaks none, also while Redis stalls for 150 ms every 400 ms (CLIENT
// PAUSE: what a busy 2-core machine, a fork for a snapshot or a slow
// command does to a healthy Redis). At the former 50 ms default, 3 of 6
// runs broke 12-14 sessions without the stalls (slow answers while
// connections are dialled), silently; with them, every run breaks some.
func TestStoreRedisBurstAlternating(t *testing.T) {
	needCaddy(t)
	rd := testredis.Start(t)
	bs := startCookieBackends(t, 3, expressCookie)
	ps := redisInstances(t, 2, addrsOf(bs), rd.Addr)
	stalls := rd.Client()
	defer stalls.Close()
	for round := range 2 {
		done := make(chan struct{})
		var paused sync.WaitGroup
		paused.Add(1)
		go func() {
			defer paused.Done()
			tick := time.NewTicker(400 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-done:
					return
				case <-tick.C:
					_ = stalls.ClientPause(context.Background(), 150*time.Millisecond).Err()
				}
			}
		}()
		s := rotate(newClients(t, 200), ps, 4, 100)
		close(done)
		paused.Wait()
		t.Logf("round %d, 200 new clients x 4 visits alternating, 100 at a time: %s", round+1, s)
		expectClean(t, "a burst of 200 new sessions alternating between two instances", s)
	}
	for i, p := range ps {
		if n := strings.Count(p.out.String(), "redis lookup failed"); n != 0 {
			t.Errorf("instance %d logged %d failed lookups", i+1, n)
		}
	}
}

// TestStoreRedisSitesApart (issue 15, fault 8): two sites, each served
// by two instances (processes X and Y) sharing a Redis with the default
// key_prefix, and their users' keys are equal (the same X-User header on
// both sites). A reload removes worker C from site 1 on X only: its
// sessions on C fail over, and the moves X publishes must not move site
// 2's sessions on Y (17 of 17 of site 2's sessions on C broke when
// namespaces stopped at the process).
func TestStoreRedisSitesApart(t *testing.T) {
	needCaddy(t)
	rd := testredis.Start(t)
	bs := startCookieBackends(t, 3, expressCookie)
	site1 := addrsOf(bs)
	// Caddy names servers in the order of their sorted listeners, and
	// the server's name is part of the site's namespace: site 2's port
	// sorts after site 1's on both instances, as one Caddyfile deployed
	// on two machines would have it.
	renderWith := func(site1 *[]string) func(sitePort, adminPort int, storage string) string {
		site2Port := 0
		return func(sitePort, adminPort int, storage string) string {
			for site2Port <= sitePort {
				site2Port = freePort(t)
			}
			site := func(port int, ups []string) string {
				return fmt.Sprintf(`
http://127.0.0.1:%d {
	bind 127.0.0.1
	reverse_proxy %s {
		lb_policy affinity {
			key header X-User
			pin_cookie off
			store redis %s
		}
		lb_retries 2
		lb_try_duration 3s
	}
}
`, port, strings.Join(ups, " "), rd.Addr)
			}
			return globalOptions(adminPort, storage, "") + site(sitePort, *site1) + site(site2Port, addrsOf(bs))
		}
	}
	all := addrsOf(bs)
	renderX := renderWith(&site1)
	x := startCaddySite(t, "sitesX", renderX)
	y := startCaddySite(t, "sitesY", renderWith(&all))
	site2Y := fmt.Sprintf("http://127.0.0.1:%d", site2PortOf(t, y))
	const n = 60
	users1, users2 := newClients(t, n), newClients(t, n)
	visit := func(c *client, base string, user int) visitResult {
		var cookies []string
		for _, ck := range c.jar.Cookies(mustURL(t, base+"/")) {
			cookies = append(cookies, ck.Name+"="+ck.Value)
		}
		return c.visitWith(base, strings.Join(cookies, "; "), http.Header{"X-User": {fmt.Sprintf("user-%d", user)}})
	}
	phase := func(clients []*client, base string) *stats {
		s := newStats()
		forEach(clients, 10, func(c *client) {
			for range 2 {
				s.record(c, visit(c, base, c.id%n))
			}
		})
		return s
	}
	expectClean(t, "site 2 on Y, 60 users", phase(users2, site2Y))
	expectClean(t, "site 1 on X, the same 60 users", phase(users1, x.URL))
	onC := 0
	for _, c := range users2 {
		if c.worker == "C" {
			onC++
		}
	}
	// Site 1 loses C on X.
	site1 = site1[:2]
	if err := os.WriteFile(x.File, []byte(renderX(mustPort(t, x.URL), mustPort(t, x.Admin), filepath.Join(x.dir, "storage"))), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(caddyBin, "reload", "--force", "--config", x.File, "--adapter", "caddyfile", "--address", strings.TrimPrefix(x.Admin, "http://"))
	cmd.Dir, cmd.Env = x.dir, isolatedEnv(x.dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("caddy reload: %v\n%s", err, out)
	}
	s1 := phase(users1, x.URL)
	t.Logf("site 1 on X after the reload that removed C: %s", s1)
	if s1.moved == 0 {
		t.Fatal("no session of site 1 moved: the run shows nothing")
	}
	time.Sleep(300 * time.Millisecond) // the moves published reach every subscriber
	s2 := phase(users2, site2Y)
	t.Logf("site 2 on Y (%d sessions on C) after site 1's moves: %s", onC, s2)
	if onC == 0 {
		t.Fatal("no session of site 2 on C: the run shows nothing")
	}
	if s2.broken != 0 || s2.failed != 0 {
		t.Errorf("%d of site 2's sessions broke (%d failed) when site 1 moved its own", s2.broken, s2.failed)
	}
}

// site2PortOf returns the port of the second site of a Caddyfile.
func site2PortOf(t *testing.T, p *caddyProc) int {
	t.Helper()
	blocks := strings.Split(p.Config, "http://127.0.0.1:")
	if len(blocks) < 3 {
		t.Fatalf("no second site in %s", p.Config)
	}
	port, err := strconv.Atoi(blocks[2][:strings.Index(blocks[2], " ")])
	if err != nil {
		t.Fatal(err)
	}
	return port
}

func mustURL(t *testing.T, raw string) *url.URL {
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func mustPort(t *testing.T, raw string) int {
	n, err := strconv.Atoi(mustURL(t, raw).Port())
	if err != nil {
		t.Fatal(err)
	}
	return n
}

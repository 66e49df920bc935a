package tests

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddy-affinity/caddy-affinity/internal/testredis"
)

// redisKeyTTLs returns every key in Redis but the store's one run id
// (<key_prefix>:run, documented as kept) with its PTTL in ms.
func redisKeyTTLs(t *testing.T, rd *testredis.Server) map[string]int64 {
	t.Helper()
	c := rd.Client()
	defer c.Close()
	ctx := context.Background()
	out := map[string]int64{}
	iter := c.Scan(ctx, 0, "*", 1000).Iterator()
	for iter.Next(ctx) {
		k := iter.Val()
		if strings.HasSuffix(k, ":run") {
			continue
		}
		ms, err := c.Do(ctx, "PTTL", k).Int64()
		if err != nil {
			t.Fatalf("PTTL %s: %v", k, err)
		}
		out[k] = ms
	}
	if err := iter.Err(); err != nil {
		t.Fatalf("SCAN: %v", err)
	}
	return out
}

// expectAllTTL fails when a key in ttls has none (PTTL -1).
func expectAllTTL(t *testing.T, when string, ttls map[string]int64) {
	t.Helper()
	var none []string
	for k, ms := range ttls {
		if ms == -1 {
			none = append(none, fmt.Sprintf("%q", k))
		}
	}
	t.Logf("%s: %d keys in Redis, %d without a TTL", when, len(ttls), len(none))
	if len(ttls) == 0 {
		t.Errorf("%s: no key in Redis: the check shows nothing", when)
	}
	if len(none) > 0 {
		t.Errorf("%s: %d of %d keys have no TTL: %s", when, len(none), len(ttls), strings.Join(none, " "))
	}
}

// pollUntil is waitUntil that goes on: it reports with t.Errorf when
// cond does not hold within max, so that the phases after it still run
// (and show what else a fault breaks).
func pollUntil(t *testing.T, what string, max time.Duration, cond func() (bool, string)) (time.Duration, bool) {
	t.Helper()
	start := time.Now()
	for {
		ok, seen := cond()
		if ok {
			return time.Since(start), true
		}
		if time.Since(start) > max {
			t.Errorf("%s: not within %s; last seen: %s", what, max, seen)
			return time.Since(start), false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestStoreRedisDynamicUpstreams (issue 15, fault 2): with `dynamic a`
// upstreams the cluster features of store redis work as with static
// ones. The farm used to read upstreams from the static config, empty
// for a dynamic source: another instance showed only its local
// `sessions`, and after Redis lost its data nothing was written back
// (and the per-upstream sets of the former layout were never pruned).
// Two instances, 3 workers from the test's DNS server, learn mode,
// session_ttl 4s: instance two counts what instance one placed; every
// key has a TTL, also those written back; after FLUSHALL the sessions are
// written back and none breaks across the instances; once the sessions
// expired Redis empties.
func TestStoreRedisDynamicUpstreams(t *testing.T) {
	needCaddy(t)
	rd := testredis.Start(t)
	bs, port := startDynamicBackends(t, 3)
	dns := startDNS(t, ipsOf(bs)...)
	policy := "key cookie " + appCookie + "\npin_cookie off\nstore redis " + rd.Addr + "\nsession_ttl 4s"
	one := startCaddySite(t, "dynredis1", dynamicSiteWith(dns, port, "affinity_learn", policy))
	two := startCaddySite(t, "dynredis2", dynamicSiteWith(dns, port, "affinity_learn", policy))
	ps := []*caddyProc{one, two}

	// One client on instance two, so that it has seen its dynamic pool;
	// the others through instance one only.
	warm := newClients(t, 1)
	expectClean(t, "one client through instance two", visitAll(warm, two.URL, 2, 1))
	clients := newClients(t, 40)
	expectClean(t, "40 clients through instance one", visitAll(clients, one.URL, 2, 10))
	if t.Failed() {
		t.FailNow()
	}
	all := append(append([]*client(nil), clients...), warm...)
	perWorker := sessionsByWorker(all)
	// (1) Instance two counts the cluster's sessions per upstream.
	counted := func(p *caddyProc) (bool, string) {
		m, err := fetchAffinity(p.Admin)
		if err != nil {
			return false, err.Error()
		}
		ok := true
		var seen []string
		for _, b := range bs {
			seen = append(seen, fmt.Sprintf("%s:%d", b.name, m[b.addr].Sessions))
			ok = ok && m[b.addr].Sessions == int64(perWorker[b.name])
		}
		return ok, fmt.Sprintf("sessions %s, want %s", strings.Join(seen, " "), sortedMap(perWorker))
	}
	took, ok := pollUntil(t, "instance two to count the sessions of instance one", 3*time.Second,
		func() (bool, string) { return counted(two) })
	if ok {
		t.Logf("instance two counted %s (41 sessions, 40 placed by instance one) within %s", sortedMap(perWorker), took.Round(10*time.Millisecond))
	}

	// (2) Every key the store wrote has a TTL.
	before := redisKeyTTLs(t, rd)
	expectAllTTL(t, "after 41 sessions", before)

	// (3) Redis loses its data: both instances write back, and clients
	// alternating between them keep their workers. A visit of every
	// client first: the warm client's session was last used before the
	// 40 clients' visits, and with session_ttl 4s it would expire before
	// its visit after the flush on a slow machine (placed anew: broken).
	expectClean(t, "41 clients x 1 visit alternating instances, before the flush", rotate(all, ps, 1, 10))
	c := rd.Client()
	defer c.Close()
	flushAt := []int{len(one.out.String()), len(two.out.String())}
	if err := c.FlushAll(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	flushed := time.Now()
	if _, ok := pollUntil(t, "both instances to write their live sessions back", 5*time.Second, func() (bool, string) {
		n := 0
		for i, p := range ps {
			n += min(1, p.logLines(flushAt[i], "wrote this instance's live sessions back to redis"))
		}
		return n == len(ps), fmt.Sprintf("%d of %d instances wrote back", n, len(ps))
	}); ok {
		t.Logf("after FLUSHALL both instances wrote back within %s", time.Since(flushed).Round(10*time.Millisecond))
	}
	expectAllTTL(t, "after the write back", redisKeyTTLs(t, rd))
	s := rotate(all, ps, 2, 10)
	t.Logf("after the flush, 41 clients x 2 visits alternating instances: %s", s)
	if s.broken != 0 || s.failed != 0 {
		t.Errorf("after the flush and write back: %d broken, %d failed visits, want none:%s", s.broken, s.failed, s.samplesText())
	}
	perWorker = sessionsByWorker(all)
	for _, p := range ps {
		pollUntil(t, "caddy "+p.name+" to count the sessions again after the flush", 3*time.Second,
			func() (bool, string) { return counted(p) })
	}
	peak := len(redisKeyTTLs(t, rd))

	// (4) Nothing outlives its sessions: once they expired (4 s),
	// Redis holds at most a few keys of the prefix (their generations'
	// TTLs pass: at most three session_ttl plus a second).
	idle := time.Now()
	var left map[string]int64
	waitUntil(t, "Redis to let the expired sessions go", 16*time.Second, 250*time.Millisecond, func() (bool, string) {
		left = redisKeyTTLs(t, rd)
		return len(left) <= 2, fmt.Sprintf("%d keys: %v", len(left), left)
	})
	t.Logf("FIGURES | store redis, dynamic a, 2 instances | keys %d at the peak, %d %s after the last visit (session_ttl 4s) | broken after FLUSHALL %d |",
		peak, len(left), time.Since(idle).Round(100*time.Millisecond), s.broken)
	for _, p := range ps {
		waitUntil(t, "caddy "+p.name+" to count no session once they expired", 3*time.Second, 100*time.Millisecond, func() (bool, string) {
			m, err := fetchAffinity(p.Admin)
			if err != nil {
				return false, err.Error()
			}
			n := int64(0)
			for _, b := range bs {
				n += m[b.addr].Sessions
			}
			return n == 0, fmt.Sprint(m)
		})
	}
}

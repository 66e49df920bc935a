package affinity

import (
	"fmt"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// siteOf wraps a policy and its pool as the farm walker would find them.
func siteOf(p *Policy, pool reverseproxy.UpstreamPool) Site {
	return Site{
		Server:  "srv0",
		Path:    "/config/apps/http/servers/srv0/routes/0/handle/0",
		Handler: &reverseproxy.Handler{Upstreams: pool},
		Policy:  p,
	}
}

// TestLookupAgreesWithSelect asks the lookup where a session goes, then
// sends the same request through Select, in every lifecycle situation a
// session meets: new, pinned by the table, its upstream draining, in
// maintenance, back up.
func TestLookupAgreesWithSelect(t *testing.T) {
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}})
	pool := testPool(t, 3)
	site := siteOf(p, pool)

	check := func(step, sid, wantDecision string) string {
		t.Helper()
		got := Explain(site, "cookie", "sid", sid, time.Now())
		if got.Error != "" {
			t.Fatalf("%s: lookup error: %s", step, got.Error)
		}
		if got.Decision != wantDecision {
			t.Fatalf("%s: decision %q, want %q (%s)", step, got.Decision, wantDecision, got.Reason)
		}
		up := p.Select(pool, newRequest("sid="+sid), httptest.NewRecorder())
		if got.Upstream == nil || up == nil || *got.Upstream != up.Dial {
			t.Fatalf("%s: lookup says %v, Select chose %v (%s)", step, got.Upstream, up, got.Reason)
		}
		if got.RingOwner == "" || len(got.Walk) == 0 && got.Decision == DecidedRing {
			t.Fatalf("%s: no ring owner or walk: %+v", step, got)
		}
		return up.Dial
	}

	home := check("new session", "abc", DecidedRing)
	if got := check("returning session", "abc", DecidedTable); got != home {
		t.Fatalf("returning session moved from %s to %s", home, got)
	}
	setState(t, home, healthcheck.Draining)
	check("draining keeps it", "abc", DecidedTable)
	for i := range 20 {
		// New sessions walk past the draining upstream.
		sid := fmt.Sprintf("new-%d", i)
		res := Explain(site, "cookie", "sid", sid, time.Now())
		if *res.Upstream == home {
			t.Fatalf("new session %s placed on draining %s", sid, home)
		}
		check("new while draining", sid, DecidedRing)
	}
	operate(t, home, healthcheck.Maintenance)
	moved := check("maintenance moves it", "abc", DecidedFailover)
	operate(t, home, healthcheck.Up)
	if got := check("stays after recovery", "abc", DecidedTable); got != moved {
		t.Fatalf("session went back to %s after recovery, want it on %s", got, moved)
	}
}

// TestLookupWalkExplainsSkips checks the walk's reasons.
func TestLookupWalkExplainsSkips(t *testing.T) {
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "header", Name: "X-Session"}}})
	pool := testPool(t, 3)
	site := siteOf(p, pool)
	// Find a key whose owner we then take out of service.
	res := Explain(site, "header", "x-session", "k1", time.Now())
	if res.Decision != DecidedRing || res.RingOwner == "" {
		t.Fatalf("fresh key: %+v", res)
	}
	setState(t, res.RingOwner, healthcheck.Maintenance)
	res2 := Explain(site, "", "", "k1", time.Now())
	if res2.Key != "header X-Session" {
		t.Fatalf("default key is %q", res2.Key)
	}
	if len(res2.Walk) < 2 || res2.Walk[0].Upstream != res.RingOwner || res2.Walk[0].Skipped != "maintenance" || !res2.Walk[len(res2.Walk)-1].Chosen {
		t.Fatalf("walk does not show the owner skipped for maintenance: %+v", res2.Walk)
	}
	if res2.Upstream == nil || *res2.Upstream == res.RingOwner {
		t.Fatalf("placed on the owner in maintenance: %+v", res2)
	}
}

// explainedWalk walks the ring from key as a placement does, and returns
// the choice the explanation of that walk shows next to the walk's own.
func explainedWalk(p *Policy, ps *poolState, key uint64, now time.Time) (explained, placed int, out Explanation) {
	d := decision{chosen: -1}
	placed, d.fallback, _ = ps.Walk(p.placementRules(), p.sessions, key, -1, now, &d.walk)
	d.chosen = placed
	p.explainWalk(ps, &d, now, &out)
	explained = -1
	for _, step := range out.Walk {
		if step.Chosen {
			if explained >= 0 {
				panic("two upstreams chosen")
			}
			for i, u := range ps.Ups {
				if u.Dial == step.Upstream {
					explained = i
				}
			}
		}
	}
	return explained, placed, out
}

// TestExplainWalkMatchesPlace compares the lookup's walk with the
// policy's own placement for many keys, with upstreams draining, in
// maintenance and ramping up under slow_start.
func TestExplainWalkMatchesPlace(t *testing.T) {
	p := newTestPolicy(t, &Policy{
		Keys:      []keys.Source{{From: "cookie", Name: "sid"}},
		SlowStart: caddy.Duration(time.Minute),
		Weights:   []int{1, 2, 1, 3, 1},
	})
	pool := testPool(t, 5)
	ps := p.poolState(pool)
	setState(t, pool[1].Dial, healthcheck.Draining)
	setState(t, pool[2].Dial, healthcheck.Maintenance)
	healthcheck.Get(pool[3].Dial).MarkBack(time.Now().Add(-20 * time.Second))
	t.Cleanup(func() { healthcheck.Get(pool[3].Dial).MarkBack(time.Now().Add(-time.Hour)) })
	now := time.Now()
	reasons := map[string]int{}
	for k := range uint64(2000) {
		key := k * 0x9E3779B97F4A7C15
		got, want, out := explainedWalk(p, ps, key, now)
		if got != want {
			t.Fatalf("key %x: explainWalk chose %d, place %d; walk %+v", key, got, want, out.Walk)
		}
		for _, step := range out.Walk {
			reason, _, _ := strings.Cut(step.Skipped, ":")
			reasons[reason]++
		}
	}
	for _, want := range []string{"draining", "maintenance", "slow start"} {
		if reasons[want] == 0 {
			t.Errorf("no walk skipped an upstream for %q: %v", want, reasons)
		}
	}
}

// TestExplainWalkMatchesPlaceUnderLoadBound does the same with
// balance_factor, with uneven loads in the session table.
func TestExplainWalkMatchesPlaceUnderLoadBound(t *testing.T) {
	p := newTestPolicy(t, &Policy{
		Keys:          []keys.Source{{From: "cookie", Name: "sid"}},
		BalanceFactor: 1.25,
	})
	pool := testPool(t, 4)
	ps := p.poolState(pool)
	// Sessions on every upstream, more on the first ones.
	for i, u := range pool {
		for j := range 40 - 8*i {
			p.table.Put(uint64(i)<<32|uint64(j)+1, ps.Recs[ps.index(u)].ID, sessions.Now(), p.ttl)
		}
	}
	skipped := 0
	now := time.Now()
	for k := range uint64(2000) {
		key := k*0x9E3779B97F4A7C15 + 7
		got, want, out := explainedWalk(p, ps, key, now)
		if got != want {
			t.Fatalf("key %x: explainWalk chose %d, place %d; walk %+v", key, got, want, out.Walk)
		}
		if len(out.Walk) > 0 && strings.HasPrefix(out.Walk[0].Skipped, "balance_factor") {
			skipped++
		}
	}
	if skipped == 0 {
		t.Fatal("no key walked past an upstream at its load bound: the test tests nothing")
	}
}

// TestLookupPin looks up a pin cookie value.
func TestLookupPin(t *testing.T) {
	p := newTestPolicy(t, &Policy{NoDefaultKeys: true})
	pool := testPool(t, 3)
	site := siteOf(p, pool)
	w := httptest.NewRecorder()
	up := p.Select(pool, newRequest(), w)
	pin := strings.TrimPrefix(pinFrom(t, w, DefaultPinCookie), DefaultPinCookie+"=")
	res := Explain(site, "pin", "", pin, time.Now())
	if res.Decision != DecidedPin || res.Upstream == nil || *res.Upstream != up.Dial {
		t.Fatalf("pin lookup: %+v, want %s", res, up.Dial)
	}
	res = Explain(site, "pin", "", "forged"+pin[6:], time.Now())
	if res.Decision != DecidedRandom || res.Upstream != nil {
		t.Fatalf("forged pin lookup: %+v", res)
	}
	setState(t, up.Dial, healthcheck.Maintenance)
	res = Explain(site, "pin", "", pin, time.Now())
	if res.Decision != DecidedFailover || !strings.Contains(res.Reason, "maintenance") {
		t.Fatalf("pin to maintenance: %+v", res)
	}
	// No key to look up by.
	if res := Explain(site, "cookie", "", "x", time.Now()); !strings.Contains(res.Error, "no session key") {
		t.Fatalf("keyless policy, cookie lookup: %+v", res)
	}
}

// TestLookupErrors covers the per-policy errors.
func TestLookupErrors(t *testing.T) {
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}, {From: "client_ip"}}})
	site := siteOf(p, testPool(t, 2))
	res := Explain(site, "query", "q", "x", time.Now())
	if !strings.Contains(res.Error, "cookie sid, client_ip /32 /64") {
		t.Fatalf("unknown key: %q", res.Error)
	}
	if res := Explain(site, "client_ip", "", "not-an-ip", time.Now()); !strings.Contains(res.Error, "not an IP address") {
		t.Fatalf("bad IP: %q", res.Error)
	}
	if res := Explain(site, "client_ip", "", "2001:db8::1", time.Now()); res.Error != "" || res.Decision != DecidedRing {
		t.Fatalf("IPv6 client: %+v", res)
	}

}

package tests

import (
	"fmt"
	"testing"
	"time"
)

// TestMetrics: the policy's Prometheus metrics are on the admin API's
// /metrics of a real Caddy (no `metrics` option needed: the policy
// registers them into the config's registry, which that endpoint
// serves), and they move with the traffic: placements for new sessions,
// pinned selections for returning ones, live sessions per upstream after
// the sweep, the lifecycle state, and rejected pins for forged cookies.
func TestMetrics(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	p := startCaddy(t, "metrics", proxyConfig{
		Upstreams: addrsOf(bs),
		Policy:    "key cookie " + appCookie,
	})

	const (
		selections = "caddy_affinity_selections_total"
		rejected   = "caddy_affinity_rejected_pins_total"
		sessions   = "caddy_affinity_sessions"
		state      = "caddy_affinity_upstream_state"
		entries    = "caddy_affinity_session_table_entries"
		evictions  = "caddy_affinity_session_table_evictions_total"
	)
	before := obsScrape(t, p)
	for name, typ := range map[string]string{
		selections: "counter", rejected: "counter", sessions: "gauge",
		state: "gauge", entries: "gauge", evictions: "counter",
	} {
		if got := before.typed[name]; got != typ {
			t.Errorf("/metrics: %s has TYPE %q, want %q", name, got, typ)
		}
	}
	for _, b := range bs {
		if v := before.get(t, state, fmt.Sprintf(`upstream=%q`, b.addr)); v != 0 {
			t.Errorf("%s: state %v before any change, want 0 (up)", b.addr, v)
		}
	}

	// 12 new sessions, then 3 returning visits each.
	clients := newClients(t, 12)
	expectClean(t, "first visits", visitAll(clients, p.URL, 1, 6))
	mid := obsScrape(t, p)
	placed := mid.get(t, selections, `outcome="placed"`) - before.get(t, selections, `outcome="placed"`)
	if placed < 12 {
		t.Errorf("placed grew by %v for 12 new sessions", placed)
	}
	expectClean(t, "returning visits", visitAll(clients, p.URL, 3, 6))
	after := obsScrape(t, p)
	pinned := after.get(t, selections, `outcome="pinned"`) - mid.get(t, selections, `outcome="pinned"`)
	if pinned < 36 {
		t.Errorf("pinned grew by %v for 36 returning visits", pinned)
	}
	if v := after.get(t, entries); v < 12 {
		t.Errorf("%s = %v with 12 live sessions", entries, v)
	}
	if _, ok := after.sum(evictions); !ok {
		t.Errorf("no %s", evictions)
	}

	// The live session gauges are read from the table at the scrape:
	// they add up to the sessions, on the workers that hold them.
	want := map[string]int{}
	for _, c := range clients {
		want[backendNamed(bs, c.worker).addr]++
	}
	obsEventually(t, "session gauges match the sessions", 6*time.Second, func() (bool, string) {
		m := obsScrape(t, p)
		seen := ""
		ok := true
		for _, b := range bs {
			v, _ := m.sum(sessions, fmt.Sprintf(`upstream=%q`, b.addr))
			seen += fmt.Sprintf("%s=%v(want %d) ", b.name, v, want[b.addr])
			ok = ok && int(v) == want[b.addr]
		}
		return ok, seen
	})

	// Draining shows as state 1.
	obsSetState(t, p, bs[0].addr, "draining")
	if v := obsScrape(t, p).get(t, state, fmt.Sprintf(`upstream=%q`, bs[0].addr)); v != 1 {
		t.Errorf("draining upstream has state %v, want 1", v)
	}
	obsSetState(t, p, bs[0].addr, "up")

	// Forged pins: counted, and the requests still served.
	rej := after.get(t, rejected)
	c := newClient(t)
	for i, forged := range []string{"AAAAAAAAAAAAAAAAAAAAAAAA", "not-a-pin", "zzzzzzzzzzzzzzzzzzzzzzzz"} {
		if r := c.visitWith(p.URL, pinCookie+"="+forged, nil); r.failed() {
			t.Fatalf("forged pin %d: %s", i, r)
		}
	}
	if got := obsScrape(t, p).get(t, rejected) - rej; got != 3 {
		t.Errorf("%s grew by %v for 3 forged pins, want 3", rejected, got)
	}
}

package healthcheck

import (
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
)

func TestVerdicts(t *testing.T) {
	in := newInstance(t, "a")
	cu := &reverseproxy.Upstream{Host: new(reverseproxy.Host), Dial: "10.0.0.1:80"}
	u := in.reg.get(cu.Dial)
	for _, tc := range []struct {
		state           State
		pinned, fresh   Verdict
		pinnedW, freshW string
	}{
		{Up, Serves, Serves, "serves", "serves"},
		{Draining, Serves, NoNewSessions, "serves", "draining"},
		{Maintenance, InMaintenance, InMaintenance, "maintenance", "maintenance"},
	} {
		in.reg.operate(u, tc.state)
		if p, n := u.ForPinned(cu), u.ForNew(cu); p != tc.pinned || n != tc.fresh || p.String() != tc.pinnedW || n.String() != tc.freshW {
			t.Errorf("%s: pinned %s, new %s; want %s, %s", tc.state, p, n, tc.pinned, tc.fresh)
		}
	}
	// Caddy's own verdicts (down, full) need its health checks running;
	// the integration tests cover them. Their words:
	if Full.String() != "full: at max_requests" || Failed.String() == "" || Down.String() != "down: Caddy's health checks" {
		t.Errorf("words: %q %q", Failed, Down)
	}
}

func TestObserveStartsSlowStartOnlyForUpstreamsThatCameBack(t *testing.T) {
	in := newInstance(t, "a")
	a := &reverseproxy.Upstream{Host: new(reverseproxy.Host), Dial: "10.0.0.1:80"}
	b := &reverseproxy.Upstream{Host: new(reverseproxy.Host), Dial: "10.0.0.2:80"}
	t0 := time.Now()
	// The config the process starts with is not new.
	in.reg.observe([]*reverseproxy.Upstream{a}, t0)
	ua := in.reg.lookup(a.Dial)
	if ua.BackFor(t0) < time.Hour {
		t.Fatalf("an upstream of the first config is ramping (back for %s)", ua.BackFor(t0))
	}
	if ua.caddy.Load() != a || !ua.Healthy() {
		t.Fatal("the first look does not track Caddy's upstream")
	}
	// Draining, then up again: it came back.
	in.reg.operate(ua, Draining)
	in.reg.observe([]*reverseproxy.Upstream{a}, t0.Add(time.Second))
	in.reg.operate(ua, Up)
	in.reg.observe([]*reverseproxy.Upstream{a}, t0.Add(2*time.Second))
	if got := ua.BackFor(t0.Add(3 * time.Second)); got != time.Second {
		t.Fatalf("back for %s after returning to up, want 1s", got)
	}
	// An upstream added after the first look is new.
	in.reg.observe([]*reverseproxy.Upstream{a, b}, t0.Add(5*time.Second))
	if got := in.reg.lookup(b.Dial).BackFor(t0.Add(6 * time.Second)); got != time.Second {
		t.Fatalf("an added upstream is back for %s, want 1s", got)
	}
}

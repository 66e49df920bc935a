package affinity

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// One session id under two keys (JSESSIONID=X and ;jsessionid=X, routine
// on Tomcat's first pages) is one session: counted once, its entry not
// turned into an alias (which counted as no session at all).
func TestOneIDUnderTwoKeysIsCounted(t *testing.T) {
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "JSESSIONID"}, {From: "path_param", Name: "jsessionid"}}})
	pool := testPool(t, 3)
	r := newRequest("JSESSIONID=ABC123")
	r.URL.Path = "/shop;jsessionid=ABC123"
	up := p.Select(pool, r, nil)
	id := healthcheck.Get(up.Dial).ID
	if n := p.table.LiveCount(id); n != 1 {
		t.Fatalf("the session counts %d on its upstream, want 1", n)
	}
	if e, ok := p.table.Peek(sessionIDHash("ABC123"), sessions.Now()); !ok || e.Alias() {
		t.Fatalf("the session's entry is %+v (found %v), want a main entry", e, ok)
	}
}

// retryRequest is a request on its retry after an attempt on prev failed.
func retryRequest(prev *reverseproxy.Upstream, cookies ...string) *http.Request {
	r := newRequest(cookies...)
	caddyhttp.SetVar(r.Context(), triedVar, prev)
	return r
}

// A retry goes back to the upstream that failed when it is the only one
// that may take the request, as Caddy's own policies do; it returned no
// upstream at all before, a 502 instead of a retry within lb_try_duration.
func TestRetryMayGoBackToTheOnlyUpstream(t *testing.T) {
	p := newTestPolicy(t, &Policy{})
	single := testPool(t, 1)
	if got := p.Select(single, retryRequest(single[0]), nil); got != single[0] {
		t.Fatalf("single upstream, retry: got %v, want it again", got)
	}
	// Mid rolling deploy: the others drain; a new session's retry goes
	// back to the one that is up, and never to a draining one.
	pool := testPool(t, 3)
	setState(t, pool[1].Dial, healthcheck.Draining)
	setState(t, pool[2].Dial, healthcheck.Draining)
	if got := p.Select(pool, retryRequest(pool[0]), nil); got != pool[0] {
		t.Fatalf("others draining, retry: got %v, want %s", got, pool[0].Dial)
	}
	// A session pinned to a draining upstream whose attempt failed may
	// retry there: draining keeps its sessions.
	w := httptest.NewRecorder()
	setState(t, pool[0].Dial, healthcheck.Maintenance)
	home := p.Select(pool, newRequest(), w)
	if home != nil {
		t.Fatalf("a new session was placed on %s with every upstream draining or in maintenance", home.Dial)
	}
	setState(t, pool[0].Dial, healthcheck.Up)
	home = p.Select(pool, newRequest(), w)
	setState(t, pool[0].Dial, healthcheck.Draining)
	if got := p.Select(pool, retryRequest(home, pinFrom(t, w, DefaultPinCookie)), nil); got != home {
		t.Fatalf("pinned to a draining upstream, retry: got %v, want %s", got, home.Dial)
	}
}

// Behind one address, with the client IP as a fallback key next to the
// app's cookie, affinity_learn and balance_factor, new sessions spread
// under the load bound: the address does not pin a request that carries
// no app session yet. Before, all of them landed on the address's ring
// owner (max/mean 3.0).
func TestClientIPFallbackDoesNotTrapOneAddress(t *testing.T) {
	p := newTestPolicy(t, &Policy{
		Keys:             []keys.Source{{From: "cookie", Name: "connect.sid"}, {From: "client_ip"}},
		BalanceFactor:    1.05,
		DisablePinCookie: true,
	})
	pool := testPool(t, 3)
	counts := map[string]int{}
	const n = 3000
	for i := range n {
		r := httptest.NewRequest(http.MethodGet, "http://example.com/", nil)
		r.RemoteAddr = "198.51.100.7:1234"
		r = r.WithContext(context.WithValue(r.Context(), caddyhttp.VarsCtxKey, map[string]any{}))
		lw := &learnWriter{ResponseWriterWrapper: &caddyhttp.ResponseWriterWrapper{ResponseWriter: httptest.NewRecorder()}, r: r}
		caddyhttp.SetVar(r.Context(), learnVar, lw)
		up := p.Select(pool, r, nil)
		if up == nil {
			t.Fatal("no upstream")
		}
		counts[up.Dial]++
		// The app answers with its new session cookie; the learner
		// records it for the upstream that served it.
		h := http.Header{"Set-Cookie": {fmt.Sprintf("connect.sid=s%d; Path=/; HttpOnly", i)}}
		lw.policy.learn(h, r, lw.up, nil)
	}
	most := 0
	for _, c := range counts {
		most = max(most, c)
	}
	if ratio := float64(most) / (n / 3.0); ratio > 1.06 || len(counts) != 3 {
		t.Fatalf("new sessions behind one address: %v, max/mean %.3f, want <= 1.06", counts, ratio)
	} else {
		t.Logf("max/mean %.3f: %v", ratio, counts)
	}
}

// Policies keep their entries apart: a request to another proxy with the
// same key (the same client address) does not overwrite a session; before,
// the process-wide table was one namespace and it moved the session.
// Proxies given the same scope share their entries.
func TestScopesKeepProxiesApart(t *testing.T) {
	keys := []keys.Source{{From: "client_ip"}}
	a := newTestPolicy(t, &Policy{Keys: keys, DisablePinCookie: true, Scope: "site-a"})
	b := newTestPolicy(t, &Policy{Keys: keys, DisablePinCookie: true, Scope: "site-b"})
	shared := newTestPolicy(t, &Policy{Keys: keys, DisablePinCookie: true, Scope: "site-a"})
	poolA := testPool(t, 3)
	var poolB reverseproxy.UpstreamPool
	for i := range 3 {
		poolB = append(poolB, &reverseproxy.Upstream{Host: new(reverseproxy.Host), Dial: fmt.Sprintf("%s-b%d:80", t.Name(), i)})
	}
	fromAddr := func(i int) *http.Request {
		r := newRequest()
		r.RemoteAddr = fmt.Sprintf("192.0.2.%d:1234", i)
		return r
	}
	// Sessions that are not on their ring owner (placed while it was in
	// maintenance): only their entries keep them where they are.
	home := map[int]string{}
	operate(t, poolA[0].Dial, healthcheck.Maintenance)
	for i := range 100 {
		home[i] = a.Select(poolA, fromAddr(i), nil).Dial
	}
	operate(t, poolA[0].Dial, healthcheck.Up)
	for i := range 100 {
		b.Select(poolB, fromAddr(i), nil)
	}
	for i := range 100 {
		if got := a.Select(poolA, fromAddr(i), nil).Dial; got != home[i] {
			t.Fatalf("client %d moved from %s to %s after a request to another proxy", i, home[i], got)
		}
	}
	// The same scope is one namespace: the other proxy follows the
	// entries.
	for i := range 100 {
		if got := shared.Select(poolA, fromAddr(i), nil).Dial; got != home[i] {
			t.Fatalf("a proxy of the same scope sent client %d to %s, want %s", i, got, home[i])
		}
	}
}

// Entries written in the shared namespace, before a policy could resolve
// its scope (the moment of a reload), are found and moved into its own,
// counted once.
func TestScopeFindsEntriesWrittenBeforeIt(t *testing.T) {
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "header", Name: "X-Sid"}}, DisablePinCookie: true})
	pool := testPool(t, 3)
	req := func() *http.Request {
		r := newRequest()
		r.Header.Set("X-Sid", "early")
		return r
	}
	home := p.Select(pool, req(), nil) // unresolved: the shared namespace
	p.sessions.SetScope(scopeHash("scope", "late"))
	id := healthcheck.Get(home.Dial).ID
	for range 5 {
		if got := p.Select(pool, req(), nil); got != home {
			t.Fatalf("session went to %s, want %s", got.Dial, home.Dial)
		}
	}
	if n := p.table.LiveCount(id); n != 1 {
		t.Fatalf("the session counts %d times, want 1", n)
	}
	if _, ok := p.table.Peek(keyHash("header", "early"), sessions.Now()); ok {
		t.Fatal("the entry is still in the shared namespace too")
	}
}

// Configs that cannot work as written are refused with what to do: JSON
// configs go through Validate (the Caddyfile parser names the line).
func TestValidateRefusesUnworkableValues(t *testing.T) {
	for _, tc := range []struct {
		p    *Policy
		want string
	}{
		{&Policy{MaxSessions: 100}, "max_sessions: 100 is not between 256"},
		{&Policy{SessionTTL: caddy.Duration(400 * 24 * time.Hour)}, "session_ttl: 9600h0m0s is not between 1s and"},
		{&Policy{Hold: caddy.Duration(2 * time.Hour)}, "hold: 2h0m0s is not between 0 and 1h0m0s"},
		{&Policy{SlowStart: caddy.Duration(48 * time.Hour)}, "slow_start: 48h0m0s is not between 0 and 24h0m0s"},
		{&Policy{Keys: []keys.Source{{From: "cookie", Name: DefaultPinCookie}}}, "reads the pin cookie caddy_affinity"},
		{&Policy{MaxSessions: 99999999999999}, "max_sessions: 99999999999999 is not between 256"},
		{&Policy{PinCookie: "JSESSIONID"}, "the default keys (platform_cookies) read that cookie"},
	} {
		p := tc.p
		if p.PinCookie == "" {
			p.PinCookie = DefaultPinCookie
		}
		if p.SessionTTL == 0 {
			p.SessionTTL = DefaultSessionTTL
		}
		if err := p.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v", tc.want, err)
		}
	}
	ok := &Policy{PinCookie: "pin", SessionTTL: DefaultSessionTTL, MaxSessions: 256, Keys: []keys.Source{{From: "cookie", Name: DefaultPinCookie}}}
	if err := ok.Validate(); err != nil {
		t.Errorf("a key named like the default pin, with the pin renamed: %v", err)
	}
}

// Sessions whose upstream a reload removed move as failovers: they are
// counted and logged as such, from the removed upstream, and their pins
// are not counted as forged.
func TestRemovedUpstreamSessionsFailOver(t *testing.T) {
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "header", Name: "X-Sid"}}})
	pool := testPool(t, 3)
	req := func(cookies ...string) *http.Request {
		r := newRequest(cookies...)
		r.Header.Set("X-Sid", "moving")
		return r
	}
	w := httptest.NewRecorder()
	home := p.Select(pool, req(), w)
	pin := pinFrom(t, w, DefaultPinCookie)
	var rest reverseproxy.UpstreamPool
	for _, u := range pool {
		if u != home {
			rest = append(rest, u)
		}
	}
	failed, rejected := testutil.ToFloat64(metrics.byOutcome[outcomeFailover]), testutil.ToFloat64(metrics.rejectedPins)
	for name, r := range map[string]*http.Request{"pin and table": req(pin), "table": req(), "pin": func() *http.Request {
		r := newRequest(pin)
		return r
	}()} {
		d := decision{}
		in := decideInput{failed: -1, now: sessions.Now(), dry: true}
		var buf [keys.Max]uint64
		in.keys, in.first = p.requestKeys(r, &buf, false)
		p.decide(p.poolState(rest), r, &in, &d)
		if d.gone != home.Dial || !d.failover() || d.pinRejected {
			t.Errorf("%s: gone %q, failover %v, rejected %v; want a failover from %s", name, d.gone, d.failover(), d.pinRejected, home.Dial)
		}
	}
	got := p.Select(rest, req(pin), httptest.NewRecorder())
	if got == nil || got == home {
		t.Fatalf("after the reload: %v", got)
	}
	if testutil.ToFloat64(metrics.byOutcome[outcomeFailover]) != failed+1 || testutil.ToFloat64(metrics.rejectedPins) != rejected {
		t.Fatalf("counted failovers +%v, rejected pins +%v; want +1, +0",
			testutil.ToFloat64(metrics.byOutcome[outcomeFailover])-failed, testutil.ToFloat64(metrics.rejectedPins)-rejected)
	}
	if es, _ := failovers.snapshot(); es[0].From != home.Dial || es[0].Reason != "removed: no longer in the proxy's upstreams" {
		t.Fatalf("failover log: %+v", es[0])
	}
}

package affinity

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/pin"
	"github.com/caddy-affinity/caddy-affinity/hashring"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// newTestPolicy provisions a policy the way Caddy would.
func newTestPolicy(t testing.TB, p *Policy) *Policy {
	t.Helper()
	if p.Secret == "" && !p.DisablePinCookie {
		p.Secret = "test-secret-0123456789"
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := p.Provision(ctx); err != nil {
		t.Fatalf("provision: %v", err)
	}
	t.Cleanup(func() { _ = p.Cleanup() })
	return p
}

// testPool returns n upstreams with unique dial addresses per test, so
// that lifecycle states set by one test do not leak into another.
func testPool(t testing.TB, n int) reverseproxy.UpstreamPool {
	pool := make(reverseproxy.UpstreamPool, n)
	for i := range pool {
		pool[i] = &reverseproxy.Upstream{Host: new(reverseproxy.Host), Dial: fmt.Sprintf("%s-u%d:80", t.Name(), i)}
	}
	return pool
}

// connSeq numbers test requests' connections.
var connSeq atomic.Int64

// newRequest returns a request as Caddy's server hands it on: with a vars
// table in its context, so that Select can mark retries.
//
// Each request comes on a connection of its own (one client address, a
// new port), as a browser's first requests do: keyless requests are
// placed by their connection.
func newRequest(cookies ...string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "http://example.com/", nil)
	r.RemoteAddr = fmt.Sprintf("192.0.2.1:%d", 1024+connSeq.Add(1)%60000)
	if len(cookies) > 0 {
		r.Header.Set("Cookie", strings.Join(cookies, "; "))
	}
	ctx := context.WithValue(r.Context(), caddyhttp.VarsCtxKey, map[string]any{})
	return r.WithContext(ctx)
}

// pinFrom returns the "name=value" of the pin a response set, or "".
func pinFrom(t *testing.T, w *httptest.ResponseRecorder, name string) string {
	t.Helper()
	var found []string
	for _, v := range w.Header()["Set-Cookie"] {
		if strings.HasPrefix(v, name+"=") {
			found = append(found, strings.SplitN(v, ";", 2)[0])
		}
	}
	if len(found) > 1 {
		t.Fatalf("more than one pin cookie set: %q", found)
	}
	if len(found) == 0 {
		return ""
	}
	return found[0]
}

// setState puts an upstream in state s for the rest of the test, as an
// operator would.
func setState(t *testing.T, dial string, s healthcheck.State) {
	t.Helper()
	operate(t, dial, s)
	t.Cleanup(func() { operate(t, dial, healthcheck.Up) })
}

// operate puts an upstream in state s, as an operator would.
func operate(t testing.TB, dial string, s healthcheck.State) {
	t.Helper()
	healthcheck.Get(dial)
	if _, err := healthcheck.Operate(context.Background(), dial, s); err != nil {
		t.Fatal(err)
	}
}

func TestNewSessionGetsPinAndKeepsIt(t *testing.T) {
	p := newTestPolicy(t, &Policy{})
	pool := testPool(t, 3)

	w := httptest.NewRecorder()
	first := p.Select(pool, newRequest(), w)
	if first == nil {
		t.Fatal("no upstream for a new session")
	}
	pin := pinFrom(t, w, DefaultPinCookie)
	if pin == "" {
		t.Fatal("new session got no pin cookie")
	}
	sc := w.Header().Get("Set-Cookie")
	for _, attr := range []string{"Path=/", "HttpOnly", "SameSite=Lax"} {
		if !strings.Contains(sc, attr) {
			t.Errorf("pin cookie %q lacks %s", sc, attr)
		}
	}
	if strings.Contains(sc, "Secure") {
		t.Errorf("pin cookie on plain HTTP is Secure: %q", sc)
	}
	if strings.Contains(sc, first.Dial) {
		t.Errorf("pin cookie names the address: %q", sc)
	}
	for i := 0; i < 50; i++ {
		w := httptest.NewRecorder()
		if got := p.Select(pool, newRequest(pin), w); got != first {
			t.Fatalf("visit %d: pinned session went to %s, want %s", i, got.Dial, first.Dial)
		}
		if pinFrom(t, w, DefaultPinCookie) != "" {
			t.Fatalf("visit %d: pin re-issued although it was valid", i)
		}
	}
}

func TestNewSessionsSpread(t *testing.T) {
	p := newTestPolicy(t, &Policy{})
	pool := testPool(t, 3)
	counts := map[string]int{}
	for i := 0; i < 3000; i++ {
		counts[p.Select(pool, newRequest(), nil).Dial]++
	}
	for _, u := range pool {
		if c := counts[u.Dial]; c < 800 || c > 1200 {
			t.Errorf("%s got %d of 3000 new sessions, want about 1000", u.Dial, c)
		}
	}
}

func TestSecurePinUnderTLSAndTrustedProxy(t *testing.T) {
	p := newTestPolicy(t, &Policy{})
	pool := testPool(t, 2)

	r := newRequest()
	r.Header.Set("X-Forwarded-Proto", "https")
	w := httptest.NewRecorder()
	p.Select(pool, r, w)
	if strings.Contains(w.Header().Get("Set-Cookie"), "Secure") {
		t.Error("an untrusted X-Forwarded-Proto made the pin Secure")
	}

	r = newRequest()
	r.Header.Set("X-Forwarded-Proto", "https")
	caddyhttp.SetVar(r.Context(), caddyhttp.TrustedProxyVarKey, true)
	w = httptest.NewRecorder()
	p.Select(pool, r, w)
	if !strings.Contains(w.Header().Get("Set-Cookie"), "; Secure") {
		t.Errorf("trusted X-Forwarded-Proto https: pin not Secure: %q", w.Header().Get("Set-Cookie"))
	}
}

func TestKeyedSessionsArePlacedByTheRing(t *testing.T) {
	// Every instance must place a key alike: the choice is the ring
	// owner of the key's hash, whatever order the upstreams are in.
	pool := testPool(t, 5)
	members := make([]hashring.Member, len(pool))
	for i, u := range pool {
		members[len(pool)-1-i] = hashring.Member{Name: u.Dial, Weight: 1}
	}
	ring, err := hashring.New(members)
	if err != nil {
		t.Fatal(err)
	}
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}, DisablePinCookie: true})
	for i := 0; i < 300; i++ {
		v := fmt.Sprintf("placement-%d", i)
		want := members[ring.Lookup(sessionIDHash(v))].Name
		if got := p.Select(pool, newRequest("sid="+v), nil); got.Dial != want {
			t.Fatalf("key %q went to %s, ring owner is %s", v, got.Dial, want)
		}
	}
}

func TestFailoverSticksAfterRecovery(t *testing.T) {
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}})
	pool := testPool(t, 3)

	// A session with an app cookie, pinned.
	w := httptest.NewRecorder()
	home := p.Select(pool, newRequest("sid=abc"), w)
	pin := pinFrom(t, w, DefaultPinCookie)

	// Its upstream goes into maintenance: it fails over, with a new pin.
	operate(t, home.Dial, healthcheck.Maintenance)
	w = httptest.NewRecorder()
	moved := p.Select(pool, newRequest("sid=abc", pin), w)
	if moved == home || moved == nil {
		t.Fatalf("session stayed on %v in maintenance", moved)
	}
	newPin := pinFrom(t, w, DefaultPinCookie)
	if newPin == "" || newPin == pin {
		t.Fatalf("failover issued no new pin (old %q new %q)", pin, newPin)
	}

	// The old upstream comes back: the session stays where it landed,
	// by the new pin, and by the table for a client that lost its pin.
	operate(t, home.Dial, healthcheck.Up)
	for _, cookies := range [][]string{{"sid=abc", newPin}, {"sid=abc"}} {
		if got := p.Select(pool, newRequest(cookies...), httptest.NewRecorder()); got != moved {
			t.Fatalf("cookies %q: session went back to %s, want it to stay on %s", cookies, got.Dial, moved.Dial)
		}
	}
}

func TestDrainingKeepsPinnedTakesNoNew(t *testing.T) {
	p := newTestPolicy(t, &Policy{})
	pool := testPool(t, 3)
	w := httptest.NewRecorder()
	home := p.Select(pool, newRequest(), w)
	pin := pinFrom(t, w, DefaultPinCookie)
	setState(t, home.Dial, healthcheck.Draining)

	if got := p.Select(pool, newRequest(pin), httptest.NewRecorder()); got != home {
		t.Fatalf("pinned session left draining upstream for %s", got.Dial)
	}
	for i := 0; i < 300; i++ {
		if got := p.Select(pool, newRequest(), nil); got == home {
			t.Fatal("new session placed on a draining upstream")
		}
	}
}

func TestNothingSelectableReturnsNil(t *testing.T) {
	p := newTestPolicy(t, &Policy{})
	pool := testPool(t, 2)
	for _, u := range pool {
		setState(t, u.Dial, healthcheck.Maintenance)
	}
	if got := p.Select(pool, newRequest(), httptest.NewRecorder()); got != nil {
		t.Fatalf("got %s with every upstream in maintenance", got.Dial)
	}
	if got := p.Select(nil, newRequest(), nil); got != nil {
		t.Fatal("empty pool gave an upstream")
	}
}

func TestRetryFailsOverAndReplacesPin(t *testing.T) {
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}})
	pool := testPool(t, 3)
	w := httptest.NewRecorder()
	home := p.Select(pool, newRequest("sid=x1"), w)
	pin := pinFrom(t, w, DefaultPinCookie)

	// Caddy calls Select again with the same request after the chosen
	// upstream failed: the retry must go elsewhere and the response must
	// carry exactly one pin, the new one.
	r := newRequest("sid=x1", pin)
	w = httptest.NewRecorder()
	w.Header().Add("Set-Cookie", "other=1; Path=/")
	if got := p.Select(pool, r, w); got != home {
		t.Fatalf("first attempt went to %s, want %s", got.Dial, home.Dial)
	}
	retry := p.Select(pool, r, w)
	if retry == nil || retry == home {
		t.Fatalf("retry went to %v, want another upstream than %s", retry, home.Dial)
	}
	newPin := pinFrom(t, w, DefaultPinCookie) // fails on two pins
	if newPin == "" || newPin == pin {
		t.Fatalf("retry issued pin %q (old %q)", newPin, pin)
	}
	if !strings.Contains(strings.Join(w.Header()["Set-Cookie"], "\n"), "other=1") {
		t.Error("retry dropped another Set-Cookie header")
	}
	// And the session stays there.
	if got := p.Select(pool, newRequest("sid=x1", newPin), nil); got != retry {
		t.Fatalf("after the retry the session went to %s, want %s", got.Dial, retry.Dial)
	}
}

func TestForgedPinsAreIgnored(t *testing.T) {
	p := newTestPolicy(t, &Policy{})
	pool := testPool(t, 3)
	w := httptest.NewRecorder()
	p.Select(pool, newRequest(), w)
	good := strings.TrimPrefix(pinFrom(t, w, DefaultPinCookie), DefaultPinCookie+"=")
	// A changed token (the part naming the upstream). A changed time or
	// tag matters only on an upstream that takes no new sessions freely:
	// TestPinForgedTimeFails.
	flipped := []byte(good)
	flipped[10] ^= 1
	other := newTestPolicy(t, &Policy{Secret: "another secret"})
	w2 := httptest.NewRecorder()
	other.Select(pool, newRequest(), w2)
	foreign := strings.TrimPrefix(pinFrom(t, w2, DefaultPinCookie), DefaultPinCookie+"=")

	for _, v := range []string{string(flipped), foreign, "", "x", strings.Repeat("A", pin.ValueLen),
		strings.Repeat("Z", 8192), "\xff\xfe\xfd", good[:len(good)-1] + "!", `"` + good + `"x`} {
		w := httptest.NewRecorder()
		if got := p.Select(pool, newRequest(DefaultPinCookie+"="+v), w); got == nil {
			t.Fatalf("pin %q: no upstream", v)
		}
		// A forged pin is treated as no pin: a new one is issued.
		if pinFrom(t, w, DefaultPinCookie) == "" {
			t.Errorf("pin %q was accepted as valid", v)
		}
	}
}

func TestClientIPKeyIgnoresUntrustedForwardedFor(t *testing.T) {
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "client_ip"}}, DisablePinCookie: true})
	pool := testPool(t, 16)
	base := newRequest()
	base.RemoteAddr = "192.0.2.10:5555"
	want := p.Select(pool, base, nil)
	for i := 0; i < 50; i++ {
		r := newRequest()
		r.RemoteAddr = "192.0.2.10:5555"
		r.Header.Set("X-Forwarded-For", fmt.Sprintf("203.0.113.%d", i))
		if got := p.Select(pool, r, nil); got != want {
			t.Fatalf("X-Forwarded-For %d moved the client from %s to %s", i, want.Dial, got.Dial)
		}
	}
}

func TestSessionTableSurvivesReload(t *testing.T) {
	pool := testPool(t, 4)
	old := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "header", Name: "X-Session"}}, DisablePinCookie: true})
	r := newRequest()
	r.Header.Set("X-Session", "s1")
	home := old.Select(pool, r, nil)
	operate(t, home.Dial, healthcheck.Maintenance)
	moved := old.Select(pool, r, nil)
	operate(t, home.Dial, healthcheck.Up)

	// A reload: the new policy is provisioned before the old one is
	// cleaned up, and must remember the failover.
	next := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "header", Name: "X-Session"}}, DisablePinCookie: true})
	_ = old.Cleanup()
	r = newRequest()
	r.Header.Set("X-Session", "s1")
	if got := next.Select(pool, r, nil); got != moved {
		t.Fatalf("after reload the session went to %s, want %s (home was %s)", got.Dial, moved.Dial, home.Dial)
	}
}

func TestWeights(t *testing.T) {
	p := newTestPolicy(t, &Policy{Weights: []int{3, 1, 0}})
	pool := testPool(t, 3)
	counts := map[string]int{}
	const n = 8000
	for i := 0; i < n; i++ {
		counts[p.Select(pool, newRequest(), nil).Dial]++
	}
	if counts[pool[2].Dial] != 0 {
		t.Errorf("weight 0 upstream got %d new sessions", counts[pool[2].Dial])
	}
	if share := float64(counts[pool[0].Dial]) / n; share < 0.72 || share > 0.78 {
		t.Errorf("weight 3 of 4 got share %.3f", share)
	}
}

func TestPinnedPathDoesNotAllocate(t *testing.T) {
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}})
	pool := testPool(t, 16)
	w := httptest.NewRecorder()
	p.Select(pool, newRequest("sid=zzz"), w)
	pin := pinFrom(t, w, DefaultPinCookie)
	r := newRequest("a=1", "sid=zzz", pin)
	vars := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
	allocs := testing.AllocsPerRun(200, func() {
		delete(vars, triedVar)
		if p.Select(pool, r, w) == nil {
			t.Fatal("nil")
		}
	})
	if allocs != 0 {
		t.Fatalf("pinned path allocated %.1f times per request", allocs)
	}
}

func TestHoldRetriesTheSameUpstreamThenFailsOver(t *testing.T) {
	p := newTestPolicy(t, &Policy{Hold: caddy.Duration(300 * time.Millisecond)})
	pool := testPool(t, 3)
	w := httptest.NewRecorder()
	home := p.Select(pool, newRequest(), w)
	pin := pinFrom(t, w, DefaultPinCookie)

	// Attempts of one request keep failing on home: within the hold the
	// retry goes to home again (it may be restarting)...
	r := newRequest(pin)
	if got := p.Select(pool, r, httptest.NewRecorder()); got != home {
		t.Fatalf("first attempt: %v", got)
	}
	for i := 0; i < 3; i++ {
		if got := p.Select(pool, r, httptest.NewRecorder()); got != home {
			t.Fatalf("retry %d within the hold went to %v, want %s", i, got, home.Dial)
		}
	}
	// ...and after the hold it fails over, once.
	time.Sleep(350 * time.Millisecond)
	w = httptest.NewRecorder()
	moved := p.Select(pool, r, w)
	if moved == nil || moved == home {
		t.Fatalf("after the hold the retry went to %v", moved)
	}
	if newPin := pinFrom(t, w, DefaultPinCookie); newPin == "" || newPin == pin {
		t.Fatal("failover after the hold issued no new pin")
	}
}

func TestHoldDoesNotApplyToMaintenance(t *testing.T) {
	p := newTestPolicy(t, &Policy{Hold: caddy.Duration(time.Hour)})
	pool := testPool(t, 3)
	w := httptest.NewRecorder()
	home := p.Select(pool, newRequest(), w)
	setState(t, home.Dial, healthcheck.Maintenance)
	if got := p.Select(pool, newRequest(pinFrom(t, w, DefaultPinCookie)), nil); got == nil || got == home {
		t.Fatalf("maintenance with a hold: got %v, want an immediate failover", got)
	}
}

func TestSlowStartRamp(t *testing.T) {
	p := newTestPolicy(t, &Policy{SlowStart: caddy.Duration(10 * time.Second)})
	pool := testPool(t, 3)
	back := healthcheck.Get(pool[0].Dial)
	// share measures pool[0]'s share of new sessions when it came back
	// ago before each decision: slow start reads the wall clock, so the
	// upstream is marked back again before every Select, or the ramp
	// would advance while 6000 decisions run (over a second under -race
	// on a loaded machine, a tenth of the ramp).
	share := func(ago time.Duration) float64 {
		n := 0
		for i := 0; i < 6000; i++ {
			back.MarkBack(time.Now().Add(-ago))
			if p.Select(pool, newRequest(), nil) == pool[0] {
				n++
			}
		}
		return float64(n) / 6000
	}
	// Only pool[0] ramps: the others may count as added by a reload if
	// another test ran a Caddy config in this process.
	p.poolState(pool)
	for _, u := range pool[1:] {
		healthcheck.Get(u.Dial).MarkBack(time.Now().Add(-time.Hour))
	}
	if s := share(0); s > 0.02 {
		t.Errorf("just back: share %.3f, want about 0", s)
	}
	if s := share(5 * time.Second); s < 0.12 || s > 0.22 {
		t.Errorf("half way through the ramp: share %.3f, want about 1/6", s)
	}
	if s := share(time.Minute); s < 0.28 || s > 0.39 {
		t.Errorf("after the ramp: share %.3f, want about 1/3", s)
	}
	// Pinned sessions are never affected by the ramp.
	w := httptest.NewRecorder()
	var pin string
	for pin == "" {
		w = httptest.NewRecorder()
		if p.Select(pool, newRequest(), w) == pool[0] {
			pin = pinFrom(t, w, DefaultPinCookie)
		}
	}
	back.MarkBack(time.Now())
	if got := p.Select(pool, newRequest(pin), nil); got != pool[0] {
		t.Fatalf("slow start moved a pinned session to %s", got.Dial)
	}
}

func TestSessionFollowedAcrossKeysWithoutPin(t *testing.T) {
	// pin_cookie off, key cookie then client_ip: the first request has no
	// app cookie yet and is placed by its IP; the next one brings the
	// app's new cookie, which must find the same upstream.
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}, {From: "client_ip"}}, DisablePinCookie: true})
	pool := testPool(t, 5)
	for c := 0; c < 100; c++ {
		ip := fmt.Sprintf("10.1.%d.%d:1000", c/200, c%200)
		r := newRequest()
		r.RemoteAddr = ip
		first := p.Select(pool, r, nil)
		for v := 0; v < 3; v++ {
			r := newRequest(fmt.Sprintf("sid=app-issued-%d", c))
			r.RemoteAddr = ip
			if got := p.Select(pool, r, nil); got != first {
				t.Fatalf("client %d visit %d moved from %s to %s", c, v, first.Dial, got.Dial)
			}
		}
	}
}

// An upstream listed twice (weighting by repetition, as Caddy's own
// policies allow) is one ring member with twice the weight; before, the
// ring refused the duplicate name and every request failed.
func TestDuplicateUpstreamWeighsByRepetition(t *testing.T) {
	p := newTestPolicy(t, &Policy{})
	base := testPool(t, 2)
	pool := reverseproxy.UpstreamPool{base[0], {Host: base[0].Host, Dial: base[0].Dial}, base[1]}
	counts := map[string]int{}
	for range 6000 {
		up := p.Select(pool, newRequest(), nil)
		if up == nil {
			t.Fatal("no upstream for a pool with a repeated address")
		}
		counts[up.Dial]++
	}
	if share := float64(counts[base[0].Dial]) / 6000; share < 0.62 || share > 0.71 {
		t.Fatalf("repeated address took %.3f of new sessions, want about 2/3 (%v)", share, counts)
	}
	ps := p.poolState(pool)
	if len(ps.Member) != 2 || ps.Weights[0] != 2 || ps.Weights[1] != 2 || ps.Weights[2] != 1 {
		t.Fatalf("members %v, weights %v", ps.Member, ps.Weights)
	}
	// A session pinned to the repeated address stays there.
	w := httptest.NewRecorder()
	home := p.Select(pool, newRequest(), w)
	for range 20 {
		if got := p.Select(pool, newRequest(pinFrom(t, w, DefaultPinCookie)), nil); got.Dial != home.Dial {
			t.Fatalf("pinned session moved from %s to %s", home.Dial, got.Dial)
		}
	}
}

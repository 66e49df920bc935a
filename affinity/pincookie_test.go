package affinity

import (
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/pin"
)

// issuedPin returns the Set-Cookie line of the pin p issues to a new
// session, over plain HTTP or TLS, with the value replaced by V.
func issuedPin(t *testing.T, p *Policy, secure bool) string {
	t.Helper()
	pool := testPool(t, 3)
	r := newRequest()
	if secure {
		r.TLS = &tls.ConnectionState{}
	}
	w := httptest.NewRecorder()
	if p.Select(pool, r, w) == nil {
		t.Fatal("no upstream")
	}
	sc := w.Header()["Set-Cookie"]
	if len(sc) != 1 {
		t.Fatalf("Set-Cookie %q, want one pin", sc)
	}
	name, rest, _ := strings.Cut(sc[0], "=")
	value, attrs, _ := strings.Cut(rest, ";")
	if len(value) != pin.ValueLen {
		t.Fatalf("pin value %q", value)
	}
	return name + "=V;" + attrs
}

// TestPinCookieAttributeStrings pins the Set-Cookie lines down, for a
// plain HTTP request and an HTTPS one: same_site none and partitioned
// make every pin Secure (browsers drop them otherwise).
func TestPinCookieAttributeStrings(t *testing.T) {
	for _, tc := range []struct {
		name        string
		attrs       *pin.Attributes
		plain, tlsd string
	}{
		{"default", nil,
			"caddy_affinity=V; Path=/; HttpOnly; SameSite=Lax",
			"caddy_affinity=V; Path=/; HttpOnly; Secure; SameSite=Lax"},
		{"domain path strict max_age", &pin.Attributes{Domain: "example.com", Path: "/app", SameSite: "strict", MaxAge: caddy.Duration(time.Hour)},
			"caddy_affinity=V; Path=/app; Domain=example.com; Max-Age=3600; HttpOnly; SameSite=Strict",
			"caddy_affinity=V; Path=/app; Domain=example.com; Max-Age=3600; HttpOnly; Secure; SameSite=Strict"},
		{"same_site none", &pin.Attributes{SameSite: "none"},
			"caddy_affinity=V; Path=/; HttpOnly; Secure; SameSite=None",
			"caddy_affinity=V; Path=/; HttpOnly; Secure; SameSite=None"},
		{"partitioned", &pin.Attributes{Partitioned: true},
			"caddy_affinity=V; Path=/; HttpOnly; Secure; SameSite=Lax; Partitioned",
			"caddy_affinity=V; Path=/; HttpOnly; Secure; SameSite=Lax; Partitioned"},
		{"none partitioned secure always", &pin.Attributes{SameSite: "none", Partitioned: true, Secure: "always"},
			"caddy_affinity=V; Path=/; HttpOnly; Secure; SameSite=None; Partitioned",
			"caddy_affinity=V; Path=/; HttpOnly; Secure; SameSite=None; Partitioned"},
		{"secure always", &pin.Attributes{Secure: "always", Domain: ".example.org"},
			"caddy_affinity=V; Path=/; Domain=example.org; HttpOnly; Secure; SameSite=Lax",
			"caddy_affinity=V; Path=/; Domain=example.org; HttpOnly; Secure; SameSite=Lax"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newTestPolicy(t, &Policy{PinCookieAttributes: tc.attrs})
			if got := issuedPin(t, p, false); got != tc.plain {
				t.Errorf("plain HTTP:\n got %s\nwant %s", got, tc.plain)
			}
			if got := issuedPin(t, p, true); got != tc.tlsd {
				t.Errorf("HTTPS:\n got %s\nwant %s", got, tc.tlsd)
			}
		})
	}
}

func TestPinCookieAttributeErrors(t *testing.T) {
	for _, tc := range []struct {
		attrs pin.Attributes
		want  string
	}{
		{pin.Attributes{SameSite: "none", Secure: "auto"}, "secure always"},
		{pin.Attributes{Partitioned: true, Secure: "auto"}, "secure always"},
		{pin.Attributes{SameSite: "None"}, "not lax, strict or none"},
		{pin.Attributes{Secure: "never"}, "not auto or always"},
		{pin.Attributes{MaxAge: -1}, "negative"},
		{pin.Attributes{MaxAge: caddy.Duration(time.Millisecond)}, "less than a second"},
		{pin.Attributes{MaxAge: caddy.Duration(500 * 24 * time.Hour)}, "more than"},
		{pin.Attributes{Path: "app"}, "must start with '/'"},
		{pin.Attributes{Path: "/a;b"}, "must start with '/'"},
		{pin.Attributes{Path: "/a b"}, "must start with '/'"},
		{pin.Attributes{Domain: "exa mple.com"}, "not a host name"},
		{pin.Attributes{Domain: "example.com;x=y"}, "not a host name"},
		{pin.Attributes{Domain: "::1"}, "not a host name"},
		{pin.Attributes{Domain: "-a.com"}, "not a host name"},
	} {
		p := &Policy{PinCookie: DefaultPinCookie, SessionTTL: DefaultSessionTTL, PinCookieAttributes: &tc.attrs}
		if err := p.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: error %v, want one saying %q", tc.attrs, err, tc.want)
		}
	}
	for _, ok := range []pin.Attributes{{Domain: "127.0.0.1"}, {Domain: ".a-b.example"}, {SameSite: "none", Secure: "always"}, {MaxAge: caddy.Duration(time.Second)}} {
		if _, err := ok.Style(); err != nil {
			t.Errorf("%+v: %v", ok, err)
		}
	}
	p := &Policy{PinCookie: DefaultPinCookie, SessionTTL: DefaultSessionTTL, DisablePinCookie: true,
		Keys: []keys.Source{{From: "client_ip"}}, PinCookieAttributes: &pin.Attributes{}}
	if err := p.Validate(); err == nil {
		t.Error("attributes with the pin cookie off pass")
	}
}

// TestPinCookieJSON: the JSON names the README documents.
func TestPinCookieJSON(t *testing.T) {
	var p Policy
	err := json.Unmarshal([]byte(`{"pin_cookie":"p","pin_cookie_attributes":{"domain":"example.com","path":"/","same_site":"none","secure":"always","max_age":"1h","partitioned":true},"secret":"new","previous_secrets":["old","{env.OLD}"]}`), &p)
	if err != nil {
		t.Fatal(err)
	}
	a := p.PinCookieAttributes
	if a == nil || a.Domain != "example.com" || a.SameSite != "none" || a.Secure != "always" || time.Duration(a.MaxAge) != time.Hour || !a.Partitioned ||
		len(p.PreviousSecrets) != 2 || p.PreviousSecrets[1] != "{env.OLD}" {
		t.Fatalf("%+v %q", a, p.PreviousSecrets)
	}
}

func TestPinCookieCaddyfile(t *testing.T) {
	p, err := parse("affinity {\n pin_cookie affinity_pin {\n  domain example.com\n  path /\n  same_site none\n  secure always\n  max_age 12h\n  partitioned\n }\n secret new old older\n}")
	if err != nil {
		t.Fatal(err)
	}
	want := pin.Attributes{Domain: "example.com", Path: "/", SameSite: "none", Secure: "always", MaxAge: caddy.Duration(12 * time.Hour), Partitioned: true}
	if p.PinCookie != "affinity_pin" || p.PinCookieAttributes == nil || *p.PinCookieAttributes != want {
		t.Fatalf("got %q %+v", p.PinCookie, p.PinCookieAttributes)
	}
	if p.Secret != "new" || strings.Join(p.PreviousSecrets, ",") != "old,older" {
		t.Fatalf("secret %q previous %q", p.Secret, p.PreviousSecrets)
	}
	// The name may be left out for the default; a bare name still works.
	p, err = parse("affinity {\n pin_cookie {\n  same_site none\n  partitioned\n }\n}")
	if err != nil || p.PinCookie != "" || p.PinCookieAttributes == nil || !p.PinCookieAttributes.Partitioned {
		t.Fatalf("pin_cookie { ... }: %+v %v", p, err)
	}
	if p, err := parse("affinity {\n pin_cookie lbpin\n secret one\n}"); err != nil || p.PinCookieAttributes != nil || p.PreviousSecrets != nil {
		t.Fatalf("pin_cookie lbpin: %+v %v", p, err)
	}

	// Every error names the line at fault.
	for _, tc := range []struct {
		input, want string
		line        int
	}{
		{"affinity {\n pin_cookie {\n  same_site none\n  secure auto\n }\n}", "secure always, or leave secure out", 4},
		{"affinity {\n pin_cookie {\n  secure auto\n  partitioned\n }\n}", "secure always, or leave secure out", 3},
		{"affinity {\n pin_cookie {\n  same_site sometimes\n }\n}", "not lax, strict or none", 3},
		{"affinity {\n pin_cookie {\n  path /\n  max_age 0s\n }\n}", "not a positive duration; leave max_age out for a browser-session cookie", 4},
		{"affinity {\n pin_cookie {\n  max_age -5m\n }\n}", "max_age: \"-5m\" is not a positive duration", 3},
		{"affinity {\n pin_cookie {\n  max_age soon\n }\n}", "invalid duration", 3},
		{"affinity {\n pin_cookie {\n\n  path app\n }\n}", "must start with '/'", 4},
		{"affinity {\n pin_cookie {\n  domain \"a b\"\n }\n}", "not a host name", 3},
		{"affinity {\n pin_cookie {\n  secure maybe\n }\n}", "not auto or always", 3},
		{"affinity {\n pin_cookie {\n  partitioned yes\n }\n}", "takes no value", 3},
		{"affinity {\n pin_cookie {\n  path /\n  path /a\n }\n}", "path specified more than once", 4},
		{"affinity {\n pin_cookie {\n  colour blue\n }\n}", "unrecognized attribute \"colour\"", 3},
		{"affinity {\n key client_ip\n pin_cookie off {\n  path /\n }\n}", "pin_cookie off takes no block", 4},
		{"affinity {\n secret\n}", "secret: need a value", 2},
		{"affinity {\n secret a b a\n}", "given twice", 2},
	} {
		_, err := parse(tc.input)
		at := fmt.Sprintf("at Testfile:%d", tc.line)
		if err == nil || !strings.Contains(err.Error(), tc.want) || (tc.line > 0 && !strings.Contains(err.Error(), at)) {
			t.Errorf("%q: error %v, want one with %q %s", tc.input, err, tc.want, at)
		}
	}
}

// rotated returns a policy with secret old and one with secret
// new accepting old, over the same pool.
func rotated(t *testing.T, keys []keys.Source) (old, next *Policy) {
	old = newTestPolicy(t, &Policy{Keys: keys, Secret: "old-secret-0123456789"})
	next = newTestPolicy(t, &Policy{Keys: keys, Secret: "new-secret-0123456789", PreviousSecrets: []string{"older-secret-0123456789", "old-secret-0123456789"}})
	return old, next
}

// TestPreviousSecretPinsAccepted: a pin signed with a previous secret
// keeps its session on its upstream and is issued again with the current
// secret on that request; after that no pin is issued; a pin of a secret
// that is neither is rejected.
func TestPreviousSecretPinsAccepted(t *testing.T) {
	pool := testPool(t, 8)
	old, next := rotated(t, nil)
	stranger := newTestPolicy(t, &Policy{Secret: "stranger-secret-0123456789"})
	for i := range pool {
		pin := pinAged(old, pool, i, 0)
		w := httptest.NewRecorder()
		if got := next.Select(pool, newRequest(pin), w); got != pool[i] {
			t.Fatalf("old-secret pin of %d: sent to %v", i, got)
		}
		again := pinFrom(t, w, DefaultPinCookie)
		if again == "" || again == pin {
			t.Fatalf("old-secret pin not issued again with the new secret: %q", again)
		}
		dp, ok := decoded(strings.TrimPrefix(again, DefaultPinCookie+"="))
		ps := next.poolState(pool)
		if !ok || ps.pins.Index(&dp) != i || dp.PreviousSecret() || !ps.pins.Verify(i, &dp) {
			t.Fatalf("re-issued pin %q is not the new secret's for %d: %+v", again, i, dp)
		}
		w = httptest.NewRecorder()
		if got := next.Select(pool, newRequest(again), w); got != pool[i] || pinFrom(t, w, DefaultPinCookie) != "" {
			t.Fatalf("the new pin: sent to %v, pin issued %q", got, pinFrom(t, w, DefaultPinCookie))
		}
		// v1 pins of the old secret count too.
		if got := next.Select(pool, newRequest(pinV1(old, pool, i)), httptest.NewRecorder()); got != pool[i] {
			t.Fatalf("old-secret v1 pin of %d: sent to %v", i, got)
		}
	}
	// A stranger's pins are no pins: rejected, replaced.
	before := testutil.ToFloat64(metrics.rejectedPins)
	for i := range pool {
		w := httptest.NewRecorder()
		next.Select(pool, newRequest(pinAged(stranger, pool, i, 0)), w)
		if pinFrom(t, w, DefaultPinCookie) == "" {
			t.Fatal("forged pin not replaced")
		}
	}
	if got := testutil.ToFloat64(metrics.rejectedPins) - before; got != float64(len(pool)) {
		t.Fatalf("%v of %d forged pins counted as rejected", got, len(pool))
	}
	// Once the old secret is dropped, its pins are rejected too.
	dropped := newTestPolicy(t, &Policy{Secret: "new-secret-0123456789"})
	var dp pin.Decoded
	if ps := dropped.poolState(pool); ps.pinIndex(strings.TrimPrefix(pinAged(old, pool, 2, 0), DefaultPinCookie+"="), &dp) != -1 {
		t.Fatal("old pin accepted with no previous secret")
	}
}

// TestPreviousSecretTagChecked: on an upstream that takes no new
// sessions freely a pin must prove its time with its tag; an old
// secret's pin proves it with the old secret, and a forged time on it is
// rejected.
func TestPreviousSecretTagChecked(t *testing.T) {
	pool := testPool(t, 8)
	old, next := rotated(t, []keys.Source{{From: "cookie", Name: "sid"}})
	setState(t, pool[3].Dial, healthcheck.Draining)

	live := pinAged(old, pool, 3, 10)
	w := httptest.NewRecorder()
	if got := next.Select(pool, newRequest(live), w); got != pool[3] {
		t.Fatalf("a live session's old-secret pin on a draining upstream: sent to %v", got)
	}
	if again := pinFrom(t, w, DefaultPinCookie); again == "" || again == live {
		t.Fatalf("not issued again: %q", again)
	}
	// The same token with a time it was never issued with: the tag no
	// longer verifies.
	raw, err := base64.RawURLEncoding.DecodeString(strings.TrimPrefix(live, DefaultPinCookie+"="))
	if err != nil {
		t.Fatal(err)
	}
	raw[18+3]++ // the last byte of the time, after the 18-byte token (TestPinWireFormats)
	forged := DefaultPinCookie + "=" + base64.RawURLEncoding.EncodeToString(raw)
	before := testutil.ToFloat64(metrics.rejectedPins)
	for range 20 {
		if got := next.Select(pool, newRequest(forged), httptest.NewRecorder()); got == pool[3] {
			t.Fatal("a forged time on an old-secret pin reached the draining upstream")
		}
	}
	if testutil.ToFloat64(metrics.rejectedPins)-before != 20 {
		t.Fatal("forged old-secret pins not counted as rejected")
	}
	// An old secret's stale pin is a new session, as with the current one.
	if got := next.Select(pool, newRequest(pinAged(old, pool, 3, pin.Lifetime(next.ttl)+5)), httptest.NewRecorder()); got == pool[3] {
		t.Fatal("a stale old-secret pin reached the draining upstream")
	}
}

// TestPreviousSecretsPinnedAllocs: with previous secrets configured, the
// pinned path of a current pin allocates nothing, and one of a previous
// secret allocates only for the new Set-Cookie header (its value, bound
// to the session, and the header's slice).
func TestPreviousSecretsPinnedAllocs(t *testing.T) {
	pool := testPool(t, 16)
	old, next := rotated(t, []keys.Source{{From: "cookie", Name: "sid"}})
	for _, tc := range []struct {
		name string
		pin  string
		max  float64
	}{{"current", pinBoundTo(next, pool, 5, 0, "sid=zzz"), 0}, {"previous", pinBoundTo(old, pool, 5, 0, "sid=zzz"), 2}} {
		r := newRequest("a=1", "sid=zzz", tc.pin)
		vars := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
		w := &discardWriter{h: make(map[string][]string)}
		allocs := testing.AllocsPerRun(200, func() {
			delete(vars, triedVar)
			clear(w.h)
			if next.Select(pool, r, w) != pool[5] {
				t.Fatal("not pinned")
			}
		})
		if allocs > tc.max {
			t.Errorf("%s secret's pin: %.1f allocations per request, want at most %v", tc.name, allocs, tc.max)
		}
	}
}

// BenchmarkSelectRotated is BenchmarkSelect's pinned case during a
// rotation: a current pin, and a previous secret's (issued again).
func BenchmarkSelectRotated(b *testing.B) {
	pool := testPool(b, 16)
	keys := []keys.Source{{From: "cookie", Name: "sid"}}
	old := newTestPolicy(b, &Policy{Keys: keys, Secret: "old-secret-0123456789"})
	next := newTestPolicy(b, &Policy{Keys: keys, Secret: "new-secret-0123456789", PreviousSecrets: []string{"old-secret-0123456789"}})
	b.Run("current/N=16", func(b *testing.B) {
		benchSelect(b, next, pool, benchRequest("theme=dark; sid=0123456789abcdef0123456789abcdef; "+pinBoundTo(next, pool, 3, 0, benchSID)))
	})
	b.Run("previous/N=16", func(b *testing.B) {
		benchSelect(b, next, pool, benchRequest("theme=dark; sid=0123456789abcdef0123456789abcdef; "+pinBoundTo(old, pool, 3, 0, benchSID)))
	})
}

package affinity

import (
	"encoding/base64"
	"encoding/binary"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/pin"
	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// The policy's side of pins: stale, refreshed, forged, old-format and
// rebound pins through decide and Select. The format itself is tested in
// package pin.

// pinAged returns the cookie of a pin naming upstream i of pool, issued
// age seconds ago to a request without keys.
func pinAged(p *Policy, pool reverseproxy.UpstreamPool, i int, age uint32) string {
	return p.PinCookie + "=" + p.poolState(pool).pins.Value(i, sessions.Now()-age)
}

// pinBoundTo returns the cookie of a pin naming upstream i of pool,
// issued age seconds ago to the session of the request with cookies.
func pinBoundTo(p *Policy, pool reverseproxy.UpstreamPool, i int, age uint32, cookies ...string) string {
	var buf [keys.Max]uint64
	keys, _ := p.requestKeys(newRequest(cookies...), &buf, false)
	return p.PinCookie + "=" + p.poolState(pool).pins.BoundValue(i, sessions.Now()-age, pin.BindFor(false, keys))
}

// pinV1 returns the cookie of a v1 pin naming upstream i of pool.
func pinV1(p *Policy, pool reverseproxy.UpstreamPool, i int) string {
	return p.PinCookie + "=" + p.poolState(pool).pins.V1Value(i)
}

func decoded(value string) (pin.Decoded, bool) {
	var dp pin.Decoded
	ok := pin.Decode(value, &dp)
	return dp, ok
}

// staleAge is older than any live session's pin under p.
func staleAge(p *Policy) uint32 { return pin.Lifetime(p.ttl) + 5 }

// decideFor runs decide for a request as Select would, without acting.
func decideFor(p *Policy, pool reverseproxy.UpstreamPool, cookies ...string) decision {
	in := decideInput{failed: -1, now: sessions.Now()}
	var d decision
	p.decide(p.poolState(pool), newRequest(cookies...), &in, &d)
	return d
}

// The acceptance test of the item at the unit level: a stale pin naming
// an upstream that takes no new sessions freely is a new session there
// (placed by the ring, counted as placed, issued a new pin); a live
// session's pin keeps its upstream whatever its state allows.
func TestStalePinStartsNoNewSession(t *testing.T) {
	cases := []struct {
		name   string
		policy func() *Policy
		shut   func(t *testing.T, pool reverseproxy.UpstreamPool)
		gate   healthcheck.Verdict
	}{
		{"draining", func() *Policy { return &Policy{} }, func(t *testing.T, pool reverseproxy.UpstreamPool) {
			setState(t, pool[0].Dial, healthcheck.Draining)
		}, healthcheck.NoNewSessions},
		{"weight 0", func() *Policy { return &Policy{Weights: []int{0, 1, 1}} }, func(*testing.T, reverseproxy.UpstreamPool) {}, healthcheck.ZeroWeight},
		{"slow start", func() *Policy { return &Policy{SlowStart: caddy.Duration(time.Hour)} }, func(t *testing.T, pool reverseproxy.UpstreamPool) {
			healthcheck.Get(pool[0].Dial).MarkBack(time.Now())
		}, healthcheck.Ramping},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newTestPolicy(t, tc.policy())
			pool := testPool(t, 3)
			p.poolState(pool)
			for _, u := range pool[1:] {
				healthcheck.Get(u.Dial).MarkBack(time.Now().Add(-24 * time.Hour))
			}
			tc.shut(t, pool)

			stale := pinAged(p, pool, 0, staleAge(p))
			for range 50 {
				w := httptest.NewRecorder()
				if got := p.Select(pool, newRequest(stale), w); got == nil || got == pool[0] {
					t.Fatalf("a stale pin brought a new session to %v (%s)", got, tc.name)
				}
				issued := strings.TrimPrefix(pinFrom(t, w, DefaultPinCookie), DefaultPinCookie+"=")
				if pin, ok := decoded(issued); !ok || p.poolState(pool).pins.Index(&pin) == 0 {
					t.Fatalf("the new session was issued pin %q, want one naming its new upstream", issued)
				}
			}
			d := decideFor(p, pool, stale)
			if !d.pinStale || d.failover() || d.by != fromRing || d.pinRejected || d.asked[0].gate != tc.gate {
				t.Fatalf("stale pin: decision %+v, want a new session placed by the ring (not a failover) gated by %d", d, tc.gate)
			}

			// Live sessions keep their upstream: a pin just issued, one
			// as old as a live session's can be, and a v1 pin of a
			// session of before the upgrade.
			for _, live := range []string{pinAged(p, pool, 0, 0), pinAged(p, pool, 0, pin.Lifetime(p.ttl)), pinV1(p, pool, 0)} {
				if got := p.Select(pool, newRequest(live), nil); got != pool[0] {
					t.Fatalf("a live session's pin %s went to %v, want %s", live, got, pool[0].Dial)
				}
			}
		})
	}
}

// Only an upstream that takes no new sessions freely asks the pin's
// age: elsewhere an old pin is honoured (and refreshed) as before, since
// it can bring no session there that the ring could not.
func TestStalePinHonouredWhereNewSessionsAreWelcome(t *testing.T) {
	p := newTestPolicy(t, &Policy{})
	pool := testPool(t, 3)
	w := httptest.NewRecorder()
	if got := p.Select(pool, newRequest(pinAged(p, pool, 1, staleAge(p))), w); got != pool[1] {
		t.Fatalf("old pin on an upstream that is up went to %v, want %s", got, pool[1].Dial)
	}
	if pinFrom(t, w, DefaultPinCookie) == "" {
		t.Fatal("an old pin was not refreshed")
	}
}

// A pin is re-issued, with the time of now, once older than the refresh
// interval, and not before: a live session's pin never gets old, and a
// pinned request with a fresh pin sets no cookie.
func TestPinRefresh(t *testing.T) {
	p := newTestPolicy(t, &Policy{SessionTTL: caddy.Duration(20 * time.Minute)})
	pool := testPool(t, 3)
	w := httptest.NewRecorder()
	p.Select(pool, newRequest(pinAged(p, pool, 2, pin.Refresh(p.ttl)-5)), w)
	if v := pinFrom(t, w, DefaultPinCookie); v != "" {
		t.Fatalf("a fresh pin was issued again: %s", v)
	}
	w = httptest.NewRecorder()
	if got := p.Select(pool, newRequest(pinAged(p, pool, 2, pin.Refresh(p.ttl))), w); got != pool[2] {
		t.Fatalf("pinned to %v, want %s", got, pool[2].Dial)
	}
	issued := strings.TrimPrefix(pinFrom(t, w, DefaultPinCookie), DefaultPinCookie+"=")
	dp, ok := decoded(issued)
	quantum := min(max(p.ttl/8, 1), 60) // how long the signer reuses one time's values
	if !ok || !dp.V3() || p.poolState(pool).pins.Index(&dp) != 2 || dp.Age(sessions.Now()) > quantum {
		t.Fatalf("refreshed pin %q: %+v, want a current pin for the same upstream issued now", issued, dp)
	}
	if !p.poolState(pool).pins.Verify(2, &dp) {
		t.Fatal("the refreshed pin's tag does not verify")
	}
}

// A time cannot be forged: a stale pin whose time is moved to now, with
// its tag kept or changed, is rejected on an upstream that takes no new
// sessions (counted as a rejected pin, placed as a new session).
func TestPinForgedTimeFails(t *testing.T) {
	p := newTestPolicy(t, &Policy{})
	pool := testPool(t, 3)
	setState(t, pool[0].Dial, healthcheck.Draining)
	stale := strings.TrimPrefix(pinAged(p, pool, 0, staleAge(p)), p.PinCookie+"=")
	raw, _ := base64.RawURLEncoding.DecodeString(stale)
	binary.BigEndian.PutUint32(raw[18:22], sessions.Now())
	forged := base64.RawURLEncoding.EncodeToString(raw)
	raw[29] ^= 1
	forgedTag := base64.RawURLEncoding.EncodeToString(raw)
	for _, v := range []string{forged, forgedTag} {
		d := decideFor(p, pool, p.PinCookie+"="+v)
		if !d.pinRejected || d.pinned >= 0 || d.pinStale {
			t.Fatalf("forged time %q: decision %+v, want a rejected pin", v, d)
		}
		w := httptest.NewRecorder()
		if got := p.Select(pool, newRequest(p.PinCookie+"="+v), w); got == nil || got == pool[0] {
			t.Fatalf("forged time brought a new session to %v", got)
		}
	}
	// The genuine time of now passes.
	if got := p.Select(pool, newRequest(pinAged(p, pool, 0, 0)), nil); got != pool[0] {
		t.Fatalf("a genuine fresh pin went to %v", got)
	}
}

// Old (v1) pins are accepted as before and upgraded to v2 on that
// request; on an upstream that takes no new sessions freely, only while
// the sessions of before the upgrade may still carry one.
func TestPinV1AcceptedAndUpgraded(t *testing.T) {
	p := newTestPolicy(t, &Policy{})
	pool := testPool(t, 3)
	v1 := pinV1(p, pool, 1)
	w := httptest.NewRecorder()
	if got := p.Select(pool, newRequest(v1), w); got != pool[1] {
		t.Fatalf("v1 pin went to %v, want %s", got, pool[1].Dial)
	}
	issued := strings.TrimPrefix(pinFrom(t, w, DefaultPinCookie), DefaultPinCookie+"=")
	if dp, ok := decoded(issued); !ok || !dp.V3() || p.poolState(pool).pins.Index(&dp) != 1 {
		t.Fatalf("v1 pin re-issued as %q, want a v2 pin naming the same upstream", issued)
	}

	setState(t, pool[1].Dial, healthcheck.Draining)
	if got := p.Select(pool, newRequest(v1), nil); got != pool[1] {
		t.Fatalf("v1 pin just after the upgrade, upstream draining: went to %v, want %s", got, pool[1].Dial)
	}
	p.pinUpgrade = sessions.Now() - pin.Lifetime(p.ttl) - 1
	for range 20 {
		if got := p.Select(pool, newRequest(v1), nil); got == nil || got == pool[1] {
			t.Fatalf("v1 pin long after the upgrade brought a new session to draining %v", got)
		}
	}
}

// The pinned path stays free of allocations where a pin's time is
// checked too (an upstream that takes no new sessions: one HMAC).
func TestPinnedPathOnDrainingDoesNotAllocate(t *testing.T) {
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}})
	pool := testPool(t, 16)
	setState(t, pool[3].Dial, healthcheck.Draining)
	r := newRequest("a=1", "sid=zzz", pinBoundTo(p, pool, 3, 0, "sid=zzz"))
	vars := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
	w := httptest.NewRecorder()
	allocs := testing.AllocsPerRun(200, func() {
		delete(vars, triedVar)
		if p.Select(pool, r, w) != pool[3] {
			t.Fatal("not pinned")
		}
	})
	if allocs != 0 {
		t.Fatalf("pinned path on a draining upstream allocated %.1f times per request", allocs)
	}
}

// The lookup says why a stale pin was not honoured, from decide itself.
func TestExplainStalePin(t *testing.T) {
	p := newTestPolicy(t, &Policy{})
	pool := testPool(t, 3)
	setState(t, pool[0].Dial, healthcheck.Draining)
	site := siteOf(p, pool)
	stale := strings.TrimPrefix(pinAged(p, pool, 0, staleAge(p)), p.PinCookie+"=")
	got := Explain(site, "pin", "", stale, time.Now())
	if got.Decision != DecidedRandom || !strings.Contains(got.Reason, "its session has ended") ||
		!strings.Contains(got.Reason, "draining") || !strings.Contains(got.Reason, "not honoured") {
		t.Fatalf("stale pin: %s: %s", got.Decision, got.Reason)
	}
	live := strings.TrimPrefix(pinAged(p, pool, 0, 0), p.PinCookie+"=")
	if got := Explain(site, "pin", "", live, time.Now()); got.Decision != DecidedPin || got.Upstream == nil || *got.Upstream != pool[0].Dial {
		t.Fatalf("live pin: %s %v: %s", got.Decision, got.Upstream, got.Reason)
	}
}

// A pin names its session on an upstream that takes no new sessions: a
// new app session behind it (log out, log in) is placed as new; the
// pinned session stays. A pin issued before the app gave the session a
// key is honoured for the first key it comes with and bound to it.
func TestPinOfAnotherSessionStartsNoSessionOnDraining(t *testing.T) {
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}})
	pool := testPool(t, 3)
	bound := pinBoundTo(p, pool, 1, 0, "sid=first")
	setState(t, pool[1].Dial, healthcheck.Draining)
	if got := p.Select(pool, newRequest("sid=first", bound), nil); got != pool[1] {
		t.Fatalf("the pin's own session went to %v, want %s", got, pool[1].Dial)
	}
	for range 20 {
		if got := p.Select(pool, newRequest("sid=second", bound), nil); got == nil || got == pool[1] {
			t.Fatalf("a new app session behind the pin went to draining %v", got)
		}
		if got := p.Select(pool, newRequest(bound), nil); got == nil || got == pool[1] {
			t.Fatalf("a request without the pin's app session went to draining %v", got)
		}
	}
	// Issued keyless: honoured once with a key, and bound to it.
	w := httptest.NewRecorder()
	if got := p.Select(pool, newRequest("sid=third", pinAged(p, pool, 1, 0)), w); got != pool[1] {
		t.Fatalf("a keyless pin with its first key went to %v, want %s", got, pool[1].Dial)
	}
	rebound := pinFrom(t, w, DefaultPinCookie)
	if dp, ok := decoded(strings.TrimPrefix(rebound, DefaultPinCookie+"=")); !ok || !dp.V3() || dp.Bind() == 0 {
		t.Fatalf("the keyless pin was not bound to its key: %q", rebound)
	}
	if got := p.Select(pool, newRequest("sid=fourth", rebound), nil); got == pool[1] {
		t.Fatal("the re-bound pin brought another session to the draining upstream")
	}
	if got := p.Select(pool, newRequest("sid=third", rebound), nil); got != pool[1] {
		t.Fatalf("the re-bound pin's session went to %v", got)
	}
}

// Old pins, and a current pin cut to an old one's shape (24 characters
// pass for a v1 pin), reach a draining upstream only during the upgrade
// window; a forged bind fails the tag.
func TestOldPinsOnlyDuringUpgradeWindow(t *testing.T) {
	p := newTestPolicy(t, &Policy{})
	pool := testPool(t, 3)
	current := strings.TrimPrefix(pinAged(p, pool, 2, 0), DefaultPinCookie+"=")
	cut := DefaultPinCookie + "=" + current[:len(p.poolState(pool).pins.V1Value(2))] // a current pin cut to a v1's length
	v2 := DefaultPinCookie + "=" + p.poolState(pool).pins.V2Value(2, sessions.Now())
	setState(t, pool[2].Dial, healthcheck.Draining)
	p.pinUpgrade = sessions.Now()
	for _, c := range []string{cut, v2} {
		if got := p.Select(pool, newRequest(c), nil); got != pool[2] {
			t.Fatalf("%s within the upgrade window went to %v, want %s", c, got, pool[2].Dial)
		}
	}
	p.pinUpgrade = sessions.Now() - pin.Lifetime(p.ttl) - 1
	for range 20 {
		for _, c := range []string{cut, v2} {
			if got := p.Select(pool, newRequest(c), nil); got == nil || got == pool[2] {
				t.Fatalf("%s after the upgrade window went to draining %v", c, got)
			}
		}
	}
	// A forged bind fails the tag: TestPinBindIsSigned (package pin).
}

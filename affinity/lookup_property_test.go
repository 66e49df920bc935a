package affinity

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"
	"github.com/caddy-affinity/caddy-affinity/internal/testredis"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// lookupWorld is one policy, its pool and what the property test does
// to them. A store is plugged in by the policy's config (Store): the
// test writes sessions through the policy's session handle (Remember), as Select does, whatever
// the backend.
type lookupWorld struct {
	name   string
	policy func() *Policy
	n      int // upstreams
	// redis: the policy has store redis on a server the test starts, and
	// half the sessions shake writes are another instance's: in Redis
	// only, unknown to this instance's table (the lookup must read Redis
	// as Select does, and copy nothing into the table).
	redis bool
}

// TestLookupIsSelectWithoutWrites drives random requests (a session
// cookie, a header key, a pin fresh, stale or forged, a retry), random
// lifecycle states, holds inside and past their time, slow-start ramps
// and session-table contents through the lookup (explainRequest) and
// Select, and requires the same upstream and the same decision every
// time, and that the lookup changed nothing (the table entry's time to
// live is the same after it).
func TestLookupIsSelectWithoutWrites(t *testing.T) {
	worlds := []lookupWorld{
		{"pin and table", func() *Policy {
			return &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}, {From: "header", Name: "X-Session"}}, Hold: caddy.Duration(10 * time.Second)}
		}, 4, false},
		{"weights, slow start, balance factor", func() *Policy {
			return &Policy{
				Keys:      []keys.Source{{From: "cookie", Name: "sid"}, {From: "header", Name: "X-Session"}},
				Weights:   []int{1, 0, 2, 1, 1},
				SlowStart: caddy.Duration(time.Minute), BalanceFactor: 1.25,
				Hold: caddy.Duration(10 * time.Second),
			}
		}, 5, false},
		{"pin off, client address, learner", func() *Policy {
			return &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}, {From: "client_ip", IPv4Bits: 24}}, DisablePinCookie: true, Hold: caddy.Duration(10 * time.Second)}
		}, 3, false},
	}
	for _, w := range worlds {
		t.Run(w.name, func(t *testing.T) {
			checkLookupIsSelect(t, w, 3000)
		})
	}
}

// TestLookupIsSelectWithoutWritesStoreRedis is the property test under
// store redis, with sessions that only another instance (Redis) knows.
func TestLookupIsSelectWithoutWritesStoreRedis(t *testing.T) {
	rd := testredis.Start(t)
	checkLookupIsSelect(t, lookupWorld{"store redis", func() *Policy {
		return &Policy{
			Keys:  []keys.Source{{From: "cookie", Name: "sid"}, {From: "header", Name: "X-Session"}},
			Hold:  caddy.Duration(10 * time.Second),
			Scope: "lookup-redis",
			Store: &sessions.Config{Kind: sessions.KindRedis, RedisConn: sessions.RedisConn{Address: rd.Addr}, KeyPrefix: "test-lookup"},
		}
	}, 4, true}, 1500)
}

func checkLookupIsSelect(t *testing.T, w lookupWorld, rounds int) {
	p := newTestPolicy(t, w.policy())
	pool := testPool(t, w.n)
	ps := p.poolState(pool)
	for _, u := range pool {
		t.Cleanup(func() { operate(t, u.Dial, healthcheck.Up) })
		healthcheck.Get(u.Dial).MarkBack(time.Now().Add(-24 * time.Hour))
	}
	rng := rand.New(rand.NewPCG(1, uint64(len(w.name))))
	seen := map[string]int{}
	fromStore := 0
	for round := range rounds {
		now := time.Now()
		shake(t, rng, p, pool, ps, now)
		spec := randomRequest(rng, p, pool)

		var out Explanation
		key, hasKey := spec.firstKey(p)
		before := p.sessionEntry(key, now)
		p.explainRequest(ps, spec.build(), now, &out)
		if after := p.sessionEntry(key, now); hasKey && !sameEntry(before, after) {
			t.Fatalf("round %d: the lookup changed the table entry: %+v -> %+v", round, before, after)
		}
		if hasKey && before == nil && out.Decision == DecidedTable {
			fromStore++ // by another key, or by the shared store alone
		}

		r := spec.build()
		up := p.Select(pool, r, httptest.NewRecorder())
		vars := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
		o := vars[varDecision].(outcome)
		want := outcomes[o].lookup
		seen[want]++
		var got string
		if out.Upstream != nil {
			got = *out.Upstream
		}
		var chose string
		if up != nil {
			chose = up.Dial
		}
		if out.Decision != want || got != chose {
			t.Fatalf("round %d, request %s: the lookup says %s on %q, Select decided %s on %q\nreason: %s\nwalk: %+v",
				round, spec, out.Decision, got, want, chose, out.Reason, out.Walk)
		}
	}
	t.Logf("decisions: %v; %d by the table with no local entry for the first key", seen, fromStore)
	if w.redis && fromStore == 0 {
		t.Errorf("no round was decided by an entry only Redis had: the test did not reach the store's read")
	}
	for _, must := range []string{DecidedPin, DecidedRing, DecidedFailover, DecidedHold} {
		if seen[must] == 0 && !(must == DecidedPin && p.DisablePinCookie) {
			t.Errorf("no round decided %s: the test did not reach it (%v)", must, seen)
		}
	}
}

// shake changes the world a little, at random: a lifecycle state, an
// incident of trouble inside or past the hold, a slow-start ramp, a
// session in the table.
func shake(t *testing.T, rng *rand.Rand, p *Policy, pool reverseproxy.UpstreamPool, ps *poolState, now time.Time) {
	u := pool[rng.IntN(len(pool))]
	rec := healthcheck.Get(u.Dial)
	switch rng.IntN(8) {
	case 0:
		operate(t, u.Dial, []healthcheck.State{healthcheck.Up, healthcheck.Up, healthcheck.Draining, healthcheck.Maintenance}[rng.IntN(4)])
	case 1: // an incident that started 2s ago: inside a 10s hold
		rec.NoteTrouble(now.Add(-time.Hour), healthcheck.TroubleGap)
		rec.NoteTrouble(now.Add(-2*time.Second), healthcheck.TroubleGap)
	case 2: // an incident going on for 30s: past the hold
		rec.NoteTrouble(now.Add(-time.Hour), healthcheck.TroubleGap)
		for at := -30; at <= -2; at += 2 {
			rec.NoteTrouble(now.Add(time.Duration(at)*time.Second), healthcheck.TroubleGap)
		}
	case 3: // no incident: the next trouble starts one
		rec.NoteTrouble(now.Add(-time.Hour), healthcheck.TroubleGap)
	case 4: // back 20s ago, ramping under a 1 minute slow start; or long back
		if rng.IntN(2) == 0 {
			rec.MarkBack(now.Add(-20 * time.Second))
		} else {
			rec.MarkBack(now.Add(-24 * time.Hour))
		}
	default: // a session in the table
		key := keyHash([]string{"cookie", "header"}[rng.IntN(2)], fmt.Sprint(rng.IntN(40)))
		id := ps.Recs[rng.IntN(len(pool))].ID
		if p.Store != nil && p.Store.Kind == sessions.KindRedis && rng.IntN(2) == 0 {
			// Another instance's session: in Redis, not in this table.
			p.sessions.Learn(key, id, sessions.Now(), nil)
			p.table.Remove(p.sessions.Key(key))
			return
		}
		p.sessions.Remember([]uint64{key}, id, sessions.Now(), nil)
	}
}

// lookupRequest is a request the test sends to both.
type lookupRequest struct {
	sid, header string // key values, "" for none
	pin         string // a pin cookie "name=value", "" for none
	pinWhat     string
	retryOf     *reverseproxy.Upstream
	conn        string
	learning    bool // affinity_learn watches the response
}

func (s lookupRequest) String() string {
	retry := ""
	if s.retryOf != nil {
		retry = " retry of " + s.retryOf.Dial
	}
	return fmt.Sprintf("{sid %q header %q pin %s%s conn %s learning %v}", s.sid, s.header, s.pinWhat, retry, s.conn, s.learning)
}

func randomRequest(rng *rand.Rand, p *Policy, pool reverseproxy.UpstreamPool) lookupRequest {
	s := lookupRequest{conn: fmt.Sprintf("192.0.2.%d:%d", 1+rng.IntN(3), 1024+rng.IntN(60000)), pinWhat: "none", learning: rng.IntN(2) == 0}
	if rng.IntN(4) > 0 {
		s.sid = fmt.Sprint(rng.IntN(40))
	}
	if rng.IntN(3) == 0 {
		s.header = fmt.Sprint(rng.IntN(40))
	}
	if !p.DisablePinCookie && rng.IntN(3) > 0 {
		i := rng.IntN(len(pool))
		switch rng.IntN(5) {
		case 0:
			s.pin, s.pinWhat = pinAged(p, pool, i, staleAge(p)+30), "stale on "+pool[i].Dial
		case 1:
			s.pin, s.pinWhat = p.PinCookie+"=forged0123456789abcdef", "forged"
		default:
			s.pin, s.pinWhat = pinAged(p, pool, i, uint32(rng.IntN(60))), "fresh on "+pool[i].Dial
		}
	}
	if rng.IntN(4) == 0 {
		s.retryOf = pool[rng.IntN(len(pool))]
	}
	return s
}

// build makes the request afresh: Select writes its vars.
func (s lookupRequest) build() *http.Request {
	var cookies []string
	if s.sid != "" {
		cookies = append(cookies, "sid="+s.sid)
	}
	if s.pin != "" {
		cookies = append(cookies, s.pin)
	}
	r := newRequest(cookies...)
	r.RemoteAddr = s.conn
	if s.header != "" {
		r.Header.Set("X-Session", s.header)
	}
	vars := map[string]any{}
	if s.retryOf != nil {
		vars[triedVar] = s.retryOf
	}
	if s.learning {
		vars[learnVar] = &learnWriter{}
	}
	return r.WithContext(context.WithValue(r.Context(), caddyhttp.VarsCtxKey, vars))
}

// firstKey returns the hash of the request's first key, if it has one.
func (s lookupRequest) firstKey(p *Policy) (uint64, bool) {
	r := s.build()
	for i := range p.Keys {
		if h, ok := p.Keys[i].Hash(r); ok {
			return h, true
		}
	}
	return 0, false
}

func sameEntry(a, b *SessionEntry) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Upstream == b.Upstream && a.ExpiresIn == b.ExpiresIn
}

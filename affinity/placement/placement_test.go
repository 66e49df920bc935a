package placement

import (
	"fmt"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-affinity/caddy-affinity/hashring"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// loads are live sessions by healthcheck ID.
type loads map[uint32]int64

func (l loads) Sessions(id uint32, _ string) int64 { return l[id] }

// testPool returns a pool of n upstreams of weight 1, with addresses of
// the test's own so that no state leaks between tests.
func testPool(t *testing.T, n int) *Pool {
	t.Helper()
	pl := &Pool{Weights: make([]int, n)}
	var members []hashring.Member
	for i := range n {
		dial := fmt.Sprintf("%s-u%d:80", t.Name(), i)
		pl.Ups = append(pl.Ups, &reverseproxy.Upstream{Host: new(reverseproxy.Host), Dial: dial})
		pl.Recs = append(pl.Recs, healthcheck.Get(dial))
		pl.Member = append(pl.Member, i)
		pl.Weights[i] = 1
		members = append(members, hashring.Member{Name: dial, Weight: 1})
	}
	ring, err := hashring.New(members)
	if err != nil {
		t.Fatal(err)
	}
	pl.Ring = ring
	return pl
}

// With every upstream serving, a key goes to its ring owner, and the walk
// records that one step; the upstream that failed this request is passed
// over, and the walk says why.
func TestWalkPlacesOnTheRingOwner(t *testing.T) {
	pl := testPool(t, 4)
	for key := range uint64(200) {
		owner := pl.Member[pl.Ring.Lookup(key)]
		var steps []Step
		choice, fallback, skipped := pl.Walk(Rules{}, loads{}, key, -1, time.Time{}, &steps)
		if choice != owner || fallback != healthcheck.Serves || skipped != (Skips{}) ||
			len(steps) != 1 || steps[0] != (Step{Upstream: owner, Why: healthcheck.Serves}) {
			t.Fatalf("key %d: chose %d (%v, %+v), steps %+v; want the owner %d in one step", key, choice, fallback, skipped, steps, owner)
		}
		steps = steps[:0]
		choice, _, _ = pl.Walk(Rules{}, loads{}, key, owner, time.Time{}, &steps)
		if choice < 0 || choice == owner || len(steps) != 2 || steps[0] != (Step{Upstream: owner, Why: healthcheck.Failed}) {
			t.Fatalf("key %d with its owner failed: chose %d, steps %+v", key, choice, steps)
		}
	}
}

// Under balance_factor an upstream at its bound declines and the walk
// goes on; when every candidate is at its bound (loads that changed
// during the walk), the first that declined for load takes it.
func TestWalkBoundsLoads(t *testing.T) {
	pl := testPool(t, 3)
	rules := Rules{BalanceFactor: 1.25}
	key := uint64(7)
	owner := pl.Member[pl.Ring.Lookup(key)]
	l := loads{pl.Recs[owner].ID: 10}
	choice, fallback, skipped := pl.Walk(rules, l, key, -1, time.Time{}, nil)
	if choice < 0 || choice == owner || fallback != healthcheck.Serves || !skipped.Load {
		t.Fatalf("an owner over its bound: chose %d (%v, %+v), want another upstream, skipped for load", choice, fallback, skipped)
	}
	if a := testing.AllocsPerRun(100, func() { pl.Walk(rules, l, key, -1, time.Time{}, nil) }); a != 0 {
		t.Fatalf("a walk without steps allocated %v times", a)
	}
}

// rampAccepts takes a share of the keys that grows with the time back,
// the same for every instance.
func TestRampAcceptsItsShare(t *testing.T) {
	const n = 20000
	for _, frac := range []float64{0, 0.25, 0.5, 1} {
		back := time.Duration(frac * float64(time.Minute))
		took := 0
		for key := range uint64(n) {
			if rampAccepts(back, time.Minute, key*0x9E3779B97F4A7C15, 1) {
				took++
			}
		}
		if got := float64(took) / n; got < frac-0.02 || got > frac+0.02 {
			t.Errorf("back for %s of a minute: took %.3f of the keys, want %.2f", back, got, frac)
		}
	}
}

// Package placement places a new session on an upstream: the walk along
// the consistent-hash ring from the session's key to the first upstream
// that may take it, under balance_factor (bounded loads) and slow_start
// (a ramped share). It is beneath the policy: it reads a pool, the
// policy's two placement options and the live sessions per upstream,
// and knows nothing of pins, keys or the order of precedence.
package placement

import (
	"math"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-affinity/caddy-affinity/hashring"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// Pool is what a placement reads of one upstream pool, index-aligned
// with Caddy's pool (the policy derives it once per pool).
type Pool struct {
	Ups  []*reverseproxy.Upstream
	Recs []*healthcheck.Upstream
	Ring *hashring.Ring
	// Member is the pool position of each ring member. An address listed
	// several times (weighting by repetition, DNS or SRV answers that
	// repeat one) is one member, at its first position, whose weight is
	// the sum of its repetitions' weights.
	Member []int
	// Weights are the ring members' weights, by pool position (for
	// balance_factor): a repeated address's total at every position.
	Weights []int
}

// Rules are the policy's placement options: BalanceFactor bounds the
// load of new sessions (0: off), SlowStart ramps a recovered upstream's
// share of them (0: off).
type Rules struct {
	BalanceFactor float64
	SlowStart     time.Duration
}

// Loads counts the live sessions on an upstream, by its healthcheck ID
// and dial address (the session store: this instance's, or the
// cluster's with a shared store).
type Loads interface {
	Sessions(id uint32, dial string) int64
}

// Step is one upstream the ring walk visited and its verdict for a new
// session (Serves: it took it).
type Step struct {
	Upstream int
	Why      healthcheck.Verdict
}

// Skips says which kinds of upstream a ring walk passed over, for the
// metrics: for their lifecycle state, or their balance_factor bound.
type Skips struct{ State, Load bool }

// Walk walks the ring from key to the first upstream that may take a new
// session. Under balance_factor, an upstream at its bound of live
// sessions declines (AtBound); under slow_start, an upstream that came
// back recently accepts only its ramped share of the keys that reach it
// (Ramping). If every candidate declined, the first that declined by
// ramp, else by load, takes the session anyway (the load bound always
// leaves room on some candidate, so the latter needs loads that changed
// during the walk); fallback then says which, else it is Serves. When
// steps is not nil, every upstream visited is appended to it with its
// verdict (the lookup prints them; Select passes nil and allocates
// nothing). failed is the upstream whose attempt of this request failed,
// or -1; now matters only under slow_start.
func (pl *Pool) Walk(rules Rules, loads Loads, key uint64, failed int, now time.Time, steps *[]Step) (choice int, fallback healthcheck.Verdict, skipped Skips) {
	choice, ramped, loaded := -1, -1, -1
	bound := loadBound{total: -1}
	if rules.BalanceFactor > 0 {
		bound = pl.loadBound(loads, failed)
	}
	pl.Ring.Walk(key, func(m int) bool {
		i := pl.Member[m]
		v := pl.Recs[i].ForNew(pl.Ups[i])
		switch {
		case i == failed:
			v = healthcheck.Failed
		case v == healthcheck.Down || v == healthcheck.Full:
		case v != healthcheck.Serves:
			skipped.State = true
		case bound.total >= 0 && pl.overloaded(rules.BalanceFactor, loads, i, bound):
			v, skipped.Load = healthcheck.AtBound, true
			if loaded < 0 {
				loaded = i
			}
		case rules.SlowStart > 0 && !rampAccepts(pl.Recs[i].BackFor(now), rules.SlowStart, key, i):
			v = healthcheck.Ramping
			if ramped < 0 {
				ramped = i
			}
		default:
			choice = i
		}
		if steps != nil {
			*steps = append(*steps, Step{Upstream: i, Why: v})
		}
		return v != healthcheck.Serves
	})
	switch {
	case choice >= 0:
		return choice, healthcheck.Serves, skipped
	case ramped >= 0:
		return ramped, healthcheck.Ramping, skipped
	case loaded >= 0:
		return loaded, healthcheck.AtBound, skipped
	}
	return -1, healthcheck.Serves, skipped
}

// SessionsOn returns the live sessions balance_factor counts on upstream
// i: the session table's, exact; with a shared store the cluster's (this
// instance's placements exact, the other instances' as read about a
// second ago), so that instances that each place a share of the
// sessions bound the cluster-wide loads.
func (pl *Pool) SessionsOn(loads Loads, i int) int64 {
	return loads.Sessions(pl.Recs[i].ID, pl.Ups[i].Dial)
}

// loadBound is what balance_factor needs to know of a pool for one
// placement: the live sessions and the weight of the upstreams that may
// take new sessions. total is -1 when loads are not bounded.
type loadBound struct {
	total  int64
	weight int64
}

// loadBound sums the live sessions and weights of the upstreams that
// may take a new session now (all but failed).
func (pl *Pool) loadBound(loads Loads, failed int) loadBound {
	b := loadBound{}
	for _, i := range pl.Member {
		w := pl.Weights[i]
		if i == failed || w <= 0 || pl.Recs[i].ForNew(pl.Ups[i]) != healthcheck.Serves {
			continue
		}
		b.total += pl.SessionsOn(loads, i)
		b.weight += int64(w)
	}
	if b.weight == 0 {
		b.total = -1
	}
	return b
}

// overloaded reports whether upstream i holds its bound already, so
// that it may not take one more session: ceil(c × (total+1) × w/W) live
// sessions, where total and W are the candidates' live sessions and
// weights, and the session being placed is counted in. A placement thus
// never leaves an upstream with more than ceil(c × average) sessions (by
// weight), and some candidate always has room: the bounds add up to at
// least c × (total+1), more than the total.
func (pl *Pool) overloaded(factor float64, loads Loads, i int, b loadBound) bool {
	w := pl.Weights[i]
	if w <= 0 {
		return false // not a candidate; the ring gives it no keys
	}
	limit := math.Ceil(factor * float64(b.total+1) * float64(w) / float64(b.weight))
	return float64(pl.SessionsOn(loads, i)) >= limit
}

// rampAccepts reports whether an upstream that came back `back` ago takes
// a key under a ramp of length ramp. The draw is derived from the key and
// the upstream, so every instance decides alike for the same key.
func rampAccepts(back, ramp time.Duration, key uint64, i int) bool {
	if back >= ramp {
		return true
	}
	if back <= 0 {
		return false
	}
	draw := hashring.HashSeed(nil, key^uint64(i)*0x9E3779B97F4A7C15) >> 11 // 53 bits
	return float64(draw)/(1<<53) < float64(back)/float64(ramp)
}

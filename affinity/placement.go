package affinity

import (
	"math"
	"time"

	"github.com/caddy-affinity/caddy-affinity/hashring"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// walkStep is one upstream the ring walk visited and its verdict for a
// new session (Serves: it took it).
type walkStep struct {
	upstream int
	why      healthcheck.Verdict
}

// walkSkips says which kinds of upstream a ring walk passed over, for
// the metrics: for their lifecycle state, or their balance_factor bound.
type walkSkips struct{ state, load bool }

// walkPlacement walks the ring from key to the first upstream that may
// take a new session. Under balance_factor, an upstream at its bound of
// live sessions declines (AtBound); under slow_start, an upstream that
// came back recently accepts only its ramped share of the keys that
// reach it (Ramping). If every candidate declined, the first that
// declined by ramp, else by load, takes the session anyway (the load
// bound always leaves room on some candidate, so the latter needs loads
// that changed during the walk); fallback then says which, else it is
// Serves. When steps is not nil, every upstream visited is appended to
// it with its verdict (the lookup prints them; Select passes nil and
// allocates nothing). now matters only under slow_start.
func (p *Policy) walkPlacement(ps *poolState, key uint64, failed int, now time.Time, steps *[]walkStep) (choice int, fallback healthcheck.Verdict, skipped walkSkips) {
	choice, ramped, loaded := -1, -1, -1
	bound := loadBound{total: -1}
	if p.BalanceFactor > 0 {
		bound = p.loadBound(ps, failed)
	}
	ps.ring.Walk(key, func(m int) bool {
		i := ps.member[m]
		v := ps.recs[i].ForNew(ps.ups[i])
		switch {
		case i == failed:
			v = healthcheck.Failed
		case v == healthcheck.Down || v == healthcheck.Full:
		case v != healthcheck.Serves:
			skipped.state = true
		case bound.total >= 0 && p.overloaded(ps, i, bound):
			v, skipped.load = healthcheck.AtBound, true
			if loaded < 0 {
				loaded = i
			}
		case p.SlowStart > 0 && !rampAccepts(ps.recs[i].BackFor(now), time.Duration(p.SlowStart), key, i):
			v = healthcheck.Ramping
			if ramped < 0 {
				ramped = i
			}
		default:
			choice = i
		}
		if steps != nil {
			*steps = append(*steps, walkStep{upstream: i, why: v})
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

// loadBound is what balance_factor needs to know of a pool for one
// placement: the live sessions and the weight of the upstreams that may
// take new sessions. total is -1 when loads are not bounded.
type loadBound struct {
	total  int64
	weight int64
}

// loadBound sums the live sessions (sessionsOn) and weights of the
// upstreams that may take a new session now (all but failed).
func (p *Policy) loadBound(ps *poolState, failed int) loadBound {
	b := loadBound{}
	for _, i := range ps.member {
		w := ps.weights[i]
		if i == failed || w <= 0 || ps.recs[i].ForNew(ps.ups[i]) != healthcheck.Serves {
			continue
		}
		b.total += p.sessionsOn(ps, i)
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
func (p *Policy) overloaded(ps *poolState, i int, b loadBound) bool {
	w := ps.weights[i]
	if w <= 0 {
		return false // not a candidate; the ring gives it no keys
	}
	limit := math.Ceil(p.BalanceFactor * float64(b.total+1) * float64(w) / float64(b.weight))
	return float64(p.sessionsOn(ps, i)) >= limit
}

// sessionsOn returns the live sessions balance_factor counts on upstream
// i: the session table's, exact; with a shared store the cluster's (this
// instance's placements exact, the other instances' as read about a
// second ago), so that instances that each place a share of the
// sessions bound the cluster-wide loads.
func (p *Policy) sessionsOn(ps *poolState, i int) int64 {
	return p.sessions.Sessions(ps.recs[i].ID, ps.ups[i].Dial)
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

package affinity

import (
	"math"
	"net/http"
	"time"

	"github.com/caddy-affinity/caddy-affinity/hashring"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// decline says why a placement walk passes over an upstream.
type decline uint8

const (
	accepts      decline = iota // takes the session
	declineDown                 // failed this request, or Caddy says unavailable
	declineState                // draining or maintenance
	declineLoad                 // at its balance_factor bound
	declineRamp                 // in slow start, and this key is not in its share
)

// walkPlacement walks the ring from key to the first upstream that may
// take a new session, calling step for every upstream it visits with why
// it passed over it (or accepts). Under balance_factor, an upstream at its
// bound of live sessions declines; under slow_start, an upstream that came
// back recently accepts only its ramped share of the keys that reach it.
// If every candidate declined, the first that declined by ramp, else by
// load, takes the session anyway (the load bound always leaves room on
// some candidate, so the latter needs loads that changed during the walk);
// fallback then says which. now matters only under slow_start. Both
// Select and the lookup endpoint place through here, so they agree.
func (p *Policy) walkPlacement(ps *poolState, key uint64, failed int, now time.Time, step func(i int, d decline)) (choice int, fallback decline) {
	choice, ramped, loaded := -1, -1, -1
	bound := loadBound{total: -1}
	if p.BalanceFactor > 0 {
		bound = p.loadBound(ps, failed)
	}
	ps.ring.Walk(key, func(m int) bool {
		i := ps.member[m]
		d := accepts
		v := ps.recs[i].ForNew(ps.ups[i])
		switch {
		case i == failed || v == healthcheck.Down || v == healthcheck.Full:
			d = declineDown
		case v != healthcheck.Serves:
			d = declineState
		case bound.total >= 0 && p.overloaded(ps, i, bound):
			d = declineLoad
			if loaded < 0 {
				loaded = i
			}
		case p.SlowStart > 0 && !rampAccepts(ps.recs[i].BackFor(now), time.Duration(p.SlowStart), key, i):
			d = declineRamp
			if ramped < 0 {
				ramped = i
			}
		default:
			choice = i
		}
		step(i, d)
		return d != accepts
	})
	switch {
	case choice >= 0:
		return choice, accepts
	case ramped >= 0:
		return ramped, declineRamp
	case loaded >= 0:
		return loaded, declineLoad
	}
	return -1, accepts
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

// routeIndex returns the upstream a request's Tomcat route names, or -1:
// the first session id among the cookie and path_param keys that ends in
// a configured route.
func (p *Policy) routeIndex(ps *poolState, r *http.Request) int {
	for i := range p.Keys {
		k := &p.Keys[i]
		if !k.kind.tomcatRoute {
			continue
		}
		id, ok := k.value(r)
		if !ok {
			continue
		}
		route, ok := routeSuffix(id)
		if !ok {
			continue
		}
		for _, rt := range ps.routes {
			if rt.route == route {
				return rt.index
			}
		}
	}
	return -1
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

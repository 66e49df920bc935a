package affinity

import (
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"

	"github.com/caddy-affinity/caddy-affinity/hashring"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"

	"github.com/caddy-affinity/caddy-affinity/affinity/pin"
	"github.com/caddy-affinity/caddy-affinity/affinity/placement"
	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// poolState is what the policy derives from one upstream pool: the ring
// and the lifecycle records (what placement reads), the pin tokens and
// the routes, index-aligned with the pool.
type poolState struct {
	// first is the address of the first element of the pool this state
	// was derived from: Caddy passes the same slice on every request for
	// static upstreams, so one comparison recognises it.
	first **reverseproxy.Upstream
	placement.Pool
	// pins issues and checks the pool's pin cookies; nil with the pin
	// cookie off.
	pins *pin.Signer
	// routes are the tomcat_route lines whose upstream is in the pool.
	routes []poolRoute
	// removed are the pins of the upstreams this proxy's previous pool had
	// and this one has not (a reload or a change of dynamic upstreams
	// removed them), so that their sessions move as failovers rather than
	// counting as forged pins.
	removed []removedPin
}

// removedPin is the pin of an upstream a pool no longer has.
type removedPin struct {
	dial  string
	token pin.Token
}

// poolRoute is a tomcat_route whose upstream is at index in the pool.
type poolRoute struct {
	route string
	index int
}

// poolState returns the derived state for pool, rebuilding it only when
// the pool's addresses changed.
func (p *Policy) poolState(pool reverseproxy.UpstreamPool) *poolState {
	if len(pool) == 0 {
		return nil
	}
	ps := p.pools.Load()
	if ps != nil && ps.first == &pool[0] && len(pool) == len(ps.Ups) {
		return ps
	}
	if ps != nil && ps.samePointers(pool) {
		return ps
	}
	if ps != nil && sameDials(ps.Ups, pool) {
		// Dynamic upstreams come as new values for the same addresses:
		// the ring and pins depend on addresses only, so keep them.
		cp := *ps
		cp.Ups = append([]*reverseproxy.Upstream(nil), pool...)
		cp.first = &pool[0]
		p.pools.Store(&cp)
		return &cp
	}
	p.resolveScope(sessions.Now())
	ps, err := p.buildPoolState(pool)
	if err != nil {
		p.logger.Error("cannot build the upstream ring", zap.Error(err))
		return nil
	}
	p.pools.Store(ps)
	return ps
}

func (ps *poolState) samePointers(pool reverseproxy.UpstreamPool) bool {
	if len(pool) != len(ps.Ups) {
		return false
	}
	for i, u := range pool {
		if u != ps.Ups[i] {
			return false
		}
	}
	return true
}

// sameDials reports whether two pools list the same addresses in the
// same order.
func sameDials(a, b reverseproxy.UpstreamPool) bool {
	if len(a) != len(b) {
		return false
	}
	for i, u := range a {
		if u.Dial != b[i].Dial {
			return false
		}
	}
	return true
}

func (p *Policy) buildPoolState(pool reverseproxy.UpstreamPool) (*poolState, error) {
	ps := &poolState{
		first: &pool[0],
		Pool: placement.Pool{
			Ups:     append([]*reverseproxy.Upstream(nil), pool...),
			Recs:    make([]*healthcheck.Upstream, len(pool)),
			Weights: make([]int, len(pool)),
		},
	}
	healthcheck.NoteAdded(pool, time.Now())
	var members []hashring.Member
	memberAt := make(map[string]int, len(pool)) // dial -> member
	for i, u := range pool {
		ps.Recs[i] = healthcheck.Get(u.Dial)
		weight := 1
		if i < len(p.Weights) {
			weight = p.Weights[i]
		}
		if m, seen := memberAt[u.Dial]; seen {
			members[m].Weight += weight
		} else {
			memberAt[u.Dial] = len(members)
			members = append(members, hashring.Member{Name: u.Dial, Weight: weight})
			ps.Member = append(ps.Member, i)
		}
	}
	if p.secret != nil {
		dials := make([]string, len(pool))
		for i, u := range pool {
			dials[i] = u.Dial
		}
		ps.pins = pin.NewSigner(p.secret, p.previousSecrets, p.PinCookie, p.ttl, p.pinStyle, dials)
	}
	for i, u := range pool {
		ps.Weights[i] = members[memberAt[u.Dial]].Weight
	}
	if len(p.Weights) > len(pool) {
		p.tellWeights(len(pool))
	} else if len(p.Weights) > 0 && len(p.Weights) != len(pool) {
		// The Caddyfile parser never sees the upstream list, so this is
		// the first place a mismatch can be told.
		p.logger.Warn("weights do not match the upstreams: missing weights count as 1, extra ones are ignored",
			zap.Int("weights", len(p.Weights)), zap.Int("upstreams", len(pool)))
	}
	for route, dial := range p.TomcatRoutes {
		found := false
		for i, u := range pool {
			if u.Dial == dial {
				ps.routes = append(ps.routes, poolRoute{route: route, index: i})
				found = true
				break
			}
		}
		if !found {
			p.logger.Warn("tomcat_route names an upstream that is not in the list; the route is ignored",
				zap.String("route", route), zap.String("upstream", dial))
		}
	}
	ring, err := hashring.New(members)
	if err != nil {
		return nil, err
	}
	ps.Ring = ring
	if p.farm != nil && p.secret != nil {
		for _, dial := range p.farm.replaceDials(p.sessions.Scope(), pool) {
			if ps.has(dial) {
				continue
			}
			// Its sessions may carry pins of a previous secret too.
			ps.removed = append(ps.removed, removedPin{dial: dial, token: pin.NewToken(p.secret, dial)})
			for _, secret := range p.previousSecrets {
				ps.removed = append(ps.removed, removedPin{dial: dial, token: pin.NewToken(secret, dial)})
			}
		}
	}
	return ps, nil
}

// has reports whether the pool has the upstream dialled at dial.
func (ps *poolState) has(dial string) bool {
	for _, u := range ps.Ups {
		if u.Dial == dial {
			return true
		}
	}
	return false
}

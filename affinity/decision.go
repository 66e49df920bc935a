package affinity

import (
	weakrand "math/rand/v2"
	"net/http"
	"time"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// source is a place the policy asks where a session goes, in the order
// of precedence decide asks them.
type source uint8

const (
	// fromRoute: the app's own pin, a session id whose Tomcat route names
	// a worker (tomcat_route).
	fromRoute source = iota + 1
	// fromPin: the proxy's own signed pin cookie.
	fromPin
	// fromTable: the session table, by the first of the request's keys
	// that has a live entry.
	fromTable
	// fromRing: a new session (or one whose upstream cannot serve it),
	// placed by the ring walk.
	fromRing
)

// ask is one source decide asked that named an upstream: which, and the
// verdict on it for a pinned session (Serves if it was chosen).
type ask struct {
	from     source
	upstream int
	verdict  healthcheck.Verdict
}

// decision is what the policy decides for one request: the sources it
// asked in order, what each named and why it was passed over, and what
// was chosen. decide computes it; Select acts on it (metrics, the table,
// the pin cookie, the failover log) and the lookup endpoint explains it.
// It is a value on the stack: deciding allocates nothing.
type decision struct {
	asked  [3]ask // at most one per pinning source: route, pin, table
	nasked int

	// chosen is the upstream's index in the pool, or -1 when no
	// upstream may take the request now; by is the source that chose.
	chosen int
	by     source
	// held is set when the session waits for its pinned upstream under
	// `hold` (chosen is then that upstream, or -1 when it is full).
	held bool
	// pinned is the upstream a valid pin cookie names, or -1;
	// pinRejected is set for a pin cookie that is present but not valid.
	pinned      int
	pinRejected bool
	// failed is the upstream whose attempt of this very request failed
	// (a retry), or -1.
	failed int
	// randomKey is set when the ring placed the request by a random key
	// (it carried no key: a first visit).
	randomKey bool
	// skippedState and skippedLoad are set when the ring walk passed
	// over upstreams for their lifecycle state or balance_factor bound.
	skippedState, skippedLoad bool
}

// decideInput is what decide reads besides the request.
type decideInput struct {
	keys []uint64 // the request's key hashes, in configured order
	kind *keyKind // the kind of keys[0], nil if none
	// failed is the upstream whose attempt of this request failed, or -1.
	failed int
	// learning is set when affinity_learn watches the response.
	learning bool
	// now is the table clock; wall the wall clock when the caller has
	// it (zero: read it only when hold or slow_start need it).
	now  uint32
	wall time.Time
	// dry is set for explanations: nothing is slid, noted or counted.
	dry bool
	// walk, if not nil, is told every upstream the ring walk visits.
	walk func(i int, d decline)
}

// left returns the upstream the session leaves and why: the first source
// asked that named an upstream which could not serve it, else the
// upstream that failed this request; -1 for a session that had none (a
// new one).
func (d *decision) left() (int, healthcheck.Verdict) {
	for _, a := range d.asked[:d.nasked] {
		if a.verdict != healthcheck.Serves {
			return a.upstream, a.verdict
		}
	}
	return d.failed, healthcheck.Failed
}

// failover reports whether the ring placed a session that had an upstream
// on another one.
func (d *decision) failover() bool {
	from, _ := d.left()
	return d.by == fromRing && !d.held && d.chosen >= 0 && from >= 0 && from != d.chosen
}

// decide computes the decision for request r, whose pool state is ps.
// The order of precedence lives here, and only here: the app's Tomcat
// route, the pin cookie, the session table, then the ring. A source that
// names an upstream which may serve a pinned session wins; one that
// cannot serve it holds the session under `hold`, or is passed over.
func (p *Policy) decide(ps *poolState, r *http.Request, in *decideInput, d *decision) {
	*d = decision{chosen: -1, pinned: -1, failed: in.failed}
	if !p.DisablePinCookie {
		if v, ok := cookieValue(r.Header, p.PinCookie); ok {
			d.pinned = ps.pinIndex(v)
			d.pinRejected = d.pinned < 0
		}
	}
	if len(ps.routes) > 0 {
		if i := p.routeIndex(ps, r); i >= 0 && p.settle(ps, in, d, fromRoute, i) {
			return
		}
	}
	if d.pinned >= 0 && p.settle(ps, in, d, fromPin, d.pinned) {
		return
	}
	if i := p.tableEntry(ps, in); i >= 0 && p.settle(ps, in, d, fromTable, i) {
		return
	}
	p.placeOnRing(ps, in, d)
}

// settle asks about a session pinned to upstream i by source from. It
// reports whether that decides the request: i serves it, or the session
// waits for i under `hold`.
func (p *Policy) settle(ps *poolState, in *decideInput, d *decision, from source, i int) bool {
	v := ps.recs[i].ForPinned(ps.ups[i])
	if i == in.failed {
		v = healthcheck.Failed
	}
	d.asked[d.nasked] = ask{from: from, upstream: i, verdict: v}
	d.nasked++
	if v == healthcheck.Serves {
		d.chosen, d.by = i, from
		return true
	}
	if !p.holds(ps.recs[i], in) {
		return false
	}
	d.by, d.held = from, true
	// Within the hold, try the upstream itself (Caddy waits
	// lb_try_interval between attempts) whatever the health checks say:
	// they lag a restart both ways, and passive checks keep a recovered
	// upstream down for their whole fail_duration. Busy is not down.
	if !ps.ups[i].Full() {
		d.chosen = i
	}
	return true
}

// holds reports whether a session pinned to rec, which cannot serve it,
// waits for it under `hold`.
func (p *Policy) holds(rec *healthcheck.Upstream, in *decideInput) bool {
	hold := time.Duration(p.Hold)
	if hold <= 0 {
		return false
	}
	if in.dry {
		return rec.WouldHold(hold)
	}
	return rec.Holds(in.wallNow(), hold)
}

// tableEntry returns the upstream the session table names for the first
// of the request's keys that has a live entry in this pool, or -1.
//
// A session's keys change over its life (the first request has no app
// cookie yet and is known by its client IP; an app may rotate its
// session id), so every present key is tried. An alias entry (recorded
// under a key that was not its request's first, such as the client IP
// next to an app cookie) is what carries a session over to the new id its
// app issues. Under affinity_learn the learner records those ids as they
// are issued, so an unknown app session id is not one of them: it is then
// placed on its own rather than sent after an alias, which many users
// behind one address (NAT) share.
func (p *Policy) tableEntry(ps *poolState, in *decideInput) int {
	if p.table == nil {
		return -1
	}
	laterAliases := !in.learning || !in.kind.learnable()
	var ttl uint32
	if !in.dry {
		ttl = p.ttl // slide the entry
	}
	for j, key := range in.keys {
		id, ok := p.followScoped(key, in, ttl, j == 0 || laterAliases)
		if !ok {
			continue
		}
		if i := ps.indexByID(id); i >= 0 {
			return i
		}
		// An upstream this pool does not have: try the next key.
	}
	if p.remote != nil && !in.dry && len(in.keys) > 0 {
		// Unknown here: another instance may know it (one round trip).
		return p.fetchRemote(ps, in, laterAliases)
	}
	return -1
}

// followScoped follows key in the policy's namespace. On a miss it also
// looks in the shared one, where entries written before the scope was
// resolved are (the moment of a reload), and moves what it finds into the
// policy's namespace, so that the session counts once.
func (p *Policy) followScoped(key uint64, in *decideInput, ttl uint32, aliases bool) (uint32, bool) {
	id, ok := p.table.follow(p.tableKey(key), in.now, ttl, aliases)
	if ok || p.scope.Load() == 0 {
		return id, ok
	}
	e, ok := p.table.peek(key, in.now)
	if !ok || (!aliases && e.alias()) {
		return 0, false
	}
	if !in.dry {
		p.table.remove(key)
		p.table.put(p.tableKey(key), e.up, in.now, p.ttl)
	}
	return e.upstream(), true
}

// placeOnRing places the request on the ring by its first key; a new
// session with no key yet is placed by a random one (uniformly over ring
// slots, so weights hold), which is not remembered.
func (p *Policy) placeOnRing(ps *poolState, in *decideInput, d *decision) {
	d.by = fromRing
	key := uint64(0)
	if len(in.keys) > 0 {
		key = in.keys[0]
	} else {
		key, d.randomKey = weakrand.Uint64(), true
	}
	var now time.Time
	if p.SlowStart > 0 {
		now = in.wallNow()
	}
	choice, _ := p.walkPlacement(ps, key, in.failed, now, func(i int, dc decline) {
		switch dc {
		case declineState:
			d.skippedState = true
		case declineLoad:
			d.skippedLoad = true
		}
		if in.walk != nil {
			in.walk(i, dc)
		}
	})
	// A retry goes back to the upstream that failed when nothing else
	// may take the request and Caddy still calls it available (a single
	// backend, or the others draining mid rolling deploy), as Caddy's own
	// policies would: within lb_try_duration it may answer.
	if choice < 0 && in.failed >= 0 && p.mayRetry(ps, d, in.failed) {
		choice = in.failed
	}
	d.chosen = choice
}

// mayRetry reports whether the upstream whose attempt failed may take the
// request again: as a pinned session's upstream if a source named it,
// else as a new session's.
func (p *Policy) mayRetry(ps *poolState, d *decision, failed int) bool {
	for _, a := range d.asked[:d.nasked] {
		if a.upstream == failed {
			return ps.recs[failed].ForPinned(ps.ups[failed]) == healthcheck.Serves
		}
	}
	return ps.recs[failed].ForNew(ps.ups[failed]) == healthcheck.Serves
}

// wallNow returns the wall clock, read once per decision at most.
func (in *decideInput) wallNow() time.Time {
	if in.wall.IsZero() {
		in.wall = time.Now()
	}
	return in.wall
}

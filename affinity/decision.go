package affinity

import (
	weakrand "math/rand/v2"
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-affinity/caddy-affinity/hashring"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/pin"
	"github.com/caddy-affinity/caddy-affinity/affinity/placement"
	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
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
	// stale is set for a pin cookie not honoured because its session has
	// ended and the upstream takes no new sessions freely (gate says
	// why): the request is a new session, not one that leaves.
	stale bool
	// gate is why the upstream takes no new sessions freely (see
	// Policy.gate), Serves if it does.
	gate healthcheck.Verdict
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
	// pinRejected is set for a pin cookie that is present but not valid
	// (or whose time was forged). pin is the pin cookie, decoded.
	pinned      int
	pinRejected bool
	pin         pin.Decoded
	// pinStale is set when the pin was not honoured because its session
	// has ended (see settle); pinRefresh when the pin, though it names
	// the upstream chosen, is to be issued again: a v1 pin, or one older
	// than the refresh interval.
	pinStale, pinRefresh bool
	// failed is the upstream whose attempt of this very request failed
	// (a retry), or -1.
	failed int
	// gone is the dial address of the upstream the session was on (by
	// its pin or its table entry) that this pool no longer has: a reload
	// removed it. Empty if none.
	gone string
	// busy is the session's upstream when it was at max_requests (and
	// no hold applies), or -1: the request overflows to the ring once
	// and the session stays where it is. Busy is not down.
	busy int
	// randomKey is set when the ring placed the request by a random key
	// (it carried no key: a first visit).
	randomKey bool
	// skippedState and skippedLoad are set when the ring walk passed
	// over upstreams for their lifecycle state or balance_factor bound.
	skippedState, skippedLoad bool
	// fallback is Ramping or AtBound when every upstream the ring walk
	// visited declined and the first that declined for that reason took
	// the session anyway; Serves otherwise.
	fallback healthcheck.Verdict
	// walk is the ring walk's steps, when the input asked for them.
	walk []placement.Step
}

// decideInput is what decide reads besides the request.
type decideInput struct {
	keys  []uint64     // the request's key hashes, in configured order
	first *keys.Source // the source of keys[0], nil if none
	// conn identifies the request's connection (its remote address and
	// port): a request with no key is placed by it, so that the parallel
	// first requests of one connection (HTTP/2 streams, pipelining) land
	// together. Empty: placed at random.
	conn string
	// failed is the upstream whose attempt of this request failed, or -1.
	failed int
	// learning is set when affinity_learn watches the response.
	learning bool
	// now is the table clock; wall the wall clock when the caller has
	// it (zero: read it only when hold or slow_start need it).
	now  uint32
	wall time.Time
	// dry is set for the lookup: decide reads what Select reads (the
	// session store included) and writes nothing (no entry slides or
	// moves, no trouble is noted).
	dry bool
	// recordWalk is set when the decision is to keep the ring walk's
	// steps (the lookup: it allocates).
	recordWalk bool
	// budget is what the request may still wait for a shared session
	// store, in all.
	budget *sessions.Budget
}

// look decides where request r goes: what Select and the lookup
// endpoint both ask, so that they agree by construction. With in.dry it
// writes nothing (decide slides no entry and notes no trouble; warnings
// are Select's own, watchRequest); Select then acts on the decision, the
// lookup words it (Explain). It returns the source of the request's
// first key and whether the request is a retry. in comes and goes by
// value: through a pointer, the key hashes (in keyBuf) would go to the
// heap, and the pinned path allocates nothing.
func (p *Policy) look(ps *poolState, r *http.Request, vars map[string]any, in decideInput, keyBuf *[keys.Max]uint64, d *decision) (decideInput, *keys.Source, bool) {
	if p.sessions.Scope() == 0 {
		p.resolveScope(in.now)
	}
	// An upstream that failed this very request is not selectable on
	// the retry, even if Caddy's health checks have not caught up.
	prev, retry := vars[triedVar].(*reverseproxy.Upstream)
	if retry {
		in.failed = ps.index(prev)
	}
	_, in.learning = vars[learnVar].(*learnWriter)
	hashes, first := p.requestKeys(r, keyBuf, in.learning)
	in.keys, in.first = hashes, first
	in.conn = r.RemoteAddr
	p.decide(ps, r, &in, d)
	return in, first, retry
}

// index returns the position of up in the pool, or -1.
func (ps *poolState) index(up *reverseproxy.Upstream) int {
	for i, u := range ps.Ups {
		if u == up {
			return i
		}
	}
	if up != nil {
		for i, u := range ps.Ups {
			if u.Dial == up.Dial {
				return i
			}
		}
	}
	return -1
}

// requestKeys returns the hashes of the policy's keys present in the
// request and the source of the first (keys.Read).
//
// Under affinity_learn, a client_ip key is left out when the policy has a
// key the learner records: a request without the app's session id has
// no app session to stick to yet, and the address, which many users may
// share, must not pin it; such a request is placed like a new session,
// under the load bound.
func (p *Policy) requestKeys(r *http.Request, buf *[keys.Max]uint64, learning bool) ([]uint64, *keys.Source) {
	return keys.Read(r, p.Keys, learning && p.learns, buf)
}

// decide computes the decision for request r, whose pool state is ps.
// The order of precedence lives here, and only here: the app's Tomcat
// route, the pin cookie, the session table, then the ring. A source that
// names an upstream which may serve a pinned session wins; one that
// cannot serve it holds the session under `hold`, or is passed over.
func (p *Policy) decide(ps *poolState, r *http.Request, in *decideInput, d *decision) {
	*d = decision{chosen: -1, pinned: -1, failed: in.failed, busy: -1}
	if !p.DisablePinCookie {
		if v, ok := keys.CookieValue(r.Header, p.PinCookie); ok {
			d.pinned = ps.pinIndex(v, &d.pin)
			d.pinRejected = d.pinned < 0
			d.pinRefresh = d.pin.Due(in.now, p.ttl)
			if d.pinRejected {
				if d.gone = ps.removedPin(&d.pin); d.gone != "" {
					d.pinRejected = false // a real pin, of a session that must move
				}
			}
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
	if i := p.tableEntry(ps, in, d); i >= 0 && p.settle(ps, in, d, fromTable, i) {
		return
	}
	p.placeOnRing(ps, in, d)
}

// pinIndex returns the position of the upstream a pin cookie value names,
// or -1 if the value is not a valid pin for this pool (of the current
// secret or a previous one), and decodes it into pin. Its time is not
// checked here: only an upstream that takes no new sessions freely needs
// it (see settle).
func (ps *poolState) pinIndex(value string, dp *pin.Decoded) int {
	if !pin.Decode(value, dp) || ps.pins == nil {
		return -1
	}
	return ps.pins.Index(dp)
}

// removedPin returns the dial address of the removed upstream a pin
// names, or "".
func (ps *poolState) removedPin(dp *pin.Decoded) string {
	for i := range ps.removed {
		if ps.removed[i].token.Match(dp) {
			return ps.removed[i].dial
		}
	}
	return ""
}

// routeIndex returns the upstream a request's Tomcat route names, or -1:
// the first session id among the cookie and path_param keys that ends in
// a configured route.
func (p *Policy) routeIndex(ps *poolState, r *http.Request) int {
	for i := range p.Keys {
		k := &p.Keys[i]
		if !k.CarriesRoute() {
			continue
		}
		id, ok := k.Value(r)
		if !ok {
			continue
		}
		route, ok := keys.RouteSuffix(id)
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

// settle asks about a session pinned to upstream i by source from. It
// reports whether that decides the request: i serves it, or the session
// waits for i under `hold`.
func (p *Policy) settle(ps *poolState, in *decideInput, d *decision, from source, i int) bool {
	// A pin naming an upstream that takes no new sessions freely must be
	// a live session's; one that does serves pinned sessions too, so the
	// pinned path asks Caddy's verdict once, as before.
	g, v := healthcheck.Serves, healthcheck.Serves
	if from == fromPin {
		g = p.gate(ps, in, i)
	}
	if from != fromPin || g != healthcheck.Serves {
		v = ps.Recs[i].ForPinned(ps.Ups[i])
	}
	if g != healthcheck.Serves && !p.pinLive(ps, in, d, i) {
		if d.pinRejected {
			return false // a forged time: no pin at all
		}
		// The pin's session has ended: this request starts a new one,
		// which an upstream that takes none freely must not get by an
		// old pin. The table and the ring decide.
		d.asked[d.nasked] = ask{from: from, upstream: i, verdict: v, stale: true, gate: g}
		d.nasked++
		d.pinStale = true
		return false
	}
	if i == in.failed {
		v = healthcheck.Failed
	}
	d.asked[d.nasked] = ask{from: from, upstream: i, verdict: v}
	d.nasked++
	if v == healthcheck.Serves {
		d.chosen, d.by = i, from
		return true
	}
	if !p.holds(ps.Recs[i], in) {
		if v == healthcheck.Full && d.busy < 0 {
			d.busy = i
		}
		return false
	}
	d.by, d.held = from, true
	// Within the hold, try the upstream itself (Caddy waits
	// lb_try_interval between attempts) whatever the health checks say:
	// they lag a restart both ways, and passive checks keep a recovered
	// upstream down for their whole fail_duration. Busy is not down.
	if !ps.Ups[i].Full() {
		d.chosen = i
	}
	return true
}

// gate says whether upstream i takes new sessions freely now (Serves)
// and if not, why. A pin naming an upstream that does is honoured on its
// token alone: it can bring no session there that the ring could not.
func (p *Policy) gate(ps *poolState, in *decideInput, i int) healthcheck.Verdict {
	if i == in.failed {
		return healthcheck.Failed
	}
	if v := ps.Recs[i].ForNew(ps.Ups[i]); v != healthcheck.Serves {
		return v
	}
	switch {
	case ps.Weights[i] <= 0:
		return healthcheck.ZeroWeight
	case p.SlowStart > 0 && ps.Recs[i].BackFor(in.clockTime()) < time.Duration(p.SlowStart):
		return healthcheck.Ramping
	}
	return healthcheck.Serves
}

// pinLive reports whether the pin naming upstream i is a live session's,
// and this request's session (pin.Signer.Live: its age, its tag, its
// bind). A forged tag sets d.pinRejected.
func (p *Policy) pinLive(ps *poolState, in *decideInput, d *decision, i int) bool {
	live, forged := ps.pins.Live(i, &d.pin, in.now, p.ttl, p.pinUpgrade, in.keys)
	if forged {
		d.pinned, d.pinRejected = -1, true
	}
	return live
}

// holds reports whether a session pinned to rec, which cannot serve it,
// waits for it under `hold`.
func (p *Policy) holds(rec *healthcheck.Upstream, in *decideInput) bool {
	hold := time.Duration(p.Hold)
	if hold <= 0 {
		return false
	}
	if in.dry {
		return rec.WouldHold(in.wallNow(), hold)
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
func (p *Policy) tableEntry(ps *poolState, in *decideInput, d *decision) int {
	if p.sessions == nil {
		return -1
	}
	q := sessions.Query{
		Now:          in.now,
		Dry:          in.dry,
		LaterAliases: !in.learning || in.first == nil || !in.first.Learnable(),
		Budget:       in.budget,
	}
	chosen := -1
	p.sessions.Lookup(in.keys, q, func(id uint32) bool {
		if chosen = ps.indexByID(id); chosen >= 0 {
			return true
		}
		// An upstream this pool does not have (a reload removed it: the
		// table is per proxy): try the next key; the session moves.
		if u := healthcheck.ByID(id); u != nil && d.gone == "" {
			d.gone = u.Dial
		}
		return false
	})
	return chosen
}

// indexByID returns the position of the upstream with the given
// healthcheck ID, or -1.
func (ps *poolState) indexByID(id uint32) int {
	for i, rec := range ps.Recs {
		if rec.ID == id {
			return i
		}
	}
	return -1
}

// placeOnRing places the request on the ring by its first key; a new
// session with no key yet is placed by a random one (uniformly over ring
// slots, so weights hold), which is not remembered.
func (p *Policy) placeOnRing(ps *poolState, in *decideInput, d *decision) {
	d.by = fromRing
	var key uint64
	switch {
	case len(in.keys) > 0:
		key = in.keys[0]
	case in.conn != "":
		key = hashring.HashStringSeed(in.conn, keys.SeedConnection)
	default:
		key, d.randomKey = weakrand.Uint64(), true
	}
	var now time.Time
	if p.SlowStart > 0 {
		now = in.wallNow()
	}
	var steps *[]placement.Step
	if in.recordWalk {
		steps = &d.walk
	}
	choice, fallback, skipped := ps.Walk(p.placementRules(), p.sessions, key, in.failed, now, steps)
	d.skippedState, d.skippedLoad = skipped.State, skipped.Load
	d.fallback = fallback
	// A retry goes back to the upstream that failed when nothing else
	// may take the request and Caddy still calls it available (a single
	// backend, or the others draining mid rolling deploy), as Caddy's own
	// policies would: within lb_try_duration it may answer.
	if choice < 0 && in.failed >= 0 && p.mayRetry(ps, d, in.failed) {
		choice = in.failed
	}
	d.chosen = choice
}

// placementRules are the policy's options the ring walk applies.
func (p *Policy) placementRules() placement.Rules {
	return placement.Rules{BalanceFactor: p.BalanceFactor, SlowStart: time.Duration(p.SlowStart)}
}

// mayRetry reports whether the upstream whose attempt failed may take the
// request again: as a pinned session's upstream if a source named it,
// else as a new session's.
func (p *Policy) mayRetry(ps *poolState, d *decision, failed int) bool {
	for _, a := range d.asked[:d.nasked] {
		if a.upstream == failed && !a.stale {
			return ps.Recs[failed].ForPinned(ps.Ups[failed]) == healthcheck.Serves
		}
	}
	return ps.Recs[failed].ForNew(ps.Ups[failed]) == healthcheck.Serves
}

// clockTime returns the wall clock if the caller gave it, else the table
// clock as a time (to the second, and without a system call: the pinned
// path must stay as cheap as it is).
func (in *decideInput) clockTime() time.Time {
	if !in.wall.IsZero() {
		return in.wall
	}
	return time.Unix(sessions.Epoch+int64(in.now), 0)
}

// wallNow returns the wall clock, read once per decision at most.
func (in *decideInput) wallNow() time.Time {
	if in.wall.IsZero() {
		in.wall = time.Now()
	}
	return in.wall
}

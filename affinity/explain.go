package affinity

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"

	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// Decisions as the lookup endpoint names them.
const (
	DecidedRoute    = "tomcat_route"  // the session id's route names an upstream that may serve it
	DecidedPin      = "pin_cookie"    // a valid pin naming an upstream that may serve it
	DecidedTable    = "session_table" // the session table's entry, upstream may serve it
	DecidedRing     = "ring"          // a new session: placed by the ring walk
	DecidedFailover = "failover"      // its upstream cannot serve it: the ring walk places it anew
	DecidedHold     = "hold"          // its upstream is in trouble: requests wait under `hold`, then fail over
	DecidedOverflow = "overflow"      // its upstream is at max_requests: this request goes elsewhere once
	DecidedRandom   = "random"        // no session key: placed at random, like a first visit
	DecidedNone     = "none"          // no upstream may take it now
)

// Explanation is where one policy sends a request that carries a key,
// and why: the answer of GET /affinity/lookup for one proxy.
type Explanation struct {
	Site
	// Key is the policy's key the value was read as, e.g. "cookie
	// session_id"; "pin cookie caddy_affinity" for a pin.
	Key string `json:"key,omitempty"`
	// Upstream is where a request with the key goes now; null when it
	// goes nowhere (decision "none"), or nowhere fixed ("random").
	Upstream *string `json:"upstream"`
	// Decision is one of the Decided* values.
	Decision string `json:"decision"`
	// Reason explains the decision in a sentence.
	Reason string `json:"reason"`
	// Session is the session table's live entry for the key, if any.
	Session *SessionEntry `json:"session,omitempty"`
	// RingOwner is the upstream that owns the key on the ring: where a
	// new session with this key goes when every upstream may take it.
	RingOwner string `json:"ring_owner,omitempty"`
	// Walk is the ring walk from the owner to the upstream chosen, with
	// why each one before it was passed over; present when the ring
	// decided.
	Walk []WalkStep `json:"walk,omitempty"`
	// Error says why the key could not be looked up for this policy.
	Error string `json:"error,omitempty"`
}

// SessionEntry is a live session-table entry.
type SessionEntry struct {
	Upstream string `json:"upstream"`
	// ExpiresIn is the idle time left before the entry is forgotten, in
	// seconds; every request of the session slides it to session_ttl.
	ExpiresIn int64 `json:"expires_in_seconds"`

	id uint32 // the upstream's healthcheck ID
}

// WalkStep is one upstream on the ring walk.
type WalkStep struct {
	Upstream string `json:"upstream"`
	// Skipped says why the walk passed over it: a healthcheck.Verdict,
	// balance_factor or slow start.
	Skipped string `json:"skipped,omitempty"`
	// Chosen marks the upstream the walk stopped at.
	Chosen bool `json:"chosen,omitempty"`
	// Note says why an upstream was chosen though it declined.
	Note string `json:"note,omitempty"`
}

// Explain answers where the proxy at s sends a request carrying value
// and no pin cookie, and why, without changing anything a request would
// notice (no entry slides, no counter moves). source picks the policy's
// key of that kind (default: its first key) and name the one of that
// name; source "pin" reads value as a pin cookie. It asks decide, as
// Select does, with a request that carries the value where the key
// reads it, so that the two can never disagree.
func Explain(s Site, source, name, value string, now time.Time) Explanation {
	p := s.Policy
	out := Explanation{Site: s}
	ps, err := poolFor(s)
	if err != nil {
		out.Error = err.Error()
		return out
	}
	r := &http.Request{Method: http.MethodGet, URL: &url.URL{Path: "/"}, Header: http.Header{}}
	r = r.WithContext(context.Background())
	in := decideInput{failed: -1, now: sessions.Seconds(now), wall: now, dry: true}
	if source == "pin" {
		if p.DisablePinCookie {
			out.Error = "this proxy's pin cookie is off"
			return out
		}
		out.Key = "pin cookie " + p.PinCookie
		r.Header.Set("Cookie", p.PinCookie+"="+value)
	} else {
		k, err := p.keyFor(source, name)
		if err != nil {
			out.Error = err.Error()
			return out
		}
		out.Key = k.String()
		if err := k.kind.inject(k, r, value); err != nil {
			out.Error = err.Error()
			return out
		}
		hash, ok := k.hash(r)
		if !ok {
			out.Error = fmt.Sprintf("%q is not a value the key %s reads", value, out.Key)
			return out
		}
		in.keys, in.first = []uint64{hash}, k
		out.Session = p.sessionEntry(hash, now)
		if owner := ps.ring.Lookup(hash); owner >= 0 {
			out.RingOwner = ps.ups[ps.member[owner]].Dial
		}
	}
	var d decision
	var walk walkRecorder
	in.walk = walk.step
	p.decide(ps, r, &in, &d)
	if d.held {
		// Where it goes once the hold is over: the ring walk.
		p.placeOnRing(ps, &in, &decision{chosen: -1, pinned: -1, failed: -1})
	}
	p.explain(ps, &d, &walk, now, &out)
	return out
}

// sessionEntry returns the table's live entry for key, or nil.
func (p *Policy) sessionEntry(key uint64, now time.Time) *SessionEntry {
	if p.sessions == nil {
		return nil
	}
	e, ok := p.sessions.Peek(key, sessions.Seconds(now))
	if !ok {
		return nil
	}
	sess := &SessionEntry{ExpiresIn: int64(e.Expires()) - int64(sessions.Seconds(now)), id: e.Upstream()}
	if u := healthcheck.ByID(e.Upstream()); u != nil {
		sess.Upstream = u.Dial
	}
	return sess
}

// walkRecorder keeps the ring walk's steps, for the explanation.
type walkRecorder struct {
	visited []int
	why     []decline
}

func (w *walkRecorder) step(i int, d decline) {
	w.visited = append(w.visited, i)
	w.why = append(w.why, d)
}

// explain words decision d for an operator.
func (p *Policy) explain(ps *poolState, d *decision, walk *walkRecorder, now time.Time, out *Explanation) {
	var whys []string
	for _, a := range d.asked[:d.nasked] {
		whys = append(whys, p.askedWhy(ps, d, a, out.Session, now))
	}
	if out.Session != nil && (d.nasked == 0 || d.asked[d.nasked-1].from != fromTable) && ps.indexByID(out.Session.id) < 0 {
		whys = append(whys, fmt.Sprintf("the session table names %s, which this proxy no longer has (removed from its upstreams)", out.Session.Upstream))
	} else if d.gone != "" {
		whys = append(whys, fmt.Sprintf("a pin naming %s, which this proxy no longer has (removed from its upstreams)", d.gone))
	}
	if d.pinRejected {
		whys = append(whys, "not a valid pin for this proxy's upstreams (forged, its time forged, signed with another secret, or naming an upstream it no longer has): it is counted as a rejected pin")
	}
	why := strings.Join(whys, "; ")
	if d.by != fromRing && !d.held {
		out.Decision = map[source]string{fromRoute: DecidedRoute, fromPin: DecidedPin, fromTable: DecidedTable}[d.by]
		out.Upstream = strPtr(ps.ups[d.chosen].Dial)
		out.Reason = why
		if d.by == fromTable && out.RingOwner != "" && out.RingOwner != ps.ups[d.chosen].Dial {
			out.Reason += fmt.Sprintf("; the ring would place a new session on %s, but a session stays where it is", out.RingOwner)
		}
		return
	}
	choice := p.explainWalk(ps, walk, now, out)
	var to string
	switch {
	case choice < 0:
		to = "no upstream may take a new session now (down, full, draining or in maintenance): Caddy retries per lb_try_duration, then answers 502"
	case d.randomKey:
		to = "the request is placed like a new session, at random"
	default:
		to = "the ring walk places it on " + ps.ups[choice].Dial
		out.Upstream = strPtr(ps.ups[choice].Dial)
	}
	switch {
	case d.busy >= 0 && !d.held:
		out.Decision = DecidedOverflow
		out.Reason = fmt.Sprintf("%s; busy is not down: this request goes elsewhere once (%s), and the session stays on %s",
			why, to, ps.ups[d.busy].Dial)
	case d.held:
		out.Decision = DecidedHold
		out.Reason = fmt.Sprintf("%s; under hold %s its requests wait for it to come back, and once the hold is over %s",
			why, time.Duration(p.Hold), to)
	case hadUpstream(d):
		out.Decision = DecidedFailover
		out.Reason = fmt.Sprintf("%s: the session fails over, %s, and stays there", why, to)
	default:
		out.Decision = DecidedRing
		if d.randomKey {
			out.Decision = DecidedRandom
		}
		switch {
		case why != "":
			to = why + "; a new session: " + to
		case choice >= 0:
			to = "no live session for this key: a new session; " + to
		}
		out.Reason = to
	}
	if choice < 0 {
		out.Decision = DecidedNone
	}
}

// hadUpstream reports whether the session had an upstream it leaves.
func hadUpstream(d *decision) bool {
	from, _ := d.left()
	return from >= 0 || d.gone != ""
}

// askedWhy words what one source named.
func (p *Policy) askedWhy(ps *poolState, d *decision, a ask, sess *SessionEntry, now time.Time) string {
	dial := ps.ups[a.upstream].Dial
	if a.stale {
		return p.staleWhy(ps, d, a, sessions.Seconds(now))
	}
	var said string
	switch a.from {
	case fromRoute:
		said = "the session id's Tomcat route names " + dial
	case fromPin:
		said = "a valid pin naming " + dial
	default:
		said = "the session table pins this key to " + dial
	}
	if a.verdict != healthcheck.Serves {
		return fmt.Sprintf("%s, which cannot serve it (%s)", said, a.verdict)
	}
	if a.from == fromTable && sess != nil {
		return fmt.Sprintf("%s (forgotten after %ds more without a request)", said, sess.ExpiresIn)
	}
	return said + ", which may serve it"
}

// staleWhy words why a pin was not honoured: its session has ended, and
// its upstream takes no new sessions freely.
func (p *Policy) staleWhy(ps *poolState, d *decision, a ask, now uint32) string {
	dial := ps.ups[a.upstream].Dial
	var shut string
	switch a.gate {
	case gateState:
		shut = ps.recs[a.upstream].ForNew(ps.ups[a.upstream]).String()
	case gateWeight:
		shut = "weight 0"
	case gateRamp:
		shut = "in slow start"
	default:
		shut = healthcheck.Failed.String()
	}
	life := fmt.Sprintf("session_ttl %s + refresh %s + %ds", time.Duration(p.ttl)*time.Second,
		time.Duration(pinRefresh(p.ttl))*time.Second, pinSlack)
	var age string
	if d.pin.v1 {
		age = fmt.Sprintf("a v1 pin (no time) more than %s after this proxy started", life)
	} else {
		age = fmt.Sprintf("issued %ds ago, older than a live session's pin can be (%s)", d.pin.age(now), life)
	}
	return fmt.Sprintf("a pin naming %s, %s: its session has ended, and %s takes no new sessions freely (%s), so the pin is not honoured",
		dial, age, dial, shut)
}

// explainWalk turns the recorded ring walk into steps, with why it
// passed over each upstream before the one it chose. It returns the
// choice, or -1.
func (p *Policy) explainWalk(ps *poolState, walk *walkRecorder, now time.Time, out *Explanation) int {
	choice, fallback, fallbackAt := -1, accepts, -1
	for n, i := range walk.visited {
		step := WalkStep{Upstream: ps.ups[i].Dial}
		switch walk.why[n] {
		case declineDown:
			step.Skipped = ps.recs[i].ForNew(ps.ups[i]).String()
		case declineState:
			step.Skipped = ps.recs[i].State().String()
		case declineLoad:
			step.Skipped = fmt.Sprintf("balance_factor: holds %d live sessions, at its bound", p.sessionsOn(ps, i))
			if fallbackAt < 0 || fallback == declineLoad {
				fallback, fallbackAt = declineLoad, n
			}
		case declineRamp:
			back, ramp := max(ps.recs[i].BackFor(now), 0), time.Duration(p.SlowStart)
			step.Skipped = fmt.Sprintf("slow start: back for %s of %s, takes %d%% of its new sessions, not this one",
				back.Round(time.Second), ramp, 100*back/ramp)
			if fallback != declineRamp {
				fallback, fallbackAt = declineRamp, n
			}
		default:
			step.Chosen, choice = true, i
		}
		out.Walk = append(out.Walk, step)
	}
	// Every candidate declined only by its ramp or its load: the first
	// that declined by ramp, else by load, takes the session anyway.
	if choice < 0 && fallbackAt >= 0 {
		st := &out.Walk[fallbackAt]
		st.Skipped, st.Chosen = "", true
		choice = walk.visited[fallbackAt]
		if fallback == declineRamp {
			st.Note = "every candidate declined: the first in slow start takes it"
		} else {
			st.Note = "every candidate declined: the first at its balance_factor bound takes it"
		}
	}
	return choice
}

// poolFor returns the pool state a request to the site's proxy would
// use: for static upstreams the very state Select uses (it is built and
// cached as a first request would), otherwise the last pool a request
// brought.
func poolFor(s Site) (*poolState, error) {
	if len(s.Handler.Upstreams) > 0 {
		if ps := s.Policy.poolState(s.Handler.Upstreams); ps != nil {
			return ps, nil
		}
		return nil, errors.New("the upstream ring could not be built (see Caddy's log)")
	}
	if ps := s.Policy.pools.Load(); ps != nil {
		return ps, nil
	}
	return nil, errors.New("dynamic upstreams and no request yet: the proxy has not seen its upstreams")
}

// keyFor picks the policy's key the value is to be read as: of the
// given source and name, or the first one when they are not given.
func (p *Policy) keyFor(source, name string) (*KeySource, error) {
	for i := range p.Keys {
		k := &p.Keys[i]
		if source != "" && k.From != source {
			continue
		}
		if name != "" && !sameKeyName(k, name) {
			continue
		}
		return k, nil
	}
	if len(p.Keys) == 0 {
		return nil, errors.New("this proxy has no session key (sessions are told apart by the pin cookie alone): look up a pin with source=pin")
	}
	have := make([]string, len(p.Keys))
	for i := range p.Keys {
		have[i] = p.Keys[i].String()
	}
	want := strings.TrimSpace(source + " " + name)
	return nil, fmt.Errorf("this proxy reads no key %q; its keys: %s", want, strings.Join(have, ", "))
}

// sameKeyName compares key names the way requests match them: header
// names case-insensitively, the others exactly.
func sameKeyName(k *KeySource, name string) bool {
	if k.From == "header" {
		return strings.EqualFold(k.Name, name)
	}
	return k.Name == name
}

func strPtr(s string) *string { return &s }

package affinity

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/pin"
	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// Decisions as the lookup endpoint names them: the lookup column of
// the outcomes table, and DecidedRandom.
const (
	DecidedRoute    = "tomcat_route"  // the session id's route names an upstream that may serve it
	DecidedPin      = "pin_cookie"    // a valid pin naming an upstream that may serve it
	DecidedTable    = "session_table" // the session table's entry, upstream may serve it
	DecidedRing     = "ring"          // a new session: placed by the ring walk
	DecidedFailover = "failover"      // its upstream cannot serve it: the ring walk places it anew
	DecidedHold     = "hold"          // its upstream is in trouble: requests wait under `hold`, then fail over
	DecidedOverflow = "overflow"      // its upstream is at max_requests: this request goes elsewhere once
	DecidedNone     = "none"          // no upstream may take it now
	// DecidedRandom is a new session with no key to place it by: Select
	// places it by its connection, which a lookup has none of.
	DecidedRandom = "random"
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
// name; source "pin" reads value as a pin cookie. It builds a request
// that carries the value where the key reads it and asks it as Select
// does (Policy.look) with the writes turned off, so that the two cannot
// disagree.
func Explain(s Site, source, name, value string, now time.Time) Explanation {
	p := s.Policy
	out := Explanation{Site: s}
	ps, err := poolFor(s)
	if err != nil {
		out.Error = err.Error()
		return out
	}
	r := &http.Request{Method: http.MethodGet, URL: &url.URL{Path: "/"}, Header: http.Header{}}
	var hash uint64
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
		if err := k.Inject(r, value); err != nil {
			out.Error = err.Error()
			return out
		}
		h, ok := k.Hash(r)
		if !ok {
			out.Error = fmt.Sprintf("%q is not a value the key %s reads", value, out.Key)
			return out
		}
		hash = h
		out.Session = p.sessionEntry(hash, now)
		if owner := ps.Ring.Lookup(hash); owner >= 0 {
			out.RingOwner = ps.Ups[ps.Member[owner]].Dial
		}
	}
	r = r.WithContext(context.WithValue(context.Background(), caddyhttp.VarsCtxKey, map[string]any{}))
	p.explainRequest(ps, r, now, &out)
	return out
}

// explainRequest decides where request r goes as Select would (through
// Policy.look, with the writes turned off) and words the decision into
// out. r's vars are read (a retry's failed upstream) and not written.
func (p *Policy) explainRequest(ps *poolState, r *http.Request, now time.Time, out *Explanation) {
	vars, _ := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
	var budget sessions.Budget
	in := decideInput{failed: -1, now: sessions.Seconds(now), wall: now, dry: true, recordWalk: true, budget: &budget}
	var keyBuf [keys.Max]uint64
	var d decision
	in, _, _ = p.look(ps, r, vars, in, &keyBuf, &d)
	var after *decision
	if d.held {
		// Where it goes once the hold is over: the ring walk.
		after = &decision{chosen: -1, pinned: -1, failed: -1, busy: -1}
		p.placeOnRing(ps, &in, after)
	}
	p.explain(ps, &d, after, now, out)
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

// explain words decision d for an operator; after is where a held
// session goes once the hold is over.
func (p *Policy) explain(ps *poolState, d *decision, after *decision, now time.Time, out *Explanation) {
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
	o := d.outcome()
	out.Decision = outcomes[o].lookup
	if d.chosen >= 0 {
		out.Upstream = strPtr(ps.Ups[d.chosen].Dial)
	}
	walked := d
	if after != nil {
		walked = after
	}
	if d.by == fromRing || after != nil {
		p.explainWalk(ps, walked, now, out)
	}
	why := strings.Join(whys, "; ")
	var to string
	switch c := walked.chosen; {
	case c < 0:
		to = outcomes[outcomeNone].words
	case walked.randomKey:
		to = "the request is placed like a new session, by its connection"
	default:
		to = "the ring walk places it on " + ps.Ups[c].Dial
	}
	switch o {
	case outcomeRoute, outcomePin, outcomeTable:
		out.Reason = why
		if o == outcomeTable && out.RingOwner != "" && out.RingOwner != ps.Ups[d.chosen].Dial {
			out.Reason += fmt.Sprintf("; the ring would place a new session on %s, but a session stays where it is", out.RingOwner)
		}
	case outcomeOverflow:
		out.Reason = fmt.Sprintf("%s; busy is not down: this request goes elsewhere once (%s), and the session stays on %s",
			why, to, ps.Ups[d.busy].Dial)
	case outcomeHeld:
		at := "it is full now: Caddy tries it again per lb_try_interval"
		if d.chosen >= 0 {
			at = "this request tries it"
		}
		out.Reason = fmt.Sprintf("%s; under hold %s its requests wait for it to come back (%s), and once the hold is over %s",
			why, time.Duration(p.Hold), at, to)
	case outcomeFailover:
		out.Reason = fmt.Sprintf("%s: the session fails over, %s, and stays there", why, to)
	case outcomeNone:
		out.Reason = strings.TrimPrefix(why+"; "+to, "; ")
	default:
		if d.randomKey {
			out.Decision, out.Upstream = DecidedRandom, nil
		}
		switch {
		case why != "":
			to = why + "; a new session: " + to
		case d.chosen >= 0:
			to = "no live session for this key: a new session; " + to
		}
		out.Reason = to
	}
}

// askedWhy words what one source named.
func (p *Policy) askedWhy(ps *poolState, d *decision, a ask, sess *SessionEntry, now time.Time) string {
	dial := ps.Ups[a.upstream].Dial
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
	dial := ps.Ups[a.upstream].Dial
	shut := a.gate.String()
	life := fmt.Sprintf("session_ttl %s + refresh %s + %ds", time.Duration(p.ttl)*time.Second,
		time.Duration(pin.Refresh(p.ttl))*time.Second, pin.Slack)
	// In the order pin.Signer.Live asks.
	var age string
	switch {
	case !d.pin.V3() && !pin.InUpgrade(now, pin.Lifetime(p.ttl), p.pinUpgrade):
		age = "an old-format pin after the upgrade window (a live session's pin would have been re-issued in the current format)"
	case d.pin.Age(now) > pin.Lifetime(p.ttl):
		age = fmt.Sprintf("issued %ds ago, older than a live session's pin can be (%s)", d.pin.Age(now), life)
	default:
		age = "a pin issued to another session (its app key is not this request's)"
	}
	return fmt.Sprintf("a pin naming %s, %s: its session has ended, and %s takes no new sessions freely (%s), so the pin is not honoured",
		dial, age, dial, shut)
}

// explainWalk prints the ring walk's steps of d, with why it passed
// over each upstream before the one it chose.
func (p *Policy) explainWalk(ps *poolState, d *decision, now time.Time, out *Explanation) {
	for _, st := range d.walk {
		step := WalkStep{Upstream: ps.Ups[st.Upstream].Dial}
		switch st.Why {
		case healthcheck.Serves:
			step.Chosen = true
		case healthcheck.AtBound:
			step.Skipped = fmt.Sprintf("%s: holds %d live sessions", st.Why, ps.SessionsOn(p.sessions, st.Upstream))
		case healthcheck.Ramping:
			back, ramp := max(ps.Recs[st.Upstream].BackFor(now), 0), time.Duration(p.SlowStart)
			step.Skipped = fmt.Sprintf("%s: back for %s of %s, takes %d%% of its new sessions, not this one",
				st.Why, back.Round(time.Second), ramp, 100*back/ramp)
		default:
			step.Skipped = st.Why.String()
		}
		if st.Why == d.fallback && st.Upstream == d.chosen && d.fallback != healthcheck.Serves {
			// Every candidate declined: the first that declined by ramp,
			// else by load, takes it anyway (placement.Pool.Walk).
			step.Skipped, step.Chosen = "", true
			step.Note = fmt.Sprintf("every candidate declined: the first declined for %s takes it", d.fallback)
		}
		out.Walk = append(out.Walk, step)
	}
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
func (p *Policy) keyFor(source, name string) (*keys.Source, error) {
	for i := range p.Keys {
		k := &p.Keys[i]
		if source != "" && k.From != source {
			continue
		}
		if name != "" && !k.SameName(name) {
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

func strPtr(s string) *string { return &s }

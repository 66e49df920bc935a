package affinity

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

func init() {
	caddy.RegisterModule(LookupAPI{})
}

// lookupPath is where the lookup endpoint is served on the admin listener.
const lookupPath = "/affinity/lookup"

// LookupAPI is the admin API module `admin.api.affinity_lookup`:
//
//	GET /affinity/lookup?key=<value>[&source=<key source>|pin][&name=<name>]
//
// It answers, for every reverse_proxy of the running config that uses
// lb_policy affinity, where a request carrying that session key (and no
// pin cookie) goes now, and why: the session table's entry, the ring
// owner of the key, and the upstreams the ring walk passed over and why
// (down, full, draining, maintenance, slow start, balance_factor). It
// changes nothing a request would notice: the table entry's expiry is not
// slid and no counter moves (the ring is built and cached, as a first
// request would).
//
// source picks the policy's key of that kind (cookie, header, query,
// client_ip, path_param, aspnet_cookieless; default: its first key)
// and name the one of that name; source=pin reads the value as a pin
// cookie. A query key's value is hashed as the client sends it, still
// percent-encoded, so percent-encode it once more here.
//
// It lives apart from admin.api.affinity (package healthcheck) because
// it needs the ring and the session table, which are this package's.
type LookupAPI struct{}

// CaddyModule returns the Caddy module information.
func (LookupAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.affinity_lookup",
		New: func() caddy.Module { return new(LookupAPI) },
	}
}

// Routes returns the lookup route.
func (LookupAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: lookupPath, Handler: caddy.AdminHandlerFunc(handleLookup)}}
}

// Lookup decisions: how a request with the key would be routed.
const (
	decidedPin      = "pin_cookie"    // a valid pin naming an upstream that may serve it
	decidedRoute    = "tomcat_route"  // the session id's route names an upstream that may serve it
	decidedTable    = "session_table" // the session table's entry, upstream may serve it
	decidedRing     = "ring"          // a new session: placed by the ring walk
	decidedFailover = "failover"      // its upstream cannot serve it: the ring walk places it anew
	decidedHold     = "hold"          // its upstream is in trouble: requests wait under `hold`, then fail over
	decidedRandom   = "random"        // no session key: placed at random, like a first visit
	decidedNone     = "none"          // no upstream may take it now
)

// lookupResponse is the answer of GET /affinity/lookup.
type lookupResponse struct {
	// Source and Name echo the request's parameters (the key value is
	// not echoed: it may be a live session id).
	Source string `json:"source,omitempty"`
	Name   string `json:"name,omitempty"`
	// Policies has one entry per reverse_proxy using lb_policy affinity,
	// in config order.
	Policies []policyLookup `json:"policies"`
}

// policyLookup is where one policy sends the key, and why.
type policyLookup struct {
	policyRef
	// Key is the policy's key the value was read as, e.g. "cookie
	// session_id"; "pin cookie caddy_affinity" with source=pin.
	Key string `json:"key,omitempty"`
	// Upstream is where a request with the key goes now; null when it
	// goes nowhere (decision "none"), or nowhere fixed ("random").
	Upstream *string `json:"upstream"`
	// Decision is one of tomcat_route, pin_cookie, session_table, ring,
	// failover, hold, random, none.
	Decision string `json:"decision"`
	// Reason explains the decision in a sentence.
	Reason string `json:"reason"`
	// Session is the session table's live entry for the key, if any.
	Session *lookupSession `json:"session,omitempty"`
	// RingOwner is the upstream that owns the key on the ring: where a
	// new session with this key goes when every upstream may take it.
	RingOwner string `json:"ring_owner,omitempty"`
	// Walk is the ring walk from the owner to the upstream chosen, with
	// why each one before it was passed over; present when the ring
	// decided.
	Walk []walkStep `json:"walk,omitempty"`
	// Error says why the key could not be looked up for this policy (it
	// has no such key, the value is not a valid one...).
	Error string `json:"error,omitempty"`
}

// policyRef names a policy for an operator: where it is in the config.
type policyRef struct {
	Server  string   `json:"server"`
	Listen  []string `json:"listen,omitempty"`
	Hosts   []string `json:"hosts,omitempty"`
	Handler string   `json:"handler"`
}

func refOf(s policySite) policyRef {
	return policyRef{Server: s.Server, Listen: s.Listen, Hosts: s.Hosts, Handler: s.Path}
}

// lookupSession is a live session-table entry.
type lookupSession struct {
	Upstream string `json:"upstream"`
	// ExpiresIn is the idle time left before the entry is forgotten, in
	// seconds; every request of the session slides it to session_ttl.
	ExpiresIn int64 `json:"expires_in_seconds"`
}

// walkStep is one upstream on the ring walk.
type walkStep struct {
	Upstream string `json:"upstream"`
	// Skipped says why the walk passed over it: down, full, draining,
	// maintenance, balance_factor or slow start.
	Skipped string `json:"skipped,omitempty"`
	// Chosen marks the upstream the walk stopped at.
	Chosen bool `json:"chosen,omitempty"`
	// Note says why an upstream was chosen though it declined.
	Note string `json:"note,omitempty"`
}

func handleLookup(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", http.MethodGet)
		return apiError(http.StatusMethodNotAllowed, "method %s not allowed on %s: use GET", r.Method, lookupPath)
	}
	q := r.URL.Query()
	value, source, name := q.Get("key"), q.Get("source"), q.Get("name")
	if value == "" {
		return apiError(http.StatusBadRequest,
			"missing key: GET %s?key=<value>[&source=cookie|header|query|client_ip|pin|...][&name=<cookie, header or query name>]", lookupPath)
	}
	if name != "" && (source == "client_ip" || source == "pin") {
		return apiError(http.StatusBadRequest, "source %s takes no name", source)
	}
	resp := lookupResponse{Source: source, Name: name, Policies: []policyLookup{}}
	now := time.Now()
	eachPolicy(func(s policySite) {
		resp.Policies = append(resp.Policies, lookup(s, source, name, value, now))
	})
	if len(resp.Policies) == 0 {
		return apiError(http.StatusNotFound, "no reverse_proxy in the running config uses lb_policy affinity")
	}
	return writeJSON(w, http.StatusOK, resp)
}

// lookup explains where policy s sends a request carrying the key.
func lookup(s policySite, source, name, value string, now time.Time) policyLookup {
	p := s.Policy
	out := policyLookup{policyRef: refOf(s)}
	ps, err := poolFor(s)
	if err != nil {
		out.Error = err.Error()
		return out
	}
	if source == "pin" {
		if p.DisablePinCookie {
			out.Error = "this proxy's pin cookie is off"
			return out
		}
		out.Key = "pin cookie " + p.PinCookie
		explainPin(p, ps, value, &out)
		return out
	}
	k, err := p.keyFor(source, name)
	if err != nil {
		out.Error = err.Error()
		return out
	}
	out.Key = describeKey(k)
	r, err := keyRequest(k, value)
	if err != nil {
		out.Error = err.Error()
		return out
	}
	hash, ok := k.hash(r)
	if !ok {
		out.Error = fmt.Sprintf("%q is not a value the key %s reads", value, out.Key)
		return out
	}
	explainKey(p, ps, r, hash, now, &out)
	return out
}

// poolFor returns the pool state a request to the site's proxy would
// use: for static upstreams the very state Select uses (it is built and
// cached as a first request would), otherwise the last pool a request
// brought.
func poolFor(s policySite) (*poolState, error) {
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
		have[i] = describeKey(&p.Keys[i])
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

// describeKey names a key as the Caddyfile does, e.g. "cookie sid".
func describeKey(k *KeySource) string {
	switch {
	case k.From == "client_ip":
		return fmt.Sprintf("client_ip /%d /%d", k.IPv4Bits, k.IPv6Bits)
	case k.Name == "":
		return k.From
	}
	return k.From + " " + k.Name
}

// keyRequest returns a request that carries value where the key k reads
// it, and nothing else. The lookup lets the policy's own code read it
// (KeySource.hash, the Tomcat route), so that it can never read a key
// differently from Select.
func keyRequest(k *KeySource, value string) (*http.Request, error) {
	r := &http.Request{Method: http.MethodGet, URL: &url.URL{Path: "/"}, Header: http.Header{}}
	r = r.WithContext(context.Background())
	switch k.From {
	case "cookie":
		if strings.ContainsAny(value, ";\r\n") {
			return nil, errors.New("a cookie value cannot contain ';' or a line break")
		}
		r.Header.Set("Cookie", k.Name+"="+value)
	case "header":
		r.Header.Set(k.Name, value)
	case "query":
		r.URL.RawQuery = k.Name + "=" + value
	case "client_ip":
		ip, err := netip.ParseAddr(value)
		if err != nil {
			return nil, fmt.Errorf("%q is not an IP address", value)
		}
		r.RemoteAddr = net.JoinHostPort(ip.String(), "0")
	case "path_param":
		if strings.ContainsAny(value, ";/?#") {
			return nil, errors.New("a path parameter value cannot contain ';', '/', '?' or '#'")
		}
		r.URL.Path = "/;" + k.Name + "=" + value
	case "aspnet_cookieless":
		if strings.ContainsAny(value, "()/?#") {
			return nil, errors.New("a cookieless session id cannot contain '(', ')', '/', '?' or '#'")
		}
		r.URL.Path = "/(S(" + value + "))/"
	default:
		return nil, fmt.Errorf("the lookup cannot read a %s key yet", k.From)
	}
	return r, nil
}

// explainKey follows Select for a request r that carries one key, whose
// hash is key, and no pin cookie: the Tomcat route, the session table,
// then the ring.
func explainKey(p *Policy, ps *poolState, r *http.Request, key uint64, now time.Time, out *policyLookup) {
	if owner := ps.ring.Lookup(key); owner >= 0 {
		out.RingOwner = ps.ups[owner].Dial
	}
	// Upstreams the session is pinned to that cannot serve it, in the
	// order Select asks them.
	var stuck []int
	var why []string

	if len(ps.routes) > 0 {
		if i := p.routeIndex(ps, r); i >= 0 {
			if ps.pinnable(i) {
				out.Decision, out.Upstream = decidedRoute, strPtr(ps.ups[i].Dial)
				out.Reason = fmt.Sprintf("the session id's Tomcat route names %s, which may serve it", ps.ups[i].Dial)
				return
			}
			stuck = append(stuck, i)
			why = append(why, fmt.Sprintf("the session id's Tomcat route names %s, which cannot serve it (%s)", ps.ups[i].Dial, cannotServe(ps, i)))
		}
	}

	tableFrom := -1
	if p.table != nil {
		if e, ok := p.table.peek(key, tableNow(now)); ok {
			id := e.upstream()
			sess := &lookupSession{ExpiresIn: int64(e.expires) - int64(tableNow(now))}
			if u := healthcheck.ByID(id); u != nil {
				sess.Upstream = u.Dial
			}
			out.Session = sess
			switch i := ps.indexByID(id); {
			case i < 0:
				why = append(why, fmt.Sprintf("the session table names %s, which this proxy does not have", sess.Upstream))
			case ps.pinnable(i):
				out.Decision, out.Upstream = decidedTable, strPtr(ps.ups[i].Dial)
				out.Reason = fmt.Sprintf("the session table pins this key to %s (forgotten after %ds more without a request)",
					ps.ups[i].Dial, sess.ExpiresIn)
				if out.RingOwner != "" && out.RingOwner != ps.ups[i].Dial {
					out.Reason += fmt.Sprintf("; the ring would place a new session on %s, but a session stays where it is", out.RingOwner)
				}
				return
			default:
				tableFrom = i
				stuck = append(stuck, i)
				why = append(why, fmt.Sprintf("the session table pins this key to %s, which cannot serve it (%s)",
					ps.ups[i].Dial, cannotServe(ps, i)))
			}
		}
	}

	choice := explainWalk(p, ps, key, now, out)
	// As in Select: the session "comes from" its table entry first, else
	// its route.
	from := tableFrom
	if from < 0 && len(stuck) > 0 {
		from = stuck[0]
	}
	decide(p, ps, stuck, from, strings.Join(why, "; "), choice, decidedRing, out)
}

// explainPin follows Select for a request that carries the pin cookie
// value and no session key.
func explainPin(p *Policy, ps *poolState, value string, out *policyLookup) {
	i := ps.pinIndex(value)
	if i < 0 {
		out.Decision = decidedRandom
		out.Reason = "not a valid pin for this proxy's upstreams (forged, signed with another secret, or naming an upstream it no longer has): " +
			"it is counted as a rejected pin and the request is placed like a new session, at random"
		return
	}
	if ps.pinnable(i) {
		out.Decision, out.Upstream = decidedPin, strPtr(ps.ups[i].Dial)
		out.Reason = fmt.Sprintf("a valid pin naming %s, which may serve it", ps.ups[i].Dial)
		return
	}
	what := fmt.Sprintf("a valid pin naming %s, which cannot serve it (%s)", ps.ups[i].Dial, cannotServe(ps, i))
	decide(p, ps, []int{i}, i, what, -2, decidedRandom, out)
}

// decide fills in the decision for a session whose upstreams stuck
// cannot serve it (from is the one it leaves), given the ring walk's
// choice (-1: none; -2: no key to walk by, a random placement).
func decide(p *Policy, ps *poolState, stuck []int, from int, why string, choice int, placed string, out *policyLookup) {
	var to string
	switch choice {
	case -2:
		to = "the request is placed like a new session, at random"
	case -1:
		to = "no upstream may take a new session now (down, full, draining or in maintenance): Caddy retries per lb_try_duration, then answers 502"
	default:
		to = "the ring walk places it on " + ps.ups[choice].Dial
		out.Upstream = strPtr(ps.ups[choice].Dial)
	}
	held := false
	for _, i := range stuck {
		held = held || (p.Hold > 0 && ps.recs[i].State().AcceptsPinned())
	}
	switch {
	case held:
		out.Decision = decidedHold
		out.Reason = fmt.Sprintf("%s; under hold %s its requests wait for it to come back, and once the hold is over %s",
			why, time.Duration(p.Hold), to)
	case from >= 0:
		out.Decision = decidedFailover
		out.Reason = fmt.Sprintf("%s: the session fails over, %s, and stays there", why, to)
	default:
		out.Decision = placed
		switch {
		case why != "":
			to = why + "; a new session: " + to
		case choice >= 0:
			to = "no live session for this key: a new session; " + to
		}
		out.Reason = to
	}
	if choice == -1 {
		out.Decision = decidedNone
	}
}

// explainWalk walks the ring from key as Policy.place does (through the
// same walkPlacement) and records why it passed over each upstream before
// the one it chose. It returns the choice, or -1.
func explainWalk(p *Policy, ps *poolState, key uint64, now time.Time, out *policyLookup) int {
	var steps []walkStep
	at := map[int]int{} // upstream -> its step
	choice, fallback := p.walkPlacement(ps, key, -1, now, func(i int, d decline) {
		step := walkStep{Upstream: ps.ups[i].Dial}
		switch d {
		case declineDown:
			step.Skipped = cannotServe(ps, i)
		case declineState:
			step.Skipped = ps.recs[i].State().String()
		case declineLoad:
			step.Skipped = fmt.Sprintf("balance_factor: holds %d live sessions, at its bound", p.table.liveCount(ps.recs[i].ID))
		case declineRamp:
			back, ramp := max(ps.recs[i].BackFor(now), 0), time.Duration(p.SlowStart)
			step.Skipped = fmt.Sprintf("slow start: back for %s of %s, takes %d%% of its new sessions, not this one",
				back.Round(time.Second), ramp, 100*back/ramp)
		default:
			step.Chosen = true
		}
		at[i] = len(steps)
		steps = append(steps, step)
	})
	// Every candidate declined only by its ramp or its load: the first
	// that declined by ramp, else by load, takes the session anyway.
	if fallback != accepts && choice >= 0 {
		st := &steps[at[choice]]
		st.Skipped, st.Chosen = "", true
		if fallback == declineRamp {
			st.Note = "every candidate declined: the first in slow start takes it"
		} else {
			st.Note = "every candidate declined: the first at its balance_factor bound takes it"
		}
	}
	out.Walk = steps
	return choice
}

// cannotServe says why upstream i cannot serve a session pinned to it.
func cannotServe(ps *poolState, i int) string {
	u := ps.ups[i]
	switch {
	case !u.Healthy():
		return "down: Caddy's health checks"
	case u.Full():
		return "full: at max_requests"
	}
	if st := ps.recs[i].State(); !st.AcceptsPinned() {
		return st.String()
	}
	return "not selectable"
}

func strPtr(s string) *string { return &s }

// apiError returns an error Caddy's admin server writes as
// {"error":"<message>"} with the given status.
func apiError(status int, format string, args ...any) error {
	return caddy.APIError{HTTPStatus: status, Err: fmt.Errorf(format, args...)}
}

// Interface guards
var _ caddy.AdminRouter = LookupAPI{}

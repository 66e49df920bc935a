// Package affinity is the `affinity` load-balancing selection policy for
// Caddy's reverse_proxy: it pins every session to one upstream.
//
// Per request, in order:
//  0. a session id whose Tomcat route suffix names a selectable upstream
//     (tomcat_route) wins;
//  1. a valid pin cookie naming a selectable upstream wins (on an upstream
//     that takes no new sessions freely, only a live session's pin: one
//     younger than session_ttl plus its refresh interval);
//  2. else a live session-table entry for the session key naming a
//     selectable upstream wins;
//  3. else the key (or, for a new session with no key, a random one) is
//     placed on a consistent-hash ring and walked to the first upstream
//     that may take new sessions (and, under balance_factor, is below its
//     bound of live sessions).
//
// Whatever was chosen is remembered (pin cookie and session table with a
// sliding TTL), so a session that failed over stays on its new upstream
// when the old one comes back.
package affinity

import (
	"fmt"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/pin"
	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

func init() {
	caddy.RegisterModule(new(Policy))
}

// Defaults.
const (
	DefaultPinCookie   = "caddy_affinity"
	DefaultSessionTTL  = caddy.Duration(20 * time.Minute)
	DefaultMaxSessions = 1_000_000
)

// Policy is the `affinity` selection policy. It keeps each session on
// one upstream: by the proxy's own signed pin cookie, by a server-side
// session table keyed on the app's session key, and, for a session seen
// for the first time, by a consistent-hash ring that every proxy
// instance computes alike.
type Policy struct {
	// Keys are the places the session key is read from, tried in order;
	// the first present wins. With none, the session cookies of the
	// common in-process-session platforms are the keys (a
	// "platform_cookies" source: ASP.NET_SessionId, JSESSIONID,
	// PHPSESSID, connect.sid and the like), unless NoDefaultKeys is set.
	Keys []keys.Source `json:"keys,omitempty"`

	// NoDefaultKeys, with no Keys, tells sessions apart by the pin
	// cookie alone (the Caddyfile's `key none`).
	NoDefaultKeys bool `json:"no_default_keys,omitempty"`

	// PinCookie is the name of the proxy's own cookie that remembers the
	// upstream a session was given. Default "caddy_affinity". The app's
	// cookies are never rewritten.
	PinCookie string `json:"pin_cookie,omitempty"`

	// PinCookieAttributes are the pin cookie's Domain, Path, SameSite,
	// Secure, Max-Age and Partitioned attributes. Default: Path=/,
	// HttpOnly, SameSite=Lax, Secure on HTTPS, a browser-session cookie.
	PinCookieAttributes *pin.Attributes `json:"pin_cookie_attributes,omitempty"`

	// DisablePinCookie turns the pin cookie off: sessions are then kept
	// by the session table and the ring alone.
	DisablePinCookie bool `json:"disable_pin_cookie,omitempty"`

	// Secret signs pin cookies. Placeholders such as {env.AFFINITY_SECRET}
	// are replaced at provision time. Instances that must accept each
	// other's pins need the same secret. If empty, a random secret is
	// created once and kept in Caddy's storage, so instances that share
	// storage share it.
	Secret string `json:"secret,omitempty"` //nolint:gosec // config field, like the cookie policy's

	// PreviousSecrets are secrets pins were signed with before Secret:
	// their pins are still accepted, and issued again with Secret on that
	// request, so that rotating the secret breaks no session. Placeholders
	// are replaced as in Secret. Drop them once every live session has
	// come back (session_ttl after every instance has the new secret).
	PreviousSecrets []string `json:"previous_secrets,omitempty"` //nolint:gosec // config field

	// SessionTTL is how long a session is remembered in the session
	// table after its last request (sliding), and how long a pin counts
	// as a live session's where that matters (an upstream that takes no
	// new sessions freely). Default 20m, ASP.NET's session timeout.
	SessionTTL caddy.Duration `json:"session_ttl,omitempty"`

	// MaxSessions bounds the session table, process-wide (the largest
	// value among live configs applies). When full, expired entries are
	// evicted first, then sessions seen only once, and established
	// sessions (seen on two requests or more) last; at most half the
	// table's entries become established, so that floods of
	// few-request sessions cannot push established ones out. Default 1000000
	// (about 23 MB; the table never grows past its bound).
	MaxSessions int `json:"max_sessions,omitempty"`

	// Weights gives each upstream, in the order they are listed, its
	// share of new sessions (like weighted_round_robin). Upstreams beyond
	// the list weigh 1; weight 0 takes no new sessions but keeps its
	// pinned ones.
	Weights []int `json:"weights,omitempty"`

	// Probe asks each upstream whether it wants to be drained, like
	// HAProxy's agent-check: see healthcheck.Probe.
	Probe *healthcheck.Probe `json:"probe,omitempty"`

	// Hold is how long the sessions of an upstream that stopped being
	// available wait for it (the policy returns no upstream, so Caddy's
	// lb_try_duration keeps retrying) instead of failing over; after it,
	// they fail over once and stay. For workers that restart in seconds.
	// Needs lb_try_duration longer than the hold. Default off.
	Hold caddy.Duration `json:"hold,omitempty"`

	// SlowStart is how long a recovered or newly added upstream takes to
	// reach its full share of new sessions; its share ramps up linearly.
	// Pinned sessions are never affected. Default off.
	SlowStart caddy.Duration `json:"slow_start,omitempty"`

	// BalanceFactor bounds the load of new sessions (consistent hashing
	// with bounded loads): a new session is never placed on an upstream
	// that already holds ceil(c × average) live sessions or more, where c
	// is the factor and the average is over the upstreams that may take
	// new sessions, in proportion to their weights; the walk along the
	// ring goes on to the next one. Sessions already pinned never move
	// because of load. Live sessions are the session table's entries, so
	// at least one key is needed; a session is counted from the first
	// request that carries its key (or as soon as affinity_learn sees the
	// app issue it). Must be more than 1; 1.25 is a sensible value. The
	// smaller it is, the more placement departs from the ring, so that
	// instances with different loads place alike less often (pins and
	// the table keep sessions where they were placed). Default off.
	BalanceFactor float64 `json:"balance_factor,omitempty"`

	// TomcatRoutes maps a worker route, as Tomcat appends it to its
	// session ids (`JSESSIONID=<id>.<jvmRoute>`), to the dial address of
	// the upstream that has it, as written in the upstream list. A
	// request whose session id (read by the `cookie` and `path_param`
	// keys, in order) ends in a listed route goes to that upstream while
	// it may serve pinned sessions, before the pin cookie, the table and
	// the ring are asked: the id is the app's own pin. Needs a cookie or
	// path_param key.
	TomcatRoutes map[string]string `json:"tomcat_routes,omitempty"`

	// Scope names the policy's namespace in the session table, which is
	// process-wide. By default every proxy has its own, derived from where
	// it sits in the config (its server's listeners, its site's hosts and
	// its place among that site's affinity proxies), so that a reload or a
	// change of upstreams keeps it and another site's requests cannot
	// overwrite its sessions. Proxies given the same scope share their
	// entries, e.g. two sites in front of one farm whose users cross.
	Scope string `json:"scope,omitempty"`

	// Store is where the policy's session memory lives besides the
	// process: `local` (the default) writes the session table to Caddy's
	// storage on shutdown and every interval while it changes, and reads
	// it back at start, so that a restart forgets no session; `memory`
	// keeps it in the process only. The table is process-wide: it is
	// written while any live policy has store local. See sessions.Config.
	Store *sessions.Config `json:"store,omitempty"`

	secret []byte
	// previousSecrets are PreviousSecrets, loaded; pinStyle is
	// PinCookieAttributes, checked; pinUpgrade is when the upgrade window
	// of old-format pins opened (pin.OpenUpgradeWindow).
	previousSecrets [][]byte
	pinStyle        pin.Style
	pinUpgrade      uint32
	ttl             uint32
	ctx             caddy.Context

	// learns is set when a key's kind is one affinity_learn records.
	learns bool
	// missingLearner is set once the policy, with the pin cookie off and
	// a key the learner records, served a request no affinity_learn
	// watched (see noteMissingLearner).
	missingLearner atomic.Bool
	// told are the misconfigurations told at run time (warnings.go).
	told told
	// scopeTried is the table clock at the last resolveScope, for a
	// policy whose place in the config Provision could not tell.
	scopeTried atomic.Uint32

	// sessions is the policy's namespace in the session memory, whatever
	// the store: the table, and the shared store behind it if any.
	sessions *sessions.Handle
	// namespace names the policy's entries in a shared store (see
	// namespaces), "" when Provision could not place it.
	namespace string
	farm      *farm
	table     *sessions.Table // the process's, for counts
	logger    *zap.Logger

	// pools caches the ring and pin tokens of the last pool seen; Caddy
	// passes the same pool on every request unless upstreams are dynamic.
	pools atomic.Pointer[poolState]
}

// CaddyModule returns the Caddy module information.
func (*Policy) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.reverse_proxy.selection_policies.affinity",
		New: func() caddy.Module { return new(Policy) },
	}
}

// Provision sets up the policy.
func (p *Policy) Provision(ctx caddy.Context) error {
	p.ctx = ctx
	p.logger = ctx.Logger()
	if err := p.Validate(); err != nil {
		return err
	}
	if err := p.checkHandler(ctx); err != nil {
		return err
	}
	if p.PinCookie == "" {
		p.PinCookie = DefaultPinCookie
	}
	if p.SessionTTL == 0 {
		p.SessionTTL = DefaultSessionTTL
	}
	if p.MaxSessions == 0 {
		p.MaxSessions = DefaultMaxSessions
	}
	p.Keys = p.keysInEffect()
	for i := range p.Keys {
		if err := p.Keys[i].Provision(); err != nil {
			return err
		}
		p.learns = p.learns || p.Keys[i].Learnable()
	}
	p.ttl = uint32(time.Duration(p.SessionTTL) / time.Second)

	if !p.DisablePinCookie {
		storage := storageOf(ctx)
		secret, err := pin.LoadSecret(ctx, storage, p.Secret, p.logger)
		if err != nil {
			return err
		}
		p.secret = secret
		if len(secret) < pin.MinSecretLen {
			p.logger.Warn("the pin secret is short: clients can forge pins signed with it by brute force; use at least 16 random bytes, such as the output of `openssl rand -base64 32`",
				zap.Int("bytes", len(secret)))
		}
		p.pinUpgrade = pin.OpenUpgradeWindow(ctx, storage, p.logger)
		if p.previousSecrets, err = pin.LoadPreviousSecrets(p.PreviousSecrets, secret); err != nil {
			return err
		}
		p.pinStyle, _ = p.PinCookieAttributes.Style() // checked by Validate
		if age, live := p.pinStyle.MaxAge(), time.Duration(pin.Refresh(p.ttl)+p.ttl)*time.Second; age > 0 && age < live {
			// Allowed (an operator may want pins gone soon after a
			// session idles), but a session idle for longer than max_age
			// loses its pin and is placed again by the table or the ring.
			p.logger.Warn("pin_cookie max_age is shorter than session_ttl + session_ttl/4, the oldest a live session's pin can get: sessions idle longer than max_age lose their pin",
				zap.Duration("max_age", age), zap.Duration("session_ttl", time.Duration(p.SessionTTL)))
		}
	}

	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %v", err)
	}

	if err := sessions.RegisterMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %v", err)
	}
	f, err := acquireFarm(p)
	if err != nil {
		return fmt.Errorf("session store: %v", err)
	}
	p.farm, p.table = f, f.table
	return nil
}

// Cleanup stops the policy's probe and lets go of the farm (the shared
// session table) and the state syncer.
func (p *Policy) Cleanup() error {
	if p.farm != nil {
		p.farm.release(p)
		p.farm = nil
	}
	return nil
}

// triedVar names the request var where Select leaves the upstream it
// chose. Caddy calls Select again with the same request only when that
// attempt failed, so finding it set means "this one just failed".
const triedVar = "affinity.tried"

// Select returns the upstream for the request's session, or nil when no
// upstream may take it (Caddy then retries per lb_try_duration).
func (p *Policy) Select(pool reverseproxy.UpstreamPool, r *http.Request, w http.ResponseWriter) *reverseproxy.Upstream {
	ps := p.poolState(pool)
	if ps == nil {
		return nil
	}
	vars, _ := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
	var budget sessions.Budget
	in := decideInput{failed: -1, now: sessions.Now(), budget: &budget}
	var keyBuf [keys.Max]uint64
	var d decision
	// first is its own variable: it goes into the request vars, and
	// passing in.first there would move all of in, and keyBuf with it, to
	// the heap.
	in, first, retry := p.look(ps, r, vars, in, &keyBuf, &d)
	// What happened, and for a failover what the session left, read once.
	o := d.outcome()
	var left string
	var why healthcheck.Verdict
	if o == outcomeFailover {
		left, why = d.leftDial(ps)
	}
	p.count(&d, o)
	p.watchRequest(ps, r, &d, in.now, in.learning)
	p.tell(vars, ps, &d, o, first)
	if d.chosen < 0 {
		return nil
	}
	if o == outcomeOverflow {
		// Busy is not down: this request goes elsewhere once, and the
		// session stays on its upstream (no entry moves, no new pin).
		return p.chosen(ps, d.chosen, r, w, false, retry, &in, 0)
	}
	p.sessions.Remember(in.keys, ps.Recs[d.chosen].ID, in.now, &budget)
	if o == outcomeFailover {
		p.logFailover(left, ps.Ups[d.chosen].Dial, why)
	}
	// The pin is (re)issued when it is missing, names another upstream,
	// or is due for a fresh time (a v1 pin, or older than the refresh
	// interval): a live session's pin never gets old.
	// It is also bound again when the request's first key is not the one
	// it is bound to (the app gave the session its key since).
	issuePin := !p.DisablePinCookie && (d.pinned != d.chosen || d.pinRefresh || d.pin.Rebind(in.keys))
	return p.chosen(ps, d.chosen, r, w, issuePin, retry, &in, pin.BindFor(o == outcomeFailover, in.keys))
}

// The request vars Select leaves for placeholders, so that access logs,
// log_append, header and header_down can show why a request went where it
// went: {http.vars.affinity.decision} (an outcome), {http.vars.affinity.upstream}
// (the dial address) and {http.vars.affinity.key} (the key source, such as
// "cookie JSESSIONID", never its value). A retry overwrites them.
const (
	varDecision = "affinity.decision"
	varUpstream = "affinity.upstream"
	varKey      = "affinity.key"
)

// tell leaves the decision in the request vars. The values are a byte, a
// pointer and a constant: storing them allocates nothing, and Caddy's
// replacer formats them (String) only when a placeholder asks.
func (p *Policy) tell(vars map[string]any, ps *poolState, d *decision, o outcome, first *keys.Source) {
	if vars == nil {
		return
	}
	vars[varDecision] = o
	if d.chosen >= 0 {
		vars[varUpstream] = ps.Ups[d.chosen]
	} else {
		vars[varUpstream] = ""
	}
	if first != nil {
		vars[varKey] = first
	} else {
		vars[varKey] = ""
	}
}

// chosen records the choice on the request (so that a retry knows it
// failed) and, when asked, issues the pin cookie for it, replacing the
// one an earlier attempt of this request issued.
func (p *Policy) chosen(ps *poolState, i int, r *http.Request, w http.ResponseWriter, issuePin, retry bool, in *decideInput, bind uint32) *reverseproxy.Upstream {
	up := ps.Ups[i]
	now := in.now
	if vars, ok := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
		vars[triedVar] = up
		if lw, ok := vars[learnVar].(*learnWriter); ok {
			// What the learner writes counts against the request's
			// budget too.
			lw.chose(p, ps.Recs[i].ID, *in.budget)
		}
	}
	ps.Recs[i].CountRequest()
	if issuePin && w != nil && ps.pins != nil {
		pin.AddSetCookie(w.Header(), p.PinCookie, ps.pins.SetCookie(i, now, secureRequest(r), bind), retry)
	}
	return up
}

// secureRequest reports whether the client reached us over TLS, directly
// or through a trusted proxy that says so.
func secureRequest(r *http.Request) bool {
	if r.TLS != nil {
		return true
	}
	if trusted, _ := caddyhttp.GetVar(r.Context(), caddyhttp.TrustedProxyVarKey).(bool); trusted {
		if vs := r.Header["X-Forwarded-Proto"]; len(vs) > 0 && vs[len(vs)-1] == "https" {
			return true
		}
	}
	return false
}

// Interface guards
var (
	_ reverseproxy.Selector = (*Policy)(nil)
	_ caddy.Provisioner     = (*Policy)(nil)
	_ caddy.Validator       = (*Policy)(nil)
	_ caddy.CleanerUpper    = (*Policy)(nil)
)

// Package affinity is the `affinity` load-balancing selection policy for
// Caddy's reverse_proxy: it pins every session to one upstream.
//
// Per request, in order:
//  0. a session id whose Tomcat route suffix names a selectable upstream
//     (tomcat_route) wins;
//  1. a valid pin cookie naming a selectable upstream wins;
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
	"errors"
	"fmt"
	"math"
	weakrand "math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"
	"golang.org/x/net/http/httpguts"

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
	// the first present wins. With none, sessions are told apart by the
	// pin cookie alone.
	Keys []KeySource `json:"keys,omitempty"`

	// PinCookie is the name of the proxy's own cookie that remembers the
	// upstream a session was given. Default "caddy_affinity". The app's
	// cookies are never rewritten.
	PinCookie string `json:"pin_cookie,omitempty"`

	// DisablePinCookie turns the pin cookie off: sessions are then kept
	// by the session table and the ring alone.
	DisablePinCookie bool `json:"disable_pin_cookie,omitempty"`

	// Secret signs pin cookies. Placeholders such as {env.AFFINITY_SECRET}
	// are replaced at provision time. Instances that must accept each
	// other's pins need the same secret. If empty, a random secret is
	// created once and kept in Caddy's storage, so instances that share
	// storage share it.
	Secret string `json:"secret,omitempty"` //nolint:gosec // config field, like the cookie policy's

	// SessionTTL is how long a session is remembered in the session
	// table after its last request (sliding). Default 20m, ASP.NET's
	// session timeout.
	SessionTTL caddy.Duration `json:"session_ttl,omitempty"`

	// MaxSessions bounds the session table, process-wide (the largest
	// value among live configs applies). When full, the entries closest
	// to expiry are evicted first. Default 1000000 (about 40 MB).
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

	secret []byte
	ttl    uint32
	ctx    caddy.Context

	releaseSyncer func()
	probeMu       sync.Mutex
	probeStop     func()
	probeDials    string
	probeClosed   bool
	table         *sharedTable
	logger        *zap.Logger

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
	if p.PinCookie == "" {
		p.PinCookie = DefaultPinCookie
	}
	if p.SessionTTL == 0 {
		p.SessionTTL = DefaultSessionTTL
	}
	if p.MaxSessions == 0 {
		p.MaxSessions = DefaultMaxSessions
	}
	for i := range p.Keys {
		if err := p.Keys[i].provision(); err != nil {
			return err
		}
	}
	if err := p.Validate(); err != nil {
		return err
	}
	p.ttl = uint32(time.Duration(p.SessionTTL) / time.Second)

	if !p.DisablePinCookie {
		secret, err := p.loadSecret(ctx)
		if err != nil {
			return err
		}
		p.secret = secret
	}

	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %v", err)
	}

	// States set through the admin API on any instance sharing this
	// storage apply here too.
	if storageOf(ctx) != nil {
		release, err := healthcheck.AcquireSyncer(ctx)
		if err != nil {
			return fmt.Errorf("upstream state syncer: %v", err)
		}
		p.releaseSyncer = release
	}

	table, err := acquireTable(p)
	if err != nil {
		return fmt.Errorf("session table: %v", err)
	}
	p.table = table
	return nil
}

// Validate checks the configuration.
func (p *Policy) Validate() error {
	if len(p.Keys) > maxKeys {
		return fmt.Errorf("at most %d key lines, got %d", maxKeys, len(p.Keys))
	}
	if p.DisablePinCookie && len(p.Keys) == 0 {
		return errors.New("with the pin cookie off, at least one key is needed: nothing would tell sessions apart")
	}
	if !validCookieName(p.PinCookie) {
		return fmt.Errorf("pin_cookie: %q is not a valid cookie name", p.PinCookie)
	}
	if time.Duration(p.SessionTTL) < time.Second {
		return fmt.Errorf("session_ttl must be at least 1s, got %s", time.Duration(p.SessionTTL))
	}
	if p.MaxSessions < 0 {
		return fmt.Errorf("max_sessions must not be negative, got %d", p.MaxSessions)
	}
	for i, w := range p.Weights {
		if w < 0 {
			return fmt.Errorf("weights: weight %d (upstream %d) is negative", w, i+1)
		}
	}
	if p.Hold < 0 || p.SlowStart < 0 {
		return errors.New("hold and slow_start must not be negative")
	}
	if p.BalanceFactor != 0 {
		if !(p.BalanceFactor > 1) || math.IsInf(p.BalanceFactor, 0) {
			return fmt.Errorf("balance_factor must be more than 1, got %v", p.BalanceFactor)
		}
		if len(p.Keys) == 0 {
			return errors.New("balance_factor needs at least one key: live sessions are counted in the session table")
		}
	}
	if len(p.TomcatRoutes) > 0 {
		hasID := false
		for _, k := range p.Keys {
			hasID = hasID || k.From == "cookie" || k.From == "path_param"
		}
		if !hasID {
			return errors.New("tomcat_route needs a `key cookie` or `key path_param` to read the session id from")
		}
		for route, dial := range p.TomcatRoutes {
			if route == "" || dial == "" {
				return fmt.Errorf("tomcat_route: route %q and upstream %q must both be given", route, dial)
			}
		}
	}
	if p.Probe != nil {
		if err := p.Probe.Validate(); err != nil {
			return fmt.Errorf("probe: %v", err)
		}
	}
	return nil
}

// Cleanup lets go of the shared session table.
func (p *Policy) Cleanup() error {
	p.stopProbe()
	if p.releaseSyncer != nil {
		p.releaseSyncer()
	}
	p.releaseTable()
	return nil
}

// validCookieName reports whether s is a cookie name: an RFC 6265
// cookie-name is an RFC 7230 token, the same rule as a header field name.
func validCookieName(s string) bool { return httpguts.ValidHeaderFieldName(s) }

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
	// An upstream that failed this very request is not selectable on
	// the retry, even if Caddy's health checks have not caught up.
	failed := -1
	vars, _ := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
	prev, retry := vars[triedVar].(*reverseproxy.Upstream)
	if retry {
		failed = ps.index(prev)
	}
	var keyBuf [maxKeys]uint64
	keys, firstKind := p.requestKeys(r, &keyBuf)
	now := clockNow()

	// 1. The pin cookie (read first: the route step issues it when it
	// names another upstream).
	pinned := -1
	if !p.DisablePinCookie {
		if v, ok := cookieValue(r.Header, p.PinCookie); ok {
			if pinned = ps.pinIndex(v); pinned < 0 {
				metrics.rejectedPins.Inc()
			}
		}
	}
	// 0. The app's own pin comes before ours: a session id whose route
	// suffix names a worker (tomcat_route) says where the session lives.
	routed := -1
	if len(ps.routes) > 0 {
		if routed = p.routeIndex(ps, r); routed >= 0 {
			if up, decided := p.keep(ps, routed, failed, r, w, pinned != routed && !p.DisablePinCookie, retry); decided {
				if up != nil {
					p.remember(keys, ps.recs[routed].ID, now)
				}
				return up
			}
		}
	}
	if pinned >= 0 {
		if up, decided := p.keep(ps, pinned, failed, r, w, false, retry); decided {
			if up != nil {
				p.remember(keys, ps.recs[pinned].ID, now)
			}
			return up
		}
	}

	// 2. The session table: the first key present that has a live entry.
	// A session's keys change over its life (the first request has no
	// app cookie yet and is known by its client IP; an app may rotate its
	// session id), so every present key is tried, and what is chosen is
	// recorded under all of them.
	//
	// An alias entry (recorded under a key that was not its request's
	// first, such as the client IP next to an app cookie) is what carries
	// a session over to the new id its app issues (on its first response,
	// after a failover). Under affinity_learn the learner records those
	// ids as they are issued, so an unknown app session id is not one of
	// them: it is then placed on its own rather than sent after an alias,
	// which many users behind one address (NAT) share.
	_, learning := vars[learnVar].(*learnWriter)
	laterAliases := !learning || !learnable(firstKind)
	from := pinned
	for j, key := range keys {
		id, ok := p.table.follow(key, now, p.ttl, j == 0 || laterAliases)
		if !ok {
			continue
		}
		i := ps.indexByID(id)
		if i < 0 {
			continue // an upstream this pool does not have
		}
		if up, decided := p.keep(ps, i, failed, r, w, pinned != i && !p.DisablePinCookie, retry); decided {
			if up != nil {
				p.remember(keys, id, now)
			}
			return up
		}
		if from < 0 {
			from = i
		}
		break
	}

	// 3. Place on the ring, by the first key present; a new session with
	// no key yet is placed at random (uniformly over ring slots, so
	// weights hold) and the throwaway key is not remembered.
	key := weakrand.Uint64()
	if len(keys) > 0 {
		key = keys[0]
	}
	choice := p.place(ps, key, failed)
	if choice < 0 {
		metrics.noUpstream.Inc()
		return nil
	}
	p.remember(keys, ps.recs[choice].ID, now)
	if from < 0 {
		from = routed
	}
	if from < 0 {
		from = failed
	}
	if from < 0 || from == choice {
		metrics.placed.Inc()
	} else {
		metrics.failover.Inc()
		p.logger.Info("session failed over",
			zap.String("from", ps.ups[from].Dial),
			zap.String("to", ps.ups[choice].Dial),
			zap.String("reason", ps.unavailableReason(from, failed)))
		failovers.record(ps.ups[from].Dial, ps.ups[choice].Dial, ps.unavailableReason(from, failed))
	}
	return p.chosen(ps, choice, r, w, !p.DisablePinCookie, retry)
}

// maxKeys bounds the number of key sources, so that a request's key
// hashes fit in an array on the stack.
const maxKeys = 8

// keyHashes returns the hashes of the configured keys present in the
// request, in configured order, in buf's storage.
func (p *Policy) keyHashes(r *http.Request, buf *[maxKeys]uint64) []uint64 {
	keys, _ := p.requestKeys(r, buf)
	return keys
}

// requestKeys is keyHashes that also returns the kind of the first key
// present (0 if none).
func (p *Policy) requestKeys(r *http.Request, buf *[maxKeys]uint64) ([]uint64, keyKind) {
	keys := buf[:0]
	var first keyKind
	for i := range p.Keys {
		if h, ok := p.Keys[i].hash(r); ok {
			if len(keys) == 0 {
				first = p.Keys[i].kind
			}
			keys = append(keys, h)
		}
	}
	return keys, first
}

// learnable reports whether affinity_learn records the keys of a kind
// when the app issues them.
func learnable(k keyKind) bool {
	return k == keyCookie || k == keyPathParam || k == keyCookieless
}

// remember records (and slides) key -> upstream for every key present;
// the first is the session's main entry, the others are aliases.
func (p *Policy) remember(keys []uint64, id uint32, now uint32) {
	for i, key := range keys {
		if i > 0 {
			id |= aliasBit
		}
		p.table.put(key, id, now, p.ttl)
	}
}

// chosen records the choice on the request (so that a retry knows it
// failed) and, when asked, issues the pin cookie for it, replacing the
// one an earlier attempt of this request issued.
func (p *Policy) chosen(ps *poolState, i int, r *http.Request, w http.ResponseWriter, issuePin, retry bool) *reverseproxy.Upstream {
	up := ps.ups[i]
	if vars, ok := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
		vars[triedVar] = up
		if lw, ok := vars[learnVar].(*learnWriter); ok {
			lw.chose(p, ps.recs[i].ID)
		}
	}
	ps.recs[i].CountRequest()
	if issuePin && w != nil {
		t := &ps.pins[i]
		v := t.setCookie
		if secureRequest(r) {
			v = t.setCookieSecure
		}
		setPinCookie(w.Header(), p.PinCookie, v, retry)
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

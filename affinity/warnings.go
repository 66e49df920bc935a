package affinity

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
)

// Misconfigurations no parser can see, told at run time: each is logged
// once, with the fix, and shown on the status page (Policy.Warnings)
// for as long as the policy lives.

// The kinds of warnings, in the order the status page lists them.
const (
	warnHealthURI   = iota // active health checks on dynamic upstreams
	warnWeights            // more weights than upstreams
	warnForeignPins        // a steady rate of pins signed with another secret
	warnKeyUnseen          // a configured key that no request carries
	warnKinds
)

// told holds a policy's warnings. Its counters are atomics, so that
// watching requests costs the request path a few adds and no lock.
type told struct {
	mu   sync.Mutex
	text [warnKinds]string // "" until told

	// foreign counts well-formed pins of no upstream of the pool under
	// any secret of ours (foreignPins); only such a request takes mu.
	foreign foreignPins

	// keysDone is set once every watched key source was seen in a
	// request, or the unseen ones were told: from then on watching keys
	// costs a request one atomic load. keySeen has bit i set once a
	// request carried key source i; requests counts the requests until
	// keysDone.
	keysDone atomic.Bool
	keySeen  atomic.Uint32
	requests atomic.Uint32
}

// foreignPins is the rate of pins signed with another secret: their
// count since first, and in how many distinct table seconds they came.
type foreignPins struct {
	first, last uint32
	n, seconds  int
}

// What counts as a steady rate of foreign pins, and after how many
// requests a key source no request carried is told. Variables so that
// unit tests can shorten them.
var (
	// foreignPinsTold: this many foreign pins within foreignPinsWindow
	// seconds, coming in at least foreignPinsSeconds distinct seconds (a
	// steady rate, not one client's burst), are told.
	foreignPinsTold    = 20
	foreignPinsSeconds = 3
	foreignPinsWindow  = uint32(60)
	// keyUnseenAfter is the number of requests after which a key source
	// none of them carried is told.
	keyUnseenAfter = uint32(1000)
)

// watchRequest looks at a decided request for what an operator must be
// told: a learner missing (learning: affinity_learn watches the
// response), pins signed with another secret, key sources no request
// carries. It allocates nothing; past the first keyUnseenAfter requests a
// request with a valid pin costs it two loads.
func (p *Policy) watchRequest(ps *poolState, r *http.Request, d *decision, now uint32, learning bool) {
	if p.DisablePinCookie && p.learns && !learning {
		p.noteMissingLearner()
	}
	if d.pinRejected && d.pin.Parsed() && ps.pins != nil && ps.pins.Index(&d.pin) < 0 {
		// Well formed (pin.Decoded.Parsed) and of no
		// upstream under any of our secrets: not a forged time or tag
		// (their token is ours), another secret's token.
		p.noteForeignPin(now)
	}
	if !p.told.keysDone.Load() {
		p.watchKeys(r)
	}
}

// noteForeignPin counts a pin signed with another secret and tells a
// steady rate of them once.
func (p *Policy) noteForeignPin(now uint32) {
	f := &p.told.foreign
	p.told.mu.Lock()
	if f.n == 0 || now-f.first > foreignPinsWindow {
		*f = foreignPins{first: now, last: now, seconds: 1}
	} else if now != f.last {
		f.last = now
		f.seconds++
	}
	f.n++
	steady := f.n >= foreignPinsTold && f.seconds >= foreignPinsSeconds
	n, secs := f.n, f.last-f.first+1
	p.told.mu.Unlock()
	if !steady {
		return
	}
	p.warn(warnForeignPins, "pin cookies signed with another secret keep coming (well formed, but naming no upstream of this proxy under its secret): "+
		"another instance in front of the same clients signs pins with a secret of its own (each instance generates one when `secret` is unset "+
		"and Caddy's storage is not shared), so every session that crosses instances is placed anew and breaks, or another proxy on the same host with other upstreams uses the same pin cookie name; "+
		"give every instance the same `secret` (e.g. secret {env.AFFINITY_SECRET}) or the same Caddy storage, or give each proxy its own pin_cookie name",
		zap.Int("foreign_pins", n), zap.Uint32("within_seconds", secs))
}

// watchKeys notes which configured key sources the request carries and,
// after keyUnseenAfter requests, tells those none carried. The
// platform cookies (the default) and the client address are not
// watched: the first may legitimately be absent, the second never is.
func (p *Policy) watchKeys(r *http.Request) {
	seen := p.told.keySeen.Load()
	all := true
	for i := range p.Keys {
		k := &p.Keys[i]
		if !watchedKey(k) || seen&(1<<i) != 0 {
			continue
		}
		if _, ok := k.Hash(r); ok {
			seen = p.told.keySeen.Or(1<<i) | 1<<i
			continue
		}
		all = false
	}
	if all {
		p.told.keysDone.Store(true)
		return
	}
	if p.told.requests.Add(1) != keyUnseenAfter {
		return
	}
	p.told.keysDone.Store(true)
	for i := range p.Keys {
		k := &p.Keys[i]
		if watchedKey(k) && p.told.keySeen.Load()&(1<<i) == 0 {
			p.warn(warnKeyUnseen, fmt.Sprintf("key %s appeared in none of the first %d requests, so it keeps no session: "+
				"check its name against what the app really sends (names are case-sensitive; the browser's developer tools show the request's cookies and headers), "+
				"or remove the line", k, keyUnseenAfter))
			return // one at a time: the fix of one may be the fix of all
		}
	}
}

// watchedKey reports whether a key source that no request carries is a
// misconfiguration worth telling.
func watchedKey(k *keys.Source) bool {
	return !k.Default() && !k.Shared()
}

// tellWeights tells a weight list longer than the upstream list: the
// extra weights do nothing, and usually one upstream was removed and its
// weight left, so that every later upstream has its neighbour's weight.
func (p *Policy) tellWeights(upstreams int) {
	p.warn(warnWeights, fmt.Sprintf("weights lists %d weights for %d upstreams: the extra ones are ignored, and if an upstream was removed from the list "+
		"without its weight, every upstream after it now has its neighbour's; make the weights line match the upstream list, one weight per upstream in the same order",
		len(p.Weights), upstreams))
}

// warn logs msg once for kind, with fields, and keeps it for Warnings.
func (p *Policy) warn(kind int, msg string, fields ...zap.Field) {
	p.told.mu.Lock()
	if p.told.text[kind] != "" {
		p.told.mu.Unlock()
		return
	}
	p.told.text[kind] = msg
	p.told.mu.Unlock()
	p.logger.Warn(msg, fields...)
}

// toldWarnings returns the warnings told so far.
func (p *Policy) toldWarnings() []string {
	p.told.mu.Lock()
	defer p.told.mu.Unlock()
	var out []string
	for _, w := range p.told.text {
		if w != "" {
			out = append(out, w)
		}
	}
	return out
}

// checkSite tells what the config walk sees of the policy's proxy that
// cannot work: Caddy's active health checks (health_uri) on dynamic
// upstreams, where Caddy never runs them.
func (p *Policy) checkSite(s Site) {
	h := s.Handler
	if h == nil || h.DynamicUpstreams == nil || h.HealthChecks == nil || h.HealthChecks.Active == nil {
		return
	}
	fix := "add `probe <path>` to the lb_policy affinity block (a path every worker answers with 2xx, e.g. /healthz): " +
		"on dynamic upstreams it takes a worker that stops answering out within its interval × fails, and puts it back when it answers"
	if p.Probe != nil {
		fix = "the affinity probe (" + p.Probe.Path + ") already does this for dynamic upstreams: remove health_uri and the other health_* active check options"
	}
	p.warn(warnHealthURI, "health_uri (Caddy's active health checks) does nothing on dynamic upstreams: Caddy runs them only on the static upstream list, "+
		"so a worker that dies while still in the source's answer is found only by failing requests; "+fix)
}

// noteMissingLearner records, and logs once, that the policy serves
// requests without affinity_learn although it depends on it: with the pin
// cookie off, a new session is known only by the id its app issues in the
// response, which only the learner sees.
func (p *Policy) noteMissingLearner() {
	if p.missingLearner.Load() || !p.missingLearner.CompareAndSwap(false, true) {
		return
	}
	p.logger.Warn(p.missingLearnerWarning())
}

// missingLearnerWarning says what breaks and the line to add.
func (p *Policy) missingLearnerWarning() string {
	keys := make([]string, 0, len(p.Keys))
	for i := range p.Keys {
		if p.Keys[i].Learnable() {
			keys = append(keys, p.Keys[i].String())
		}
	}
	return fmt.Sprintf("pin_cookie is off and the session key (%s) is the app's own id, but no affinity_learn handler runs before this reverse_proxy: "+
		"a new session's next request carries an id the proxy has never seen and lands on another worker about (n-1)/n of the time, where the session does not exist; "+
		"add the line `affinity_learn` to the site (it is ordered before reverse_proxy), or put it first in the route or handle block",
		strings.Join(keys, ", "))
}

// Warnings are what an operator must know about a policy's config that
// its parser could not tell: its learner missing, and what warnings.go
// watches for.
func (p *Policy) Warnings() []string {
	var out []string
	if p.missingLearner.Load() {
		out = append(out, p.missingLearnerWarning())
	}
	return append(out, p.toldWarnings()...)
}

package affinity

import (
	"sync"
	"sync/atomic"

	"go.uber.org/zap"
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

	// Pins: requests that carried a pin cookie, and well-formed pins of
	// no upstream of the pool with any secret of ours, in the current
	// window (foreignWindow requests with a pin).
	pins, foreign atomic.Uint32

	// keySeen has bit i set once a request carried key source i;
	// keyless counts the requests before that for the sources still
	// unseen.
	keySeen atomic.Uint32
	keyless atomic.Uint32
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

package affinity

import "time"

// PolicyInfo describes one policy of the running config, for the status
// page.
type PolicyInfo struct {
	Site
	// Keys are the session keys, in order, as the Caddyfile writes them.
	Keys []string `json:"keys"`
	// PinCookie is the pin cookie's name, or "off".
	PinCookie  string `json:"pin_cookie"`
	SessionTTL string `json:"session_ttl"`
	Hold       string `json:"hold,omitempty"`
	SlowStart  string `json:"slow_start,omitempty"`
	// Upstreams are the policy's upstreams in config order, with their
	// weights and ring shares.
	Upstreams []PolicyUpstream `json:"upstreams"`
	// Error is set when the policy's ring cannot be shown.
	Error string `json:"error,omitempty"`
	// Warnings say what cannot work as configured (a missing learner).
	Warnings []string `json:"warnings,omitempty"`
}

// PolicyUpstream is one upstream of one policy.
type PolicyUpstream struct {
	Upstream string `json:"upstream"`
	Weight   int    `json:"weight"`
	// Share is the fraction of the ring (and so of new sessions' keys)
	// the upstream owns. Keys of an upstream that may not take new
	// sessions walk on to the next ones.
	Share float64 `json:"share"`
}

// Describe returns what the status page shows of the policy at s.
func Describe(s Site) PolicyInfo {
	p := s.Policy
	info := PolicyInfo{
		Site:       s,
		Keys:       make([]string, 0, len(p.Keys)),
		PinCookie:  p.PinCookie,
		SessionTTL: time.Duration(p.SessionTTL).String(),
		Upstreams:  []PolicyUpstream{},
		Warnings:   p.Warnings(),
	}
	if p.DisablePinCookie {
		info.PinCookie = "off"
	}
	if p.Hold > 0 {
		info.Hold = time.Duration(p.Hold).String()
	}
	if p.SlowStart > 0 {
		info.SlowStart = time.Duration(p.SlowStart).String()
	}
	for i := range p.Keys {
		info.Keys = append(info.Keys, p.Keys[i].String())
	}
	ps, err := poolFor(s)
	if err != nil {
		info.Error = err.Error()
		return info
	}
	for m, i := range ps.Member { // a repeated address once, with its total weight
		info.Upstreams = append(info.Upstreams, PolicyUpstream{Upstream: ps.Ups[i].Dial, Weight: ps.Weights[i], Share: ps.Ring.Share(m)})
	}
	return info
}

// Failovers returns the most recent failover events, newest first, and
// the number of failovers since the process started.
func Failovers() ([]FailoverEvent, uint64) { return failovers.snapshot() }

package healthcheck

import (
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
)

// Verdict says whether an upstream may take a request now and, if not,
// why: the one reason type. Caddy's health verdict and the lifecycle
// state (ForPinned, ForNew), the selection policy's gate on a pin and
// its ring walk's declines (weight 0, slow start, the balance_factor
// bound) are all Verdicts, and its String is the one wording of why an
// upstream cannot take a request (logs, the failover log, the lookup,
// the status page).
type Verdict uint8

const (
	// Serves: the upstream may serve.
	Serves Verdict = iota
	// Failed: this very request's attempt on it failed (the selection
	// policy knows this before Caddy's health checks do).
	Failed
	// Down: Caddy's active or passive health checks (or its circuit
	// breaker) say it is down.
	Down
	// Full: it is at max_requests.
	Full
	// NoNewSessions: it is draining; it keeps its sessions.
	NoNewSessions
	// InMaintenance: it takes nothing.
	InMaintenance
	// Removed: the proxy no longer has it (a reload removed it from the
	// upstreams); its sessions move.
	Removed
	// ZeroWeight: its weight is 0; the ring gives it no new sessions.
	ZeroWeight
	// Ramping: it came back recently and, in slow start, takes only a
	// share of the new sessions that reach it.
	Ramping
	// AtBound: it holds its balance_factor bound of live sessions.
	AtBound
)

var verdictWords = [...]string{
	Serves:        "serves",
	Failed:        "failed: this request's attempt on it failed",
	Down:          "down: Caddy's health checks",
	Full:          "full: at max_requests",
	NoNewSessions: "draining",
	InMaintenance: "maintenance",
	Removed:       "removed: no longer in the proxy's upstreams",
	ZeroWeight:    "weight 0",
	Ramping:       "slow start",
	AtBound:       "balance_factor: at its bound of live sessions",
}

// String says why an upstream cannot serve, for operators.
func (v Verdict) String() string {
	if int(v) < len(verdictWords) {
		return verdictWords[v]
	}
	return "unknown"
}

// ForPinned is the verdict for a session already pinned to the upstream,
// whose Caddy upstream (for this request's pool) is cu.
func (u *Upstream) ForPinned(cu *reverseproxy.Upstream) Verdict {
	if v := caddyVerdict(cu); v != Serves {
		return v
	}
	if !u.State().AcceptsPinned() {
		return InMaintenance
	}
	return Serves
}

// ForNew is the verdict for a new session.
func (u *Upstream) ForNew(cu *reverseproxy.Upstream) Verdict {
	if v := caddyVerdict(cu); v != Serves {
		return v
	}
	switch st := u.State(); {
	case st.AcceptsNew():
		return Serves
	case st.AcceptsPinned():
		return NoNewSessions
	}
	return InMaintenance
}

func caddyVerdict(cu *reverseproxy.Upstream) Verdict {
	switch {
	case cu == nil:
		return Serves
	case !cu.Healthy():
		return Down
	case cu.Full():
		return Full
	}
	return Serves
}

// Track makes cu the Caddy upstream whose health verdict the record
// reports. The config walker calls it for every upstream of the running
// config; the selection policy for every upstream of a new pool.
func (u *Upstream) Track(cu *reverseproxy.Upstream) {
	if u.caddy.Load() != cu {
		u.caddy.Store(cu)
	}
}

// Healthy is Caddy's health verdict, read now from the tracked Caddy
// upstream; true for an upstream never tracked.
func (u *Upstream) Healthy() bool {
	cu := u.caddy.Load()
	return cu == nil || cu.Healthy()
}

// TroubleGap is the longest quiet time between two reports of trouble of
// one incident: the config walker observes unhealthy upstreams every
// second, so an incident's reports are at most about a second apart.
const TroubleGap = 3 * time.Second

// NoteTrouble records that the upstream could not serve a request at now
// (a failed attempt, or Caddy's health checks say it is down). Reports
// closer together than gap belong to one incident; the first report after
// a quiet gap starts a new one. It returns how long the current incident
// has lasted.
func (u *Upstream) NoteTrouble(now time.Time, gap time.Duration) time.Duration {
	ns := now.UnixNano()
	last := u.troubleLast.Swap(ns)
	if last == 0 || ns-last > int64(gap) {
		u.troubleStart.Store(ns)
		return 0
	}
	start := u.troubleStart.Load()
	if start == 0 || start > ns {
		return 0
	}
	return time.Duration(ns - start)
}

// Holds reports whether a session pinned to the upstream, which cannot
// serve it now, should still wait for it under `hold`, noting the
// trouble: true within hold of the incident's start. Maintenance is an
// order to leave and is never held.
func (u *Upstream) Holds(now time.Time, hold time.Duration) bool {
	if hold <= 0 || !u.State().AcceptsPinned() {
		return false
	}
	// Two holds plus a gap: a hold's end is followed by a failover, and
	// the next trouble of the same incident must not start a new hold.
	return u.NoteTrouble(now, 2*hold+TroubleGap) < hold
}

// WouldHold is Holds without noting anything: whether a session pinned
// to the upstream would wait for it at now, for the lookup. It reads
// the incident as Holds would find it: a report of trouble now either
// goes on the current incident (within 2 × hold + TroubleGap of the last
// one), whose age then decides, or starts a new one, which holds.
func (u *Upstream) WouldHold(now time.Time, hold time.Duration) bool {
	if hold <= 0 || !u.State().AcceptsPinned() {
		return false
	}
	ns := now.UnixNano()
	last := u.troubleLast.Load()
	if last == 0 || ns-last > int64(2*hold+TroubleGap) {
		return true // a new incident
	}
	start := u.troubleStart.Load()
	if start == 0 || start > ns {
		return true
	}
	return time.Duration(ns-start) < hold
}

// MarkBack records that the upstream just became able to take new
// sessions again (recovered, returned to up, or added to a running
// config), which starts its slow-start ramp.
func (u *Upstream) MarkBack(now time.Time) { u.backSince.Store(now.UnixNano()) }

// BackFor returns how long ago the upstream last came back, or a very
// long time if it never left.
func (u *Upstream) BackFor(now time.Time) time.Duration {
	ns := u.backSince.Load()
	if ns == 0 {
		return 1<<63 - 1
	}
	return time.Duration(now.UnixNano() - ns)
}

// Observe looks at every upstream of the running config (the config
// walker calls it about once a second): it tracks each one's Caddy
// upstream, notes trouble of those that are down (for hold), and starts
// the slow-start ramp of those that became able to take new sessions
// since the last look. Upstreams of the config the process starts with
// are not new. What it sees is what Configured reports as the running
// config's upstreams until the next Observe, and a use that keeps their
// records from being forgotten (Expire).
func Observe(ups []*reverseproxy.Upstream, now time.Time) { defaultRegistry.observe(ups, now) }

func (r *registry) observe(ups []*reverseproxy.Upstream, now time.Time) {
	// One at a time, and the new generation published only once every
	// upstream seen carries it: a reader in between never finds an
	// upstream of the running config "not configured".
	r.observeMu.Lock()
	defer r.observeMu.Unlock()
	first := !r.looked.Load()
	next := r.gen.Load() + 1
	for _, cu := range ups {
		u := r.getAt(cu.Dial, now, next)
		u.Track(cu)
		healthy := cu.Healthy()
		if !healthy {
			u.NoteTrouble(now, TroubleGap)
		}
		placeable := healthy && u.State().AcceptsNew()
		was, known := u.placeable.Load(), u.observed.Load()
		if placeable && ((known && !was) || (!known && !first)) {
			u.MarkBack(now)
		}
		u.placeable.Store(placeable)
		u.observed.Store(true)
	}
	r.gen.Store(next)
	r.looked.Store(true)
}

// NoteAdded starts the slow-start ramp of upstreams a reload added, as
// soon as the new pool is first used rather than at the next Observe
// (up to a second of full share), and tracks their Caddy upstreams.
func NoteAdded(pool []*reverseproxy.Upstream, now time.Time) {
	r := defaultRegistry
	for _, cu := range pool {
		u := r.get(cu.Dial)
		u.Track(cu)
		if r.looked.Load() && !u.observed.Load() {
			u.MarkBack(now)
			u.placeable.Store(u.State().AcceptsNew())
			u.observed.Store(true)
		}
	}
}

// Package healthcheck owns whether an upstream may serve, in full: for
// every dial address it keeps
//
//   - Caddy's health verdict, read live from the Caddy upstream the
//     config walker last saw for the address (Track): active and passive
//     health checks, the circuit breaker and max_requests, never copied;
//   - its lifecycle state (up, draining, maintenance), set by an operator
//     (Operate) or by the upstream itself (the drain probe, Probe), and
//     shared with every instance using the same Caddy storage (AcquireSyncer);
//   - the clocks `hold` and `slow_start` read: how long it has been in
//     trouble (NoteTrouble) and how long it has been back (Observe, BackFor).
//
// Verdict combines the first two into one answer, with the words for
// why an upstream cannot serve. Upstreams are global and keyed by dial
// address, like Caddy's own hosts, so a state applies to every
// reverse_proxy that dials the address and survives config reloads.
//
// The package knows nothing of sessions: counting them is the affinity
// policy's job, and the admin API (package adminapi) puts both together.
package healthcheck

import (
	"encoding/json"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"
)

// State is an upstream's lifecycle state, set by an operator (admin API)
// or by the upstream itself (drain probe). Health (Caddy's active and
// passive checks) is separate: an upstream in state Up may still be down.
type State uint32

const (
	// Up takes new sessions and keeps its pinned ones.
	Up State = iota
	// Draining keeps the sessions already pinned to it and takes no new
	// ones, so that it empties as its sessions end.
	Draining
	// Maintenance takes nothing: its sessions fail over once and stay
	// where they land.
	Maintenance
)

var stateNames = [...]string{Up: "up", Draining: "draining", Maintenance: "maintenance"}

// String returns the state's name as used in the admin API.
func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", uint32(s))
}

// ParseState parses a state name ("up", "draining", "maintenance").
func ParseState(name string) (State, error) {
	for i, n := range stateNames {
		if n == name {
			return State(i), nil
		}
	}
	return 0, fmt.Errorf("unknown state %q: want one of up, draining, maintenance", name)
}

// MarshalJSON writes the state's name.
func (s State) MarshalJSON() ([]byte, error) { return json.Marshal(s.String()) }

// UnmarshalJSON reads a state's name.
func (s *State) UnmarshalJSON(b []byte) error {
	var name string
	if err := json.Unmarshal(b, &name); err != nil {
		return fmt.Errorf("state must be a string: %v", err)
	}
	st, err := ParseState(name)
	if err != nil {
		return err
	}
	*s = st
	return nil
}

// AcceptsNew reports whether an upstream in this state may be given a
// session it has not seen before.
func (s State) AcceptsNew() bool { return s == Up }

// AcceptsPinned reports whether an upstream in this state may go on
// serving the sessions already pinned to it.
func (s State) AcceptsPinned() bool { return s == Up || s == Draining }

// Upstream is the affinity-specific record of one dial address. Its
// methods are safe for concurrent use; reads on the request path are
// single atomic loads.
type Upstream struct {
	// Dial is the upstream's dial address, as in Caddy's config.
	Dial string
	// ID is a small process-wide number for the address, stable for the
	// life of the process, used by the session table instead of the
	// address itself.
	ID uint32

	state    atomic.Uint32
	since    atomic.Int64  // unix nanoseconds of the last state change
	setBy    atomic.Uint32 // a setter: who put it in its current state
	requests atomic.Uint64

	// caddy is the Caddy upstream the config walker (or a request) last
	// saw for this address; its Healthy and Full are the verdict.
	caddy atomic.Pointer[reverseproxy.Upstream]

	// hold and slow-start clocks (health.go), unix nanoseconds
	troubleStart, troubleLast, backSince atomic.Int64
	// placeable is whether the upstream could take new sessions at the
	// last observation, observed whether there was one (health.go).
	placeable, observed atomic.Bool

	// operator is the last state an operator set for this upstream, here
	// or on an instance sharing storage; nil if none ever was. Operator
	// states are ordered among themselves by their Since (last writer
	// wins), independently of what the probe does locally.
	operator atomic.Pointer[operatorRecord]

	// mu serializes state transitions, so that the probe's "only if"
	// rules cannot interleave with an operator's change.
	mu sync.Mutex
}

// setter says who put an upstream in its current state.
type setter uint32

const (
	// setByNone: the initial state, or the probe's undrain.
	setByNone setter = iota
	// setByOperator: an operator, through the admin API of this instance
	// or of one sharing its storage. The probe never overrides it.
	setByOperator
	// setByProbe: the drain probe, which may undo its own drain.
	setByProbe
)

func (s setter) String() string {
	switch s {
	case setByOperator:
		return "operator"
	case setByProbe:
		return "probe"
	}
	return ""
}

// Reasons for a state change, as logged.
const (
	reasonAdmin        = "admin api"
	reasonProbe        = "probe"
	reasonSync         = "storage sync"
	reasonProbeStopped = "probe stopped"
)

// operatorRecord is an operator's state for an upstream, as kept in
// Caddy's storage (JSON) and in memory.
type operatorRecord struct {
	// State is the state the operator asked for.
	State State `json:"state"`
	// Since is when, in unix nanoseconds; the newest record wins.
	Since int64 `json:"since"`
	// By names the Caddy instance whose admin API took the request.
	By string `json:"by,omitempty"`
}

// State returns the upstream's lifecycle state.
func (u *Upstream) State() State { return State(u.state.Load()) }

// Since returns when the state last changed (zero if never).
func (u *Upstream) Since() time.Time {
	ns := u.since.Load()
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}

// setLocked changes the state and its owner; u.mu must be held.
func (u *Upstream) setLocked(s State, at time.Time, by setter) (old State, changed bool) {
	old = State(u.state.Load())
	u.setBy.Store(uint32(by))
	if old == s {
		return old, false
	}
	u.state.Store(uint32(s))
	u.since.Store(at.UnixNano())
	return old, true
}

// setter returns who put the upstream in its current state.
func (u *Upstream) setter() setter { return setter(u.setBy.Load()) }

// SetBy says who put the upstream in its current state: "operator",
// "probe", or "" (never changed).
func (u *Upstream) SetBy() string { return u.setter().String() }

// CountRequest records that a request was sent to this upstream.
func (u *Upstream) CountRequest() { u.requests.Add(1) }

// Requests returns the number of requests the affinity policy sent here.
func (u *Upstream) Requests() uint64 { return u.requests.Load() }

// registry is a set of upstreams by dial address, with what is needed to
// change their states: the instance name written to storage, the logger
// for state changes and the live storage syncers. The process has one,
// defaultRegistry, behind the package functions; tests make more to play
// several Caddy instances in one process.
//
// A registry only grows: an entry is a few dozen bytes and keeping it
// means a state set by an operator survives a reload that briefly drops
// the upstream.
type registry struct {
	mu     sync.RWMutex
	byDial map[string]*Upstream
	byID   []*Upstream

	// instance names this process in storage records ("by").
	instance func() string
	// logger returns the logger for state changes.
	logger func() *zap.Logger

	syncMu  sync.Mutex
	syncers []*Syncer // live syncers, the most recently started last

	// looked is set by the first Observe: from then on an upstream seen
	// for the first time was added to a running config (slow start).
	looked atomic.Bool
}

func newRegistry(instance func() string, logger func() *zap.Logger) *registry {
	return &registry{byDial: make(map[string]*Upstream), instance: instance, logger: logger}
}

// defaultRegistry is the process-wide registry.
var defaultRegistry = newRegistry(defaultInstance, func() *zap.Logger {
	return caddy.Log().Named("affinity")
})

// Get returns the record for a dial address, creating it on first use.
func Get(dial string) *Upstream { return defaultRegistry.get(dial) }

// Lookup returns the record for a dial address, or nil if it has never
// been configured in this process.
func Lookup(dial string) *Upstream { return defaultRegistry.lookup(dial) }

// ByID returns the record with the given ID, or nil.
func ByID(id uint32) *Upstream { return defaultRegistry.byIDLookup(id) }

// All returns every known upstream, sorted by dial address.
func All() []*Upstream { return defaultRegistry.all() }

func (r *registry) get(dial string) *Upstream {
	r.mu.RLock()
	u := r.byDial[dial]
	r.mu.RUnlock()
	if u != nil {
		return u
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if u = r.byDial[dial]; u != nil {
		return u
	}
	u = &Upstream{Dial: dial, ID: uint32(len(r.byID))}
	r.byDial[dial] = u
	r.byID = append(r.byID, u)
	return u
}

func (r *registry) lookup(dial string) *Upstream {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.byDial[dial]
}

func (r *registry) byIDLookup(id uint32) *Upstream {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if int(id) < len(r.byID) {
		return r.byID[id]
	}
	return nil
}

func (r *registry) all() []*Upstream {
	r.mu.RLock()
	all := append([]*Upstream(nil), r.byID...)
	r.mu.RUnlock()
	sort.Slice(all, func(i, j int) bool { return all[i].Dial < all[j].Dial })
	return all
}

// operate applies a state an operator asked for through this instance's
// admin API and returns the record to share through storage. The record
// is stamped later than any operator record known here, so an operator's
// latest action wins even against a clock-skewed peer's.
func (r *registry) operate(u *Upstream, s State) operatorRecord {
	u.mu.Lock()
	now := time.Now().UnixNano()
	if prev := u.operator.Load(); prev != nil && now <= prev.Since {
		now = prev.Since + 1
	}
	rec := &operatorRecord{State: s, Since: now, By: r.instance()}
	u.operator.Store(rec)
	old, _ := u.setLocked(s, time.Unix(0, now), setByOperator)
	u.mu.Unlock()
	r.logChange(u, old, s, reasonAdmin)
	return *rec
}

// applyShared applies an operator record read from storage if it is newer
// than the operator record known here, and reports whether it did.
func (r *registry) applyShared(u *Upstream, rec operatorRecord) bool {
	u.mu.Lock()
	if prev := u.operator.Load(); prev != nil && rec.Since <= prev.Since {
		u.mu.Unlock()
		return false
	}
	u.operator.Store(&rec)
	old, changed := u.setLocked(rec.State, time.Unix(0, rec.Since), setByOperator)
	u.mu.Unlock()
	if changed {
		r.logChange(u, old, rec.State, reasonSync, zap.String("by", rec.By))
	}
	return true
}

// probeDrain drains u on the probe's word, if it is up.
func (r *registry) probeDrain(u *Upstream) bool {
	u.mu.Lock()
	if u.State() != Up {
		u.mu.Unlock()
		return false
	}
	u.setLocked(Draining, time.Now(), setByProbe)
	u.mu.Unlock()
	r.logChange(u, Up, Draining, reasonProbe)
	return true
}

// probeUndrain brings u back up if the probe is what drained it.
func (r *registry) probeUndrain(u *Upstream, reason string) bool {
	u.mu.Lock()
	if u.State() != Draining || u.setter() != setByProbe {
		u.mu.Unlock()
		return false
	}
	u.setLocked(Up, time.Now(), setByNone)
	u.mu.Unlock()
	r.logChange(u, Draining, Up, reason)
	return true
}

// logChange logs a state change (or, from the admin API, an operator's
// confirmation of the current state).
func (r *registry) logChange(u *Upstream, old, s State, reason string, fields ...zap.Field) {
	fields = append([]zap.Field{
		zap.String("upstream", u.Dial),
		zap.String("old_state", old.String()),
		zap.String("new_state", s.String()),
		zap.String("reason", reason),
	}, fields...)
	msg := "upstream state changed"
	if old == s {
		msg = "upstream state confirmed" // an operator set the state it had
	}
	r.logger().Info(msg, fields...)
}

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
	"strings"
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
// What a state means and how it is named, offered and worded everywhere
// (admin API, CLI, status page, metrics, verdicts) is its row of States.
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

// StateInfo is everything said of one lifecycle state. Adding a state is
// adding a constant and its row to States.
type StateInfo struct {
	State State `json:"-"`
	// Name is the state's name in the admin API, storage and logs.
	Name string `json:"name"`
	// Verb is the `caddy affinity <verb> <upstream>` subcommand and the
	// status page's button that put an upstream in the state.
	Verb string `json:"verb"`
	// Short is the subcommand's one-line help.
	Short string `json:"-"`
	// Help says what the state does, for the subcommand's help and the
	// status page's legend.
	Help string `json:"help"`
	// TakesNew: the upstream may be given a session it has not seen
	// before. KeepsPinned: it serves the sessions already pinned to it.
	TakesNew    bool `json:"takes_new"`
	KeepsPinned bool `json:"keeps_pinned"`
	// Is is how the state reads after "<upstream> is now": "in
	// maintenance".
	Is string `json:"is"`
	// Now words what the change means, after "<upstream> is now <Is>: ";
	// {sessions} stands for the upstream's live sessions. Empty for
	// nothing more.
	Now string `json:"now,omitempty"`
	// Colour is how the status page shows it: "ok", "warn" or "bad".
	Colour string `json:"colour"`
	// Confirm is the question the status page asks before the change;
	// empty for none.
	Confirm string `json:"confirm,omitempty"`
}

// Drains reports whether an upstream in state s empties as its sessions
// end (see StateInfo.Drains).
func (s State) Drains() bool { i, _ := s.Info(); return i.Drains() }

// Drains reports whether an upstream in the state empties as its
// sessions end (keeps them, takes no new ones): it is drained once it
// holds none, and can be waited for.
func (i StateInfo) Drains() bool { return i.KeepsPinned && !i.TakesNew }

// States is every lifecycle state, in order of their values.
var States = []StateInfo{
	{
		State: Up, Name: "up", Verb: "up", Is: "up", Colour: "ok",
		Short:    "Puts an upstream back in service",
		TakesNew: true, KeepsPinned: true,
		Help: `Puts an upstream back in the up state: it takes new sessions again
(ramped under slow_start) and serves the sessions still pinned to it.
Sessions that failed over away from it stay where they are.`,
	},
	{
		State: Draining, Name: "draining", Verb: "drain", Is: "draining", Colour: "warn",
		Short:       "Drains an upstream: it keeps its sessions and takes no new ones",
		KeepsPinned: true,
		Now:         "it keeps its {sessions} live sessions and takes no new ones",
		Help: `Puts an upstream in the draining state: the sessions pinned to it stay
there, new sessions go to the other upstreams, and once its last session
has ended (session_ttl after its last request) it is drained: it can be
stopped or deployed without cutting a session.`,
	},
	{
		State: Maintenance, Name: "maintenance", Verb: "maintenance", Is: "in maintenance", Colour: "bad",
		Short:   "Takes an upstream out of service now: its sessions fail over",
		Now:     "its sessions fail over on their next request",
		Confirm: "Its sessions fail over on their next request and stay where they land.",
		Help: `Puts an upstream in maintenance: it takes no request at all. Its
sessions fail over on their next request, once, and stay where they
land, also when the upstream comes back.`,
	},
}

// Info returns the state's row of States.
func (s State) Info() (StateInfo, bool) {
	if int(s) < len(States) {
		return States[s], true
	}
	return StateInfo{}, false
}

// String returns the state's name as used in the admin API.
func (s State) String() string {
	if i, ok := s.Info(); ok {
		return i.Name
	}
	return fmt.Sprintf("state(%d)", uint32(s))
}

// StateNames lists the states' names: "up, draining or maintenance".
func StateNames(sep, last string) string {
	names := make([]string, len(States))
	for i, st := range States {
		names[i] = st.Name
	}
	if len(names) == 1 {
		return names[0]
	}
	return strings.Join(names[:len(names)-1], sep) + last + names[len(names)-1]
}

// ParseState parses a state name ("up", "draining", "maintenance").
func ParseState(name string) (State, error) {
	for _, i := range States {
		if i.Name == name {
			return i.State, nil
		}
	}
	return 0, fmt.Errorf("unknown state %q: want one of %s", name, StateNames(", ", ", "))
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
// (On the request path: an indexed load, no copy of the row.)
func (s State) AcceptsNew() bool { return int(s) < len(States) && States[s].TakesNew }

// AcceptsPinned reports whether an upstream in this state may go on
// serving the sessions already pinned to it.
func (s State) AcceptsPinned() bool { return int(s) < len(States) && States[s].KeepsPinned }

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

	// seen is when a config last used the upstream (unix nanoseconds):
	// every Observe of the running config and every pool's first use
	// stamp it (get), never a request. A record not seen for
	// forgetAfter, with no live session, is forgotten (Expire).
	seen atomic.Int64
	// seenGen is the Observe generation of that use: the upstream is in
	// the running config while it is not older than the registry's
	// (Configured).
	seenGen atomic.Uint64
	// reg is the registry holding the record, for its generation.
	reg *registry

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

// Configured reports whether a config uses the upstream now: the last
// Observe of the running config saw it (a static upstream, or a dynamic
// one in the last pool its proxy used), or a pool started using it since.
// An upstream that is no longer configured is still known (its state,
// its sessions) until it is forgotten; see Expire.
func (u *Upstream) Configured() bool {
	return u.reg == nil || u.seenGen.Load() >= u.reg.gen.Load()
}

// LastUsed returns when a config last used the upstream (see Configured).
func (u *Upstream) LastUsed() time.Time { return time.Unix(0, u.seen.Load()) }

// use stamps a use by a config at ns, of Observe generation gen. Racing
// stamps may leave the earlier one: they are a second apart at most,
// against a grace of minutes.
func (u *Upstream) use(ns int64, gen uint64) {
	if u.seen.Load() < ns {
		u.seen.Store(ns)
	}
	if u.seenGen.Load() < gen {
		u.seenGen.Store(gen)
	}
}

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
// A record lives while a config uses its upstream and for forgetAfter
// after the last use (so that a state set by an operator survives a
// reload that briefly drops the upstream), and as long as the session
// table holds live sessions for it (Expire). IDs are never reused: the
// session table names upstreams by ID, so a forgotten record's ID must
// never name another upstream; the address used again gets a new record
// and a new ID. byID keeps a nil slot for a forgotten one (8 bytes per
// address ever used; the record itself is freed).
type registry struct {
	mu     sync.RWMutex
	byDial map[string]*Upstream
	byID   []*Upstream
	// pending are operator states in storage for addresses this process
	// does not know now (read by the syncer, or kept from a forgotten
	// record): a record created for one of them starts in that state, so
	// that a restarted instance, or an upstream added back, never serves
	// a request before its stored state applies.
	pending map[string]storedRecord

	// instance names this process in storage records ("by").
	instance func() string
	// logger returns the logger for state changes.
	logger func() *zap.Logger
	// clock is time.Now; tests set their own.
	clock func() time.Time

	syncMu  sync.Mutex
	syncers []*Syncer // live syncers, the most recently started last

	// looked is set by the first Observe: from then on an upstream seen
	// for the first time was added to a running config (slow start).
	looked atomic.Bool
	// gen is the generation of the last Observe (Configured); observeMu
	// serializes Observes (the farm's and the admin API's).
	gen       atomic.Uint64
	observeMu sync.Mutex
}

func newRegistry(instance func() string, logger func() *zap.Logger) *registry {
	return &registry{
		byDial:   make(map[string]*Upstream),
		pending:  make(map[string]storedRecord),
		instance: instance,
		logger:   logger,
		clock:    time.Now,
	}
}

// defaultRegistry is the process-wide registry.
var defaultRegistry = newRegistry(defaultInstance, func() *zap.Logger {
	return caddy.Log().Named("affinity")
})

// Get returns the record for a dial address, creating it on first use,
// and counts as a use by a config (see Configured): the selection policy
// calls it for every upstream of a new pool.
func Get(dial string) *Upstream { return defaultRegistry.get(dial) }

// Lookup returns the record for a dial address, or nil if no config of
// this process has used it within the grace (see Expire).
func Lookup(dial string) *Upstream { return defaultRegistry.lookup(dial) }

// ByID returns the record with the given ID, or nil (never known, or
// forgotten).
func ByID(id uint32) *Upstream { return defaultRegistry.byIDLookup(id) }

// All returns every known upstream, configured or not, sorted by dial
// address.
func All() []*Upstream { return defaultRegistry.all() }

// get returns the record for dial, creating it if needed, stamped as used
// now until the Observe after the next one (a new pool is walked by the
// farm's next look, which may have begun without it).
func (r *registry) get(dial string) *Upstream {
	return r.getAt(dial, r.clock(), r.gen.Load()+1)
}

// getAt returns the record for dial, creating it if needed, stamped as
// used at now by Observe generation gen.
func (r *registry) getAt(dial string, now time.Time, gen uint64) *Upstream {
	ns := now.UnixNano()
	r.mu.RLock()
	u := r.byDial[dial]
	if u != nil {
		// Stamped under the lock: Expire holds it to drop a record, so a
		// record handed out here is never one being forgotten.
		u.use(ns, gen)
	}
	r.mu.RUnlock()
	if u != nil {
		return u
	}
	r.mu.Lock()
	if u = r.byDial[dial]; u != nil {
		u.use(ns, gen)
		r.mu.Unlock()
		return u
	}
	u = &Upstream{Dial: dial, ID: uint32(len(r.byID)), reg: r}
	u.use(ns, gen)
	rec, stored := r.pending[dial]
	if stored {
		delete(r.pending, dial)
		stored = fresh(rec, now)
	}
	if stored {
		// Nobody else has the record yet: no lock, no race.
		op := rec.operatorRecord
		u.operator.Store(&op)
		u.state.Store(uint32(op.State))
		u.since.Store(op.Since)
		u.setBy.Store(uint32(setByOperator))
	}
	r.byDial[dial] = u
	r.byID = append(r.byID, u)
	r.mu.Unlock()
	if stored && rec.State != Up {
		r.logChange(u, Up, rec.State, reasonSync, zap.String("by", rec.By))
	}
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
	all := make([]*Upstream, 0, len(r.byDial))
	for _, u := range r.byDial {
		all = append(all, u)
	}
	r.mu.RUnlock()
	sort.Slice(all, func(i, j int) bool { return all[i].Dial < all[j].Dial })
	return all
}

// Expire forgets the upstreams no config has used for forgetAfter (10
// minutes) that hold no live session (busy reports whether the session
// table holds live sessions for an ID; nil: none does): they leave All,
// Lookup and ByID, so the admin API, the status page and the metrics stop
// showing them. A forgotten upstream's operator state stays in storage
// (see Syncer), and applies again if a config uses the address within
// stateGrace. The farm calls it after every Observe.
func Expire(now time.Time, busy func(id uint32) bool) []string {
	return defaultRegistry.expire(now, busy)
}

func (r *registry) expire(now time.Time, busy func(id uint32) bool) []string {
	cutoff := now.Add(-forgetAfter).UnixNano()
	stale := func(u *Upstream) bool {
		return u.seen.Load() < cutoff && (busy == nil || !busy(u.ID))
	}
	// Look under the read lock first: nearly every second nothing is due,
	// and a request building a pool (get) is not held up.
	r.mu.RLock()
	due := false
	for _, u := range r.byDial {
		if stale(u) {
			due = true
			break
		}
	}
	r.mu.RUnlock()
	if !due {
		return nil
	}
	var gone []*Upstream
	r.mu.Lock()
	for dial, u := range r.byDial {
		if !stale(u) {
			continue
		}
		delete(r.byDial, dial)
		r.byID[u.ID] = nil
		if op := u.operator.Load(); op != nil {
			// So that the address used again before the syncer's next
			// round starts in its state (the syncer replaces it by what
			// storage holds).
			r.pending[dial] = storedRecord{Upstream: dial, operatorRecord: *op, Seen: u.seen.Load()}
		}
		gone = append(gone, u)
	}
	r.mu.Unlock()
	names := make([]string, len(gone))
	for i, u := range gone {
		names[i] = u.Dial
		r.logger().Info("forgot upstream no config has used",
			zap.String("upstream", u.Dial), zap.Time("last_used", u.LastUsed()),
			zap.Duration("grace", forgetAfter), zap.String("state", u.State().String()))
	}
	sort.Strings(names)
	return names
}

// operate applies a state an operator asked for through this instance's
// admin API and returns the record to share through storage. The record
// is stamped later than any operator record known here, so an operator's
// latest action wins even against a clock-skewed peer's.
func (r *registry) operate(u *Upstream, s State) operatorRecord {
	u.mu.Lock()
	now := r.clock().UnixNano()
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

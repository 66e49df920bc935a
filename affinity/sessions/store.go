// Package sessions is the session memory of the affinity policy: the
// process-wide session table, and the backends that keep it beyond the
// process (`store memory`, `store local`, `store redis`), behind one
// handle per policy. The policy asks its handle; it never asks which
// backend it has.
//
// A backend is one file plus its tests: it implements backend (what a
// store shared by instances answers: lookups, writes, cluster-wide
// counts, write back) or, like memory and local, keeps nothing outside
// the table that a request needs.
package sessions

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// RetireGrace is how long, in table seconds, the entry of a session id
// the app replaced stays after the response that replaced it.
const RetireGrace = 30

// Store is the process's session memory, owned by the farm: the table,
// the snapshot writer of `store local`, and the clients of shared stores
// (one per address, credentials, db and key prefix, shared by the
// policies that name it). A reload opens the new config's handles before
// it closes the old ones, so clients and the table go on across it.
type Store struct {
	table   *Table
	persist *persister

	mu      sync.Mutex
	clients map[clientKey]*redisClient
	handles map[*Handle]struct{}
	closed  bool
}

// NewStore starts the process's session memory with a table of
// maxSessions.
func NewStore(maxSessions int) *Store {
	t := NewTable(maxSessions)
	return &Store{
		table:   t,
		persist: newPersister(t),
		clients: make(map[clientKey]*redisClient),
		handles: make(map[*Handle]struct{}),
	}
}

// Table returns the process's session table.
func (s *Store) Table() *Table { return s.table }

// Options are what a policy opens its handle with, all known at
// Provision.
type Options struct {
	Config *Config
	// Scope is the policy's namespace in the process's table (XORed into
	// every key); 0 when it is not known yet (see Handle.SetScope).
	Scope uint64
	// Namespace names the policy's entries in a shared store: the same
	// on every instance that serves the same site, another for every
	// other site of the process unless they share a scope.
	Namespace string
	// TTL is the session TTL in seconds; MaxSessions the policy's bound.
	TTL         uint32
	MaxSessions int
	Logger      *zap.Logger
	// Storage is where `store local` keeps its snapshot (nil: none).
	Storage certmagic.Storage
}

// Open returns a policy's handle on the session memory. For `store
// local` the first handle reads the snapshot back into the table, here:
// before the config serves its first request.
func (s *Store) Open(o Options) (*Handle, error) {
	h := &Handle{store: s, table: s.table, ttl: o.TTL, maxSessions: int64(o.MaxSessions), logger: o.Logger}
	h.scope.Store(o.Scope)
	if h.logger == nil {
		h.logger = zap.NewNop()
	}
	switch o.Config.kind() {
	case KindLocal:
		if o.Storage != nil {
			s.persist.want(h, o.Storage, o.Config.interval())
		}
	case KindRedis:
		c, err := s.client(o.Config, h.logger)
		if err != nil {
			return nil, err
		}
		h.remote, h.timeout = c.open(h, o.Namespace), c.timeout
	}
	s.mu.Lock()
	s.handles[h] = struct{}{}
	s.mu.Unlock()
	return h, nil
}

// Close stops the snapshot writer and every client left.
func (s *Store) Close() {
	s.mu.Lock()
	s.closed = true
	clients := s.clients
	s.clients = map[clientKey]*redisClient{}
	s.mu.Unlock()
	for _, c := range clients {
		c.close()
	}
	s.persist.close()
}

// ClusterSessions returns the most live sessions on dial that any open
// shared store last counted, and whether one has a count.
func (s *Store) ClusterSessions(dial string) (int64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var most int64
	found := false
	for h := range s.handles {
		if h.remote == nil {
			continue
		}
		if n, ok := h.remote.clusterSessions(dial); ok {
			most, found = max(most, n), true
		}
	}
	return most, found
}

// ClusterCountPending reports whether a shared store whose namespace
// uses dial has not counted the cluster's sessions on it yet (since it
// opened, or Redis has not answered since): other instances may hold
// sessions there that this one does not know, so nobody may call it
// drained.
func (s *Store) ClusterCountPending(dial string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for h := range s.handles {
		if h.remote == nil || !h.remote.serves(dial) {
			continue
		}
		if _, ok := h.remote.clusterSessions(dial); !ok {
			return true
		}
	}
	return false
}

// backend is a store that instances share: what the handle asks of it
// beyond the local table. Every method is bounded by the request's
// budget (or runs in the background) and degrades to "nothing known"
// when the store fails: a dependency that is down degrades the feature,
// never the request.
type backend interface {
	// fetch returns what the store holds for keys (unscoped hashes), in
	// one round trip; nil when it holds nothing or failed.
	fetch(keys []uint64, deadline time.Time) []remoteEntry
	// record writes ws, in one round trip.
	record(ws []remoteWrite, deadline time.Time)
	// retire makes key expire within RetireGrace everywhere; forget
	// deletes it everywhere. dial is where it was counted, if known.
	retire(key uint64, dial string, deadline time.Time)
	forget(key uint64, dial string, deadline time.Time)
	// clusterLoad returns the cluster's live sessions on dial given this
	// instance's exact local count; clusterSessions the cluster's as last
	// counted.
	clusterLoad(dial string, local int64) int64
	clusterSessions(dial string) (int64, bool)
	// serves reports whether dial is one of the namespace's upstreams
	// as of the last refresh.
	serves(dial string) bool
	// refresh counts the cluster's sessions on dials and writes back
	// what the store lost or missed, in the background.
	refresh(dials []string)
	// close lets go of the store.
	close()
}

// Handle is one policy's namespace in the session memory. Its methods
// are the policy's whole view of sessions, whatever the backend.
type Handle struct {
	store       *Store
	table       *Table
	scope       atomic.Uint64
	ttl         uint32
	maxSessions int64
	logger      *zap.Logger
	// remote is the shared store, nil for memory and local, whose memory
	// is the table.
	remote backend
	// timeout is what a request waits for the shared store in all.
	timeout time.Duration

	// The bound on new entries written to the shared store (see admit).
	window  atomic.Uint32
	written atomic.Int64
	refused logLimit
}

// PersistTo makes the handle one that writes the table to storage every
// interval (what Open does for `store local` with the config's storage);
// the first reads the snapshot back.
func (h *Handle) PersistTo(storage certmagic.Storage, interval time.Duration) {
	h.store.persist.want(h, storage, interval)
}

// Close lets go of the handle: the last handle of a client closes it,
// the last with store local writes the snapshot.
func (h *Handle) Close() {
	s := h.store
	s.persist.release(h)
	s.mu.Lock()
	delete(s.handles, h)
	s.mu.Unlock()
	if h.remote != nil {
		h.remote.close()
	}
}

// Table returns the process's table (for counts and statistics).
func (h *Handle) Table() *Table { return h.table }

// TTL returns the session TTL in seconds.
func (h *Handle) TTL() uint32 { return h.ttl }

// Scope returns the handle's namespace in the table, 0 if not known.
func (h *Handle) Scope() uint64 { return h.scope.Load() }

// SetScope sets the handle's namespace in the table when Provision could
// not know it (a policy outside any site of the config: unit tests).
func (h *Handle) SetScope(scope uint64) { h.scope.CompareAndSwap(0, scope) }

// Key returns key (a key hash) as the table stores it for this handle.
func (h *Handle) Key(key uint64) uint64 { return key ^ h.scope.Load() }

// Budget is what a request may still wait for a shared store: the
// store's timeout in all, from the first round trip it makes. The zero
// value has not started. A request keeps one on its stack and hands it
// to every call.
type Budget struct {
	deadline time.Time
}

// Deadline returns when the budget ends, starting it with timeout if it
// has not started (a nil budget starts afresh).
func (b *Budget) Deadline(timeout time.Duration) time.Time {
	if b == nil {
		return time.Now().Add(timeout)
	}
	if b.deadline.IsZero() {
		b.deadline = time.Now().Add(timeout)
	}
	return b.deadline
}

// deadlineContext returns a context that ends at deadline; ok is false
// when it has passed.
func deadlineContext(deadline time.Time) (context.Context, context.CancelFunc, bool) {
	if !time.Now().Before(deadline) {
		return nil, nil, false
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	return ctx, cancel, true
}

// Query is how Lookup reads.
type Query struct {
	// Now is the table clock.
	Now uint32
	// Dry reads everything a selection reads, the shared store included,
	// and writes nothing: no slide, no local copy, no write.
	Dry bool
	// LaterAliases lets an alias entry count for keys after the first
	// (an alias always counts for the first key).
	LaterAliases bool
	// Budget bounds the round trip to a shared store.
	Budget *Budget
}

// Lookup returns the upstream of the first of keys that has a live entry
// whose upstream pick accepts (pick also sees the upstreams it turns
// down). Local first; on a miss, one round trip to a shared store, whose
// answer is kept locally (unless q.Dry).
func (h *Handle) Lookup(keys []uint64, q Query, pick func(id uint32) bool) (uint32, bool) {
	for j, key := range keys {
		if id, ok := h.follow(key, q, j == 0 || q.LaterAliases); ok && pick(id) {
			return id, true
		}
	}
	if h.remote == nil || len(keys) == 0 {
		return 0, false
	}
	// A copy: keys lives on the request's stack, which must not escape
	// through the interface call.
	return h.fetch(slices.Clone(keys), q, pick)
}

// follow follows key in the handle's namespace. Without a shared store
// it slides the entry (unless dry); with one, Remember slides it, so
// that it sees the expiry before the slide and knows when a write back
// is due. On a miss it also looks in the shared namespace (zero), where
// entries written before the scope was known are, and moves what it
// finds into the handle's, so that the session counts once.
func (h *Handle) follow(key uint64, q Query, aliases bool) (uint32, bool) {
	scope := h.scope.Load()
	var id uint32
	var ok bool
	if q.Dry || h.remote != nil {
		e, found := h.table.Peek(key^scope, q.Now)
		id, ok = e.Upstream(), found && (aliases || !e.Alias())
	} else {
		id, ok = h.table.Follow(key^scope, q.Now, h.ttl, aliases)
	}
	if ok || scope == 0 {
		return id, ok
	}
	e, found := h.table.Peek(key, q.Now)
	if !found || (!aliases && e.Alias()) {
		return 0, false
	}
	if !q.Dry {
		h.table.Remove(key)
		h.table.Put(key^scope, e.Ref(), q.Now, h.ttl)
	}
	return e.Upstream(), true
}

// fetch is Lookup's round trip to the shared store.
func (h *Handle) fetch(keys []uint64, q Query, pick func(id uint32) bool) (uint32, bool) {
	got := h.remote.fetch(keys, q.Budget.Deadline(h.timeout))
	for j, e := range got {
		if !e.ok || (j > 0 && !q.LaterAliases && e.alias) {
			continue
		}
		rec := healthcheck.Lookup(e.dial)
		if rec == nil || !pick(rec.ID) {
			continue
		}
		if !q.Dry {
			// Established: it is in the store already, so the next
			// request does not write it again, unless it was last
			// written in the previous generation: then, as if last
			// seen then, this request's Remember carries it over.
			up := rec.ID | EstablishedBit
			if e.alias {
				up |= AliasBit
			}
			expires := q.Now + h.ttl
			if e.prev {
				expires = h.generation(q.Now)*max(h.ttl, 1) + h.ttl - 1
			}
			h.table.Restore(h.Key(keys[j]), NewEntry(up, expires), q.Now)
		}
		return rec.ID, true
	}
	return 0, false
}

// Peek returns key's live entry in the handle's namespace, untouched.
func (h *Handle) Peek(key uint64, now uint32) (Entry, bool) {
	return h.table.Peek(h.Key(key), now)
}

// Remember records (and slides) key -> upstream id for every key of a
// request: the first is the session's main entry, the others aliases.
// A shared store gets what is due (see due), all keys in one round trip.
func (h *Handle) Remember(keys []uint64, id uint32, now uint32, b *Budget) {
	if h.remote == nil {
		for i, key := range keys {
			if i == 0 {
				h.table.Swap(h.Key(key), id, now, h.ttl, true)
			} else {
				h.table.Put(h.Key(key), id|AliasBit, now, h.ttl)
			}
		}
		return
	}
	// Allocated only when something is due (then a round trip follows):
	// a known session's requests stay free of allocations.
	var ws []remoteWrite
	for i, key := range keys {
		up := id
		if i > 0 {
			up |= AliasBit
		}
		if w, ok := h.due(key, up, now, false, i == 0); ok {
			ws = append(ws, w)
		}
	}
	if len(ws) > 0 {
		h.remote.record(ws, b.Deadline(h.timeout))
	}
}

// Learn records a session id the app issued on upstream id. A shared
// store gets it before the response that issues it leaves, so that its
// next request finds it on any instance.
func (h *Handle) Learn(key uint64, id uint32, now uint32, b *Budget) {
	if h.remote == nil {
		h.table.Put(h.Key(key), id, now, h.ttl)
		return
	}
	if w, ok := h.due(key, id, now, true, false); ok {
		h.remote.record([]remoteWrite{w}, b.Deadline(h.timeout))
	}
	h.table.Establish(h.Key(key), now)
}

// Retire makes key's entry (an id the app replaced) expire within
// RetireGrace, here and in a shared store.
func (h *Handle) Retire(key uint64, now uint32, b *Budget) {
	k := h.Key(key)
	if h.remote != nil {
		h.remote.retire(key, h.entryDial(k, now), b.Deadline(h.timeout))
	}
	h.table.Retire(k, now+RetireGrace)
}

// Forget deletes key's entry (an id the app deleted), here and in a
// shared store.
func (h *Handle) Forget(key uint64, now uint32, b *Budget) {
	k := h.Key(key)
	if h.remote != nil {
		h.remote.forget(key, h.entryDial(k, now), b.Deadline(h.timeout))
	}
	h.table.Remove(k)
}

// Sessions returns the live sessions on the upstream with ID id and dial
// address dial: the table's, exact; with a shared store the cluster's
// (this instance's placements exact, the others' as last counted).
func (h *Handle) Sessions(id uint32, dial string) int64 {
	n := max(0, h.table.LiveCount(id))
	if h.remote != nil {
		n = h.remote.clusterLoad(dial, n)
	}
	return n
}

// Refresh is the farm's once-a-second call with the policy's upstreams
// (those of its last pool for dynamic upstreams): a shared store counts
// the cluster's sessions on them and writes back what it lost.
func (h *Handle) Refresh(dials []string) {
	if h.remote != nil {
		h.remote.refresh(dials)
	}
}

// entryDial returns the dial of a table key's live main entry, or "" for
// a key the table does not have or an alias, which is not counted.
func (h *Handle) entryDial(key uint64, now uint32) string {
	e, ok := h.table.Peek(key, now)
	if !ok || e.Alias() {
		return ""
	}
	dial, _ := registryDial(e.Upstream())
	return dial
}

// Ways a write goes to a shared store (remoteWrite.how).
const (
	// writeNew: a key the store may not have; another instance may
	// have recorded it meanwhile, so an entry already there is kept.
	writeNew = iota
	// writeSlide: a live entry's expiry written back.
	writeSlide
	// writeMove: the session moved (failover): overwrite and publish.
	writeMove
	// writeBack: an entry written back after an outage, kept if the
	// store has one.
	writeBack
)

// remoteWrite is one entry a write sends: key -> dial (from is the dial
// a move leaves).
type remoteWrite struct {
	key        uint64
	dial, from string
	alias      bool
	how        int
}

// remoteEntry is what a shared store holds for one key.
type remoteEntry struct {
	dial  string
	alias bool
	// prev is set for an entry last written in the previous generation
	// of a store that keeps generations: the request writes it again.
	prev bool
	ok   bool
}

// writeBackQuantum is a quarter of the TTL, the margin of the bound's
// window (admit).
func writeBackQuantum(ttl uint32) uint32 { return max(ttl/4, 1) }

// generation returns the generation of table second t: a shared store
// keeps entries by generations of one session_ttl, and a live session is
// written once in each it is active in.
func (h *Handle) generation(t uint32) uint32 { return t / max(h.ttl, 1) }

// due records key -> up (up may carry AliasBit) in the table and returns
// the write a shared store is due:
//   - a key seen for the first time is not written (one-shot keys, a
//     client's flood of random cookies, never reach the store) unless
//     the app issued it (learned): the ring places it alike everywhere
//     meanwhile;
//   - a key seen the second time (established), or learned, is written
//     if the bound allows (admit);
//   - a move is written and published;
//   - a live entry is carried into each generation (one session_ttl) it
//     is active in, once: its first request in a generation writes it.
//
// first says key is the request's first key (Table.FirstKeyRef).
func (h *Handle) due(key uint64, up uint32, now uint32, learned, first bool) (remoteWrite, bool) {
	old, live := h.table.Swap(h.Key(key), up, now, h.ttl, first)
	if first {
		up = FirstKeyRef(old, live, up)
	}
	moved := live && old.Ref()&^EstablishedBit != up
	w := remoteWrite{key: key, alias: up&AliasBit != 0, how: writeSlide}
	switch {
	case moved:
		w.how = writeMove
		w.from, _ = registryDial(old.Upstream())
		if !old.established() && !h.admit(now) {
			return remoteWrite{}, false
		}
	case !live && !learned:
		return remoteWrite{}, false
	case !live || !old.established():
		w.how = writeNew
		if !h.admit(now) {
			return remoteWrite{}, false
		}
	case h.generation(old.Expires()-min(old.Expires(), h.ttl)) == h.generation(now):
		// Written in this generation already (or by whoever this
		// instance read it from).
		return remoteWrite{}, false
	}
	dial, ok := registryDial(up & UpstreamMask)
	if !ok {
		return remoteWrite{}, false
	}
	w.dial = dial
	return w, true
}

// admit counts a new entry written to the shared store and reports
// whether the bound allows it: at most max_sessions new entries per
// window of session_ttl plus a quarter (the most an entry lives in the
// store without a write), so that this instance keeps at most twice
// max_sessions entries there, whatever its clients send. Past the bound
// new sessions live in the table alone (and the ring places them alike
// everywhere); it is logged, rate-limited.
func (h *Handle) admit(now uint32) bool {
	win := now / (h.ttl + writeBackQuantum(h.ttl))
	if h.window.Load() != win && h.window.Swap(win) != win {
		h.written.Store(0)
	}
	if h.written.Add(1) <= h.maxSessions || h.maxSessions <= 0 {
		return true
	}
	h.refused.log(h.logger, "the shared session store's bound is reached: max_sessions new entries per session_ttl; new sessions are kept in this instance's table only until the window ends")
	return false
}

// logLimit logs a message at most once per logEvery, with how many
// times it happened.
type logLimit struct {
	last  atomic.Int64
	count atomic.Int64
}

const logEvery = 10 * time.Second

func (l *logLimit) log(logger *zap.Logger, msg string, fields ...zap.Field) {
	n := l.count.Add(1)
	now := time.Now().UnixNano()
	last := l.last.Load()
	if now-last < int64(logEvery) || !l.last.CompareAndSwap(last, now) {
		return
	}
	l.count.Add(-n)
	logger.Warn(msg, append(fields, zap.Int64("times", n), zap.Duration("logged_at_most_every", logEvery))...)
}

// registryDial maps an upstream ID to its dial through the process's
// healthcheck registry.
func registryDial(id uint32) (string, bool) {
	if u := healthcheck.ByID(id); u != nil {
		return u.Dial, true
	}
	return "", false
}

func registryID(dial string) uint32 { return healthcheck.Get(dial).ID }

package affinity

import (
	"sync"
	"sync/atomic"
	"time"
)

// sessionTable remembers which upstream each session key was given, so
// that a session stays where it is even when the ring would place its key
// elsewhere (after a failover, or when the client dropped the pin cookie).
//
// It is a fixed number of shards, each a Go map from the 64-bit key hash
// to a 8-byte entry behind its own mutex. The table has a hard bound: a
// shard that is full evicts before it inserts (expired entries first,
// otherwise the entry closest to expiry among a small random sample, as
// Redis does for its LRU), so a flood of random keys costs the oldest
// sessions, never unbounded memory. Keys are hashes, never the cookie
// values themselves, which keeps entries small and secrets out of memory
// dumps.
type sessionTable struct {
	shards [tableShards]tableShard

	// perShard is the capacity of each shard (max sessions / shards).
	perShard atomic.Int64

	evictions atomic.Uint64

	// live counts the session entries (not aliases) per upstream ID, kept
	// exact under the shard locks by every insert, change and delete, so
	// that placement can bound loads between two sweeps (see liveCount).
	live [livePages]atomic.Pointer[livePage]
}

// livePage is one page of the table's per-upstream live counters; pages
// are allocated on first use, so a process with a handful of upstreams
// holds one.
type livePage [livePageSize]atomic.Int64

const (
	livePageSize = 1024
	livePages    = 64 // upstream IDs beyond livePages*livePageSize are not counted
)

const (
	tableShards = 256
	// evictSample is how many entries a full shard looks at to choose
	// one to evict.
	evictSample = 8
)

type tableShard struct {
	mu sync.Mutex
	m  map[uint64]tableEntry
	_  [40]byte // keep hot mutexes on separate cache lines
}

// tableEntry is what the table keeps per session: the upstream (by its
// process-wide healthcheck ID, with aliasBit set when the entry is one of
// the session's other keys) and when the entry expires, in seconds since
// tableEpoch. Eight bytes.
type tableEntry struct {
	up      uint32
	expires uint32
}

// aliasBit marks an entry recorded under a key that is not the session's
// main key (the first key present in its request), such as the client IP
// of a session that also has an app cookie. A session is recorded under
// every key it shows; only its main entry counts as a live session.
const aliasBit = 1 << 31

// upstream returns the entry's upstream ID.
func (e tableEntry) upstream() uint32 { return e.up &^ aliasBit }

// alias reports whether the entry is an alias (not the session's main
// entry).
func (e tableEntry) alias() bool { return e.up&aliasBit != 0 }

// tableEpoch is the zero of entry times; uint32 seconds from here last
// beyond 2150.
var tableEpoch = time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC).Unix()

// tableNow returns a time in table seconds.
func tableNow(now time.Time) uint32 { return uint32(now.Unix() - tableEpoch) }

// clock is the current time in table seconds, kept by the farm's loop
// so that the request path does not read the system clock (which costs
// more than the rest of a pinned selection on some virtual machines).
// Zero when no farm runs.
var clock atomic.Uint32

// clockNow returns the current time in table seconds, to within a
// quarter of a second while the farm runs.
func clockNow() uint32 {
	if now := clock.Load(); now != 0 {
		return now
	}
	return tableNow(time.Now())
}

func newSessionTable(maxSessions int) *sessionTable {
	t := new(sessionTable)
	for i := range t.shards {
		t.shards[i].m = make(map[uint64]tableEntry)
	}
	t.setMax(maxSessions)
	return t
}

// setMax sets the bound on live entries. It applies to inserts from now
// on; a table larger than a lowered bound shrinks as entries expire or
// are evicted.
func (t *sessionTable) setMax(maxSessions int) {
	per := int64(maxSessions / tableShards)
	if per < 1 {
		per = 1
	}
	t.perShard.Store(per)
}

func (t *sessionTable) shard(key uint64) *tableShard {
	// The low bits of an xxh3 hash are as good as any; the map re-hashes.
	return &t.shards[key&(tableShards-1)]
}

// get returns the upstream recorded for key if the entry is live at now,
// and, when ttl > 0, slides its expiry to now+ttl.
func (t *sessionTable) get(key uint64, now, ttl uint32) (uint32, bool) {
	return t.follow(key, now, ttl, true)
}

// follow is get for one of a request's keys: an alias entry counts only
// when aliases is true, and one that does not count is left untouched
// (see Select for when aliases are followed).
func (t *sessionTable) follow(key uint64, now, ttl uint32, aliases bool) (uint32, bool) {
	s := t.shard(key)
	s.mu.Lock()
	e, ok := s.m[key]
	if ok && e.expires < now {
		t.deleteLocked(s, key, e)
		ok = false
	}
	if ok && !aliases && e.alias() {
		ok = false
	}
	if ok && ttl > 0 && e.expires != now+ttl {
		e.expires = now + ttl
		s.m[key] = e
	}
	s.mu.Unlock()
	return e.upstream(), ok
}

// put records key -> up, live until now+ttl. up may carry aliasBit.
func (t *sessionTable) put(key uint64, up uint32, now, ttl uint32) {
	s := t.shard(key)
	e := tableEntry{up: up, expires: now + ttl}
	s.mu.Lock()
	if old, ok := s.m[key]; ok {
		if old != e {
			s.m[key] = e
			if old.up != e.up {
				t.count(old, -1)
				t.count(e, 1)
			}
		}
		s.mu.Unlock()
		return
	}
	if int64(len(s.m)) >= t.perShard.Load() {
		t.evictLocked(s, now)
	}
	s.m[key] = e
	t.count(e, 1)
	s.mu.Unlock()
}

// remove forgets key.
func (t *sessionTable) remove(key uint64) {
	s := t.shard(key)
	s.mu.Lock()
	if e, ok := s.m[key]; ok {
		t.deleteLocked(s, key, e)
	}
	s.mu.Unlock()
}

// retire makes key's entry expire at until at the latest: a session id
// the app replaced stays usable a moment longer, for requests already on
// their way with it, then goes. A request that still uses it slides it
// again.
func (t *sessionTable) retire(key uint64, until uint32) {
	s := t.shard(key)
	s.mu.Lock()
	if e, ok := s.m[key]; ok && e.expires > until {
		e.expires = until
		s.m[key] = e
	}
	s.mu.Unlock()
}

// deleteLocked deletes key, whose entry is e, from s, which is locked.
func (t *sessionTable) deleteLocked(s *tableShard, key uint64, e tableEntry) {
	delete(s.m, key)
	t.count(e, -1)
}

// count adds d to the live count of e's upstream if e is a main entry.
// Called with e's shard locked, so the counts follow the map exactly.
func (t *sessionTable) count(e tableEntry, d int64) {
	if e.alias() {
		return
	}
	id := e.upstream()
	n := id / livePageSize
	if n >= livePages {
		return
	}
	pg := t.live[n].Load()
	if pg == nil {
		pg = new(livePage)
		if !t.live[n].CompareAndSwap(nil, pg) {
			pg = t.live[n].Load()
		}
	}
	pg[id%livePageSize].Add(d)
}

// liveCount returns the number of main entries (sessions) naming upstream
// id. It is exact at every moment, except that entries expired but not
// yet swept still count, for at most a sweep interval.
func (t *sessionTable) liveCount(id uint32) int64 {
	n := id / livePageSize
	if n >= livePages {
		return 0
	}
	if pg := t.live[n].Load(); pg != nil {
		return pg[id%livePageSize].Load()
	}
	return 0
}

// evictLocked makes room for one entry in a full shard. Go's map
// iteration starts at a random place, which makes the first few entries a
// fair random sample.
func (t *sessionTable) evictLocked(s *tableShard, now uint32) {
	for int64(len(s.m)) >= t.perShard.Load() {
		var victim uint64
		var victimE tableEntry
		n := 0
		for k, e := range s.m {
			if e.expires < now {
				victim, victimE, n = k, e, 1
				break
			}
			if n == 0 || e.expires < victimE.expires {
				victim, victimE = k, e
			}
			n++
			if n == evictSample {
				break
			}
		}
		if n == 0 {
			return
		}
		t.deleteLocked(s, victim, victimE)
		t.evictions.Add(1)
	}
}

// len returns the number of entries, live or not yet swept.
func (t *sessionTable) len() int {
	n := 0
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		n += len(s.m)
		s.mu.Unlock()
	}
	return n
}

// sweep deletes expired entries and returns how many it deleted. It
// holds one shard's lock at a time, so requests on other shards go on.
func (t *sessionTable) sweep(now uint32) int {
	removed := 0
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		for k, e := range s.m {
			if e.expires < now {
				t.deleteLocked(s, k, e)
				removed++
			}
		}
		s.mu.Unlock()
	}
	return removed
}

// peek returns key's entry if it is live at now, without sliding it.
func (t *sessionTable) peek(key uint64, now uint32) (tableEntry, bool) {
	s := t.shard(key)
	s.mu.Lock()
	e, ok := s.m[key]
	s.mu.Unlock()
	return e, ok && e.expires >= now
}

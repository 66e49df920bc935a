package sessions

import (
	"crypto/rand"
	"encoding/binary"
	"math"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"
)

// Table remembers which upstream each session key was given, so
// that a session stays where it is even when the ring would place its key
// elsewhere (after a failover, or when the client dropped the pin cookie).
//
// It is a fixed number of shards, each an open-addressing array of
// 16-byte slots (linear probing, backward-shift deletion, so no
// tombstones) behind its own mutex. Keys are hashes, never the cookie
// values themselves, which keeps slots small and secrets out of memory
// dumps.
//
// Placement (the shard and the home slot of a key) goes through a hash
// keyed with a random seed per table: the key hashes are public (xxh3 of
// what the client sends), so without the seed a client could aim keys at
// one shard and evict its other sessions cheaply.
//
// The table has a hard bound in entries and in bytes: a shard's array
// doubles as it fills, up to the size its share of max_sessions needs at
// a load of 3/4, and never grows beyond it; a full shard evicts before it
// inserts. Eviction protects established sessions (entries seen on two
// requests or more, at most about half the bound: mayEstablish) from
// floods of one-shot and few-request keys: looking from a slot
// drawn by the seeded hash of the incoming key, it takes an expired entry
// if it sees one, otherwise a probationary (seen once) entry, and only
// when it finds none nearby the established entry closest to expiry
// among those it looked at.
type Table struct {
	shards [Shards]tableShard

	// seed keys placement (see place).
	seed [3]uint64

	// perShard is the bound on each shard's entries (max sessions /
	// shards).
	perShard atomic.Int64

	// live counts the session entries (not aliases) per upstream ID, kept
	// exact under the shard locks by every insert, change and delete, so
	// that placement can bound loads between two sweeps (see liveCount).
	live upstreamCounts
}

const (
	Shards = 256

	// minSlots is a shard's first array: a table that holds a few
	// sessions does not allocate its bound up front.
	minSlots = 16

	// evictWindow is how many slots in a row eviction looks at from a
	// drawn slot, and evictWindows how many windows at most it draws
	// before it evicts an established entry. At a load of 3/4 a window
	// holds 12 entries; with half of them established, all 8 windows
	// miss every probationary entry once in 2^96 evictions.
	evictWindow  = 16
	evictWindows = 8
)

// tableShard is one shard: an open-addressing array whose empty slots
// have key 0.
type tableShard struct {
	mu    sync.Mutex
	slots []tableSlot
	count int32
	// established counts the established entries: at most half the
	// shard's bound (mayEstablish). Both int32, so that shards stay 64
	// bytes.
	established int32

	// evictions and expired count live entries evicted for room and
	// entries removed once past their TTL. They are only written under
	// mu, on this shard's cache line, and read without it.
	evictions atomic.Uint64
	expired   atomic.Uint64

	// writes counts puts, removals and retirements, under mu, so that
	// the snapshot of `store local` is written only when something
	// changed (see changes). It fills what was padding: shards stay 64
	// bytes, hot mutexes on separate cache lines.
	writes uint64
}

// tableSlot is one slot of a shard: the key hash (0 for an empty slot,
// see slotKey) and its entry. Sixteen bytes.
type tableSlot struct {
	key uint64
	Entry
}

// Entry is what the table keeps per session: the upstream (by its
// process-wide healthcheck ID, with AliasBit and EstablishedBit) and when
// the entry expires, in seconds since Epoch. Eight bytes.
type Entry struct {
	up      uint32
	expires uint32
}

// AliasBit marks an entry recorded under a key that is not the session's
// main key (the first key present in its request), such as the client IP
// of a session that also has an app cookie. A session is recorded under
// every key it shows; only its main entry counts as a live session.
const AliasBit = 1 << 31

// EstablishedBit marks an entry seen on a second request (a hit, or a
// second put of its key); entries without it are probationary and are
// Evicted first.
const EstablishedBit = 1 << 30

// UpstreamMask keeps the upstream ID of an entry's up field: IDs are
// below 1<<30, under the flag bits.
const UpstreamMask = EstablishedBit - 1

// upstream returns the entry's upstream ID.
func (e Entry) Upstream() uint32 { return e.up & UpstreamMask }

// alias reports whether the entry is an alias (not the session's main
// entry).
func (e Entry) Alias() bool { return e.up&AliasBit != 0 }

// established reports whether the entry was seen on two requests or more.
func (e Entry) established() bool { return e.up&EstablishedBit != 0 }

// NewEntry returns the entry of upstream ref (an ID with its AliasBit and
// EstablishedBit) that expires at expires, as a snapshot read back holds it.
func NewEntry(ref, expires uint32) Entry { return Entry{up: ref, expires: expires} }

// Expires returns when the entry expires, in table seconds.
func (e Entry) Expires() uint32 { return e.expires }

// Ref returns the entry's upstream ID with its AliasBit and
// EstablishedBit.
func (e Entry) Ref() uint32 { return e.up }

// Epoch is the zero of entry times; uint32 seconds from here last
// beyond 2150.
var Epoch = time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC).Unix()

// Seconds returns a time in table seconds.
func Seconds(now time.Time) uint32 { return uint32(now.Unix() - Epoch) }

// clock is the current time in table seconds, kept by the farm's loop
// so that the request path does not read the system clock (which costs
// more than the rest of a pinned selection on some virtual machines).
// Zero when no farm runs.
var clock atomic.Uint32

// Now returns the current time in table seconds, to within a
// quarter of a second while the farm runs.
func Now() uint32 {
	if now := clock.Load(); now != 0 {
		return now
	}
	return Seconds(time.Now())
}

// SetClock sets the table clock, in table seconds: the farm's loop sets
// it every quarter second while it runs, and 0 when it stops.
func SetClock(now uint32) { clock.Store(now) }

func NewTable(maxSessions int) *Table {
	t := new(Table)
	var b [24]byte
	_, _ = rand.Read(b[:]) // never fails (it crashes the process instead)
	for i := range t.seed {
		t.seed[i] = binary.LittleEndian.Uint64(b[8*i:])
	}
	t.SetMax(maxSessions)
	return t
}

// SetMax sets the bound on live entries. It applies to inserts from now
// on; a table larger than a lowered bound shrinks as entries expire or
// are evicted (its arrays keep their size).
func (t *Table) SetMax(maxSessions int) {
	per := int64(maxSessions / Shards)
	if per < 1 {
		per = 1
	}
	t.perShard.Store(per)
}

// slotsFor returns the array size that holds per entries at a load of at
// most 3/4. It need not be a power of two (see home), which keeps a
// full table at 16/0.75 = 21.3 bytes per session whatever max_sessions
// is.
func slotsFor(per int64) int {
	return int((per*4 + 2) / 3)
}

// zeroKey stands for key hash 0, since 0 marks an empty slot. The two
// keys then share an entry, as any two keys with one hash do. It is
// drawn at random, not a well-known constant that tests or key
// generators multiply by.
const zeroKey = 0x9f120d31101ee50a

// slotKey returns the key as slots store it.
func slotKey(key uint64) uint64 {
	if key == 0 {
		return zeroKey
	}
	return key
}

// place returns the keyed hash that places key: its low byte picks the
// shard, its high bits the home slot. It is the construction of Go's
// runtime map hash where AES is not available (wyhash's multiply-and-fold,
// keyed with three random words), whose output a client cannot predict
// without the seed.
func (t *Table) place(key uint64) uint64 {
	hi, lo := bits.Mul64(key^t.seed[0], bits.RotateLeft64(key, 32)^t.seed[1])
	hi, lo = bits.Mul64(hi^lo^t.seed[2], 0x1d8e4e27c47d124f)
	return hi ^ lo
}

// shard returns the shard of placement hash h.
func (t *Table) shard(h uint64) *tableShard {
	return &t.shards[h&(Shards-1)]
}

// home returns the first slot of an array of n slots that h may be in:
// h's high bits scaled to n (Lemire's multiply-shift), which spreads as
// well as a mask without needing n to be a power of two.
func home(h uint64, n int) int {
	hi, _ := bits.Mul64(h, uint64(n))
	return int(hi)
}

// find returns the slot of key (a slot key) in s, whose placement hash
// is h, or -1.
func (s *tableShard) find(key, h uint64) int {
	n := len(s.slots)
	if n == 0 {
		return -1
	}
	for i := home(h, n); ; {
		switch s.slots[i].key {
		case key:
			return i
		case 0:
			return -1
		}
		if i++; i == n {
			i = 0
		}
	}
}

// insert puts a slot that is not in s into s, which has room for it.
func (s *tableShard) insert(sl tableSlot, h uint64) {
	n := len(s.slots)
	i := home(h, n)
	for s.slots[i].key != 0 {
		if i++; i == n {
			i = 0
		}
	}
	s.slots[i] = sl
	s.count++
	if sl.established() {
		s.established++
	}
}

// Get returns the upstream recorded for key if the entry is live at now,
// and, when ttl > 0, slides its expiry to now+ttl.
func (t *Table) Get(key uint64, now, ttl uint32) (uint32, bool) {
	return t.Follow(key, now, ttl, true)
}

// Follow is get for one of a request's keys: an alias entry counts only
// when aliases is true, and one that does not count is left untouched
// (see Select for when aliases are followed). An entry that counts is
// established from then on.
func (t *Table) Follow(key uint64, now, ttl uint32, aliases bool) (uint32, bool) {
	key = slotKey(key)
	h := t.place(key)
	s := t.shard(h)
	s.mu.Lock()
	i := s.find(key, h)
	if i < 0 {
		s.mu.Unlock()
		return 0, false
	}
	sl := &s.slots[i]
	e := sl.Entry
	switch {
	case e.expires < now:
		s.expired.Add(1)
		t.deleteLocked(s, i)
		s.mu.Unlock()
		return 0, false
	case !aliases && e.Alias():
		s.mu.Unlock()
		return 0, false
	}
	if !e.established() && t.mayEstablish(s) {
		sl.up |= EstablishedBit
		s.established++
	}
	if ttl > 0 {
		sl.expires = now + ttl
	}
	s.mu.Unlock()
	return e.Upstream(), true
}

// Peek returns key's entry if it is live at now, without sliding it or
// establishing it.
func (t *Table) Peek(key uint64, now uint32) (Entry, bool) {
	key = slotKey(key)
	h := t.place(key)
	s := t.shard(h)
	s.mu.Lock()
	defer s.mu.Unlock()
	if i := s.find(key, h); i >= 0 && s.slots[i].expires >= now {
		return s.slots[i].Entry, true
	}
	return Entry{}, false
}

// Put records key -> up, live until now+ttl. up may carry AliasBit. A
// second put of a live key establishes its entry.
func (t *Table) Put(key uint64, up uint32, now, ttl uint32) {
	key = slotKey(key)
	e := Entry{up: up &^ EstablishedBit, expires: now + ttl}
	h := t.place(key)
	s := t.shard(h)
	s.mu.Lock()
	s.writes++
	if i := s.find(key, h); i >= 0 {
		t.replaceLocked(s, i, e, now)
		s.mu.Unlock()
		return
	}
	t.makeRoomLocked(s, h, now)
	s.insert(tableSlot{key: key, Entry: e}, h)
	t.live.add(e, 1)
	s.mu.Unlock()
}

// replaceLocked writes e over the entry in slot i of s, which is locked:
// established if the old entry was live, a new probationary entry if it
// had expired.
func (t *Table) replaceLocked(s *tableShard, i int, e Entry, now uint32) {
	sl := &s.slots[i]
	if sl.expires < now {
		s.expired.Add(1)
	} else if sl.established() || t.mayEstablish(s) {
		e.up |= EstablishedBit
		if !sl.established() {
			s.established++
		}
	}
	if sl.established() && !e.established() {
		s.established-- // an expired established entry replaced by a new one
	}
	if sl.up&^EstablishedBit != e.up&^EstablishedBit {
		t.live.add(sl.Entry, -1)
		t.live.add(e, 1)
	}
	sl.Entry = e
}

// makeRoomLocked makes s, which is locked, ready for one more entry,
// whose placement hash is h: it evicts while s is at its bound, otherwise
// grows its array if the entry would load it beyond 3/4.
func (t *Table) makeRoomLocked(s *tableShard, h uint64, now uint32) {
	per := t.perShard.Load()
	for int64(s.count) >= per {
		t.evictLocked(s, h, now)
	}
	n := len(s.slots)
	if 4*(int(s.count)+1) <= 3*n {
		return
	}
	// The bound may have been lowered below what the array holds; it
	// then keeps its size.
	if limit := slotsFor(per); n < limit {
		t.growLocked(s, min(max(2*n, minSlots), limit))
	}
}

// growLocked moves the entries of s, which is locked, to an array of n
// slots.
func (t *Table) growLocked(s *tableShard, n int) {
	old := s.slots
	s.slots, s.count, s.established = make([]tableSlot, n), 0, 0
	for _, sl := range old {
		if sl.key != 0 {
			s.insert(sl, t.place(sl.key))
		}
	}
}

// Remove forgets key.
func (t *Table) Remove(key uint64) {
	key = slotKey(key)
	h := t.place(key)
	s := t.shard(h)
	s.mu.Lock()
	if i := s.find(key, h); i >= 0 {
		t.deleteLocked(s, i)
		s.writes++
	}
	s.mu.Unlock()
}

// Establish marks key's live entry as established (seen twice): an
// entry the shared store has already, which its next request must not
// write again.
func (t *Table) Establish(key uint64, now uint32) {
	t.update(key, func(s *tableShard, i int) {
		if sl := &s.slots[i]; sl.expires >= now && !sl.established() {
			sl.up |= EstablishedBit
			s.established++
		}
	})
}

// update calls f with key's slot in its shard, locked, if key has one.
func (t *Table) update(key uint64, f func(s *tableShard, i int)) {
	key = slotKey(key)
	h := t.place(key)
	s := t.shard(h)
	s.mu.Lock()
	if i := s.find(key, h); i >= 0 {
		f(s, i)
	}
	s.mu.Unlock()
}

// Retire makes key's entry expire at until at the latest: a session id
// the app replaced stays usable a moment longer, for requests already on
// their way with it, then goes. It stops counting as a session at once:
// it becomes an alias (which a request whose first key it is still
// follows), so that the session counts once, by the id that replaced it.
// A request that still uses it slides it again.
func (t *Table) Retire(key uint64, until uint32) {
	t.update(key, func(s *tableShard, i int) {
		sl := &s.slots[i]
		if !sl.Alias() {
			t.live.add(sl.Entry, -1)
			sl.up |= AliasBit
			s.writes++
		}
		if sl.expires > until {
			sl.expires = until
			s.writes++
		}
	})
}

// deleteLocked empties slot i of s, which is locked, and moves back the
// entries after it that their probe would otherwise no longer reach
// (backward-shift deletion: the array never holds tombstones, so lookups
// stay short however many deletions it has seen).
func (t *Table) deleteLocked(s *tableShard, i int) {
	t.live.add(s.slots[i].Entry, -1)
	s.count--
	if s.slots[i].established() {
		s.established--
	}
	n := len(s.slots)
	for j := i; ; {
		if j++; j == n {
			j = 0
		}
		sl := s.slots[j]
		if sl.key == 0 {
			break
		}
		// The entry at j may move to i if i lies on its probe path,
		// from its home to j.
		if dist(home(t.place(sl.key), n), j, n) >= dist(i, j, n) {
			s.slots[i] = sl
			i = j
		}
	}
	s.slots[i] = tableSlot{}
}

// dist returns how many steps forward slot to is from slot from, in an
// array of n slots.
func dist(from, to, n int) int {
	if to >= from {
		return to - from
	}
	return to + n - from
}

// mayEstablish reports whether an entry of s, which is locked, seen
// again may become established: only while established entries fill
// less than half the shard's bound. Whoever makes them, established
// entries thus never fill more than half the table, and at the bound
// every shard holds as many probationary entries, which victim evicts
// first: an established session is not evicted, whatever number of
// few-request sessions an attacker opens, while established sessions
// fill less than half the table. A session seen again while its shard's
// half is full stays probationary (evicted first) until it is seen again
// when there is room: sessions beyond half the bound are the ones a
// flood can evict, and the most recent ones among them.
//
// The bound is half the shard's share of max_sessions plus its square
// root: sessions spread over the shards at random, so a shard's share of
// sessions that fill less than half the table may exceed half its bound
// by about that much (with max_sessions 2560, 10 a shard, one shard in
// five has 6 of 300 sessions).
func (t *Table) mayEstablish(s *tableShard) bool {
	per := t.perShard.Load()
	return int64(s.established) < per/2+int64(math.Sqrt(float64(per)))
}

// evictLocked deletes one entry of s, which is locked and not empty, to
// make room for an entry whose placement hash is h.
func (t *Table) evictLocked(s *tableShard, h uint64, now uint32) {
	i := s.victim(bits.RotateLeft64(h, 32), now)
	if s.slots[i].expires < now {
		s.expired.Add(1)
	} else {
		s.evictions.Add(1)
	}
	t.deleteLocked(s, i)
}

// victim returns the slot to evict from s, which is locked and not
// empty. It looks at windows of evictWindow slots in a row, each from a
// slot drawn by r, and takes the first expired entry it sees; failing
// that, the probationary entry closest to expiry of the first window
// that has one; failing that, after evictWindows windows, the
// established entry closest to expiry it saw.
//
// The windows are drawn rather than walked by a hand going round, which
// would empty the slots behind it and pack those ahead of it, where
// linear probing slows down sharply; and they are short, since the
// first probationary entry after a long run of established ones would
// otherwise be the one evicted most often, which merges the runs until
// they hide every probationary entry from the search.
func (s *tableShard) victim(r uint64, now uint32) int {
	n := len(s.slots)
	soonest := -1
	for range evictWindows {
		// r is the seeded hash of the entry to insert; a step of
		// Knuth's MMIX generator draws the next window from it.
		r = r*6364136223846793005 + 1442695040888963407
		probation := -1
		for i, end := home(r, n), 0; end < min(evictWindow, n); end++ {
			if e := s.slots[i].Entry; s.slots[i].key != 0 {
				switch {
				case e.expires < now:
					return i
				case !e.established():
					if probation < 0 || e.expires < s.slots[probation].expires {
						probation = i
					}
				case soonest < 0 || e.expires < s.slots[soonest].expires:
					soonest = i
				}
			}
			if i++; i == n {
				i = 0
			}
		}
		if probation >= 0 {
			return probation
		}
	}
	if soonest >= 0 {
		return soonest
	}
	// The windows met only empty slots: take the first entry there is.
	i := home(r, n)
	for s.slots[i].key == 0 {
		if i++; i == n {
			i = 0
		}
	}
	return i
}

// Len returns the number of entries, live or not yet swept.
func (t *Table) Len() int {
	return int(t.sumShards(func(s *tableShard) uint64 { return uint64(s.count) }))
}

// sumShards adds up f over the shards, each read under its lock.
func (t *Table) sumShards(f func(s *tableShard) uint64) uint64 {
	var n uint64
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		n += f(s)
		s.mu.Unlock()
	}
	return n
}

// Evicted returns how many live entries were evicted to make room.
func (t *Table) Evicted() uint64 {
	var n uint64
	for i := range t.shards {
		n += t.shards[i].evictions.Load()
	}
	return n
}

// ExpiredCount returns how many entries were removed because their TTL
// had passed: by a sweep, by a lookup or put that found them expired, or
// by an eviction that found them expired.
func (t *Table) ExpiredCount() uint64 {
	var n uint64
	for i := range t.shards {
		n += t.shards[i].expired.Load()
	}
	return n
}

// Sweep deletes expired entries and returns how many it deleted. It
// holds one shard's lock at a time, so requests on other shards go on.
func (t *Table) Sweep(now uint32) int {
	removed := 0
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		n := t.sweepLocked(s, now)
		s.expired.Add(uint64(n))
		s.mu.Unlock()
		removed += n
	}
	return removed
}

// sweepLocked deletes the expired entries of s, which is locked.
func (t *Table) sweepLocked(s *tableShard, now uint32) int {
	removed := 0
	// A deletion moves the next entries back by one: slot j is looked
	// at again until it holds a live entry or none. An entry that moves
	// from slot 0 to the last slot is looked at twice, which is harmless.
	for j := 0; j < len(s.slots); {
		if sl := s.slots[j]; sl.key != 0 && sl.expires < now {
			t.deleteLocked(s, j)
			removed++
			continue
		}
		j++
	}
	return removed
}

// upstreamCounts holds the number of main entries per upstream ID in pages
// of counters allocated on first use, two levels deep so that every ID
// below 1<<30 has one while a process with a handful of upstreams holds
// one page. Reads take no lock.
type upstreamCounts struct {
	dirs [1 << liveBits]atomic.Pointer[liveDir]
}

const liveBits = 10 // per level: three levels of 1<<10 cover 30-bit IDs

type (
	liveDir  [1 << liveBits]atomic.Pointer[livePage]
	livePage [1 << liveBits]atomic.Int64
)

// counter returns id's counter, allocating its page if create is set; nil
// if it has none.
func (c *upstreamCounts) counter(id uint32, create bool) *atomic.Int64 {
	const mask = 1<<liveBits - 1
	dir := loadOrNew(&c.dirs[id>>(2*liveBits)], create)
	if dir == nil {
		return nil
	}
	pg := loadOrNew(&dir[id>>liveBits&mask], create)
	if pg == nil {
		return nil
	}
	return &pg[id&mask]
}

// loadOrNew returns *p, first setting it to a new T if it is nil and
// create is set.
func loadOrNew[T any](p *atomic.Pointer[T], create bool) *T {
	v := p.Load()
	if v == nil && create {
		v = new(T)
		if !p.CompareAndSwap(nil, v) {
			v = p.Load()
		}
	}
	return v
}

// add adds d to the live count of e's upstream if e is a main entry.
// Called with e's shard locked, so the counts follow the slots exactly.
func (c *upstreamCounts) add(e Entry, d int64) {
	if !e.Alias() {
		c.counter(e.Upstream(), true).Add(d)
	}
}

// LiveCount returns the number of main entries (sessions) naming upstream
// id. It is exact at every moment, except that entries expired but not
// yet swept still count, for at most a sweep interval.
func (t *Table) LiveCount(id uint32) int64 {
	if id > UpstreamMask {
		return 0
	}
	if c := t.live.counter(id, false); c != nil {
		return c.Load()
	}
	return 0
}

// Export calls fn with every entry live at now (key as slots store it),
// one shard at a time under its lock: fn must be quick and must not call
// back into the table. Requests on other shards go on meanwhile.
func (t *Table) Export(now uint32, fn func(key uint64, e Entry)) {
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		for _, sl := range s.slots {
			if sl.key != 0 && sl.expires >= now {
				fn(sl.key, sl.Entry)
			}
		}
		s.mu.Unlock()
	}
}

// Restore records an entry read back from a snapshot: e keeps its flags
// and its expiry. A key that already has a live entry keeps it (it was
// written since, so it is newer); an entry expired at now is dropped. It
// reports whether e was recorded. The table's bound applies as for put.
func (t *Table) Restore(key uint64, e Entry, now uint32) bool {
	if e.expires < now {
		return false
	}
	key = slotKey(key)
	h := t.place(key)
	s := t.shard(h)
	s.mu.Lock()
	defer s.mu.Unlock()
	if i := s.find(key, h); i >= 0 {
		if s.slots[i].expires >= now {
			return false
		}
		t.deleteLocked(s, i)
	}
	t.makeRoomLocked(s, h, now)
	s.insert(tableSlot{key: key, Entry: e}, h)
	t.live.add(e, 1)
	return true
}

// FirstKeyRef returns what a request's first key whose entry is old
// (live or not) becomes when the request goes to up: the session's main
// entry, except that a live alias on that upstream stays an alias. Such
// a key names another session (a client IP shared by many browsers, a
// cookie-less request of a browser that had a cookie): made a main entry
// it would count as a session of its own, and every new browser behind
// one IP would flip it between alias and main, a shared store's write
// and message each time.
func FirstKeyRef(old Entry, live bool, up uint32) uint32 {
	if live && old.Alias() && old.Upstream() == up&UpstreamMask {
		return up | AliasBit
	}
	return up
}

// Changes returns how many puts, removals and retirements the table has
// seen: the snapshot is written again only when it moved.
func (t *Table) Changes() uint64 {
	return t.sumShards(func(s *tableShard) uint64 { return s.writes })
}

// Swap is put that also returns the entry key had, and whether it was
// live at now: `store redis` writes an entry to Redis only when it is
// new, moved, or its sliding expiry is due to be written back. first
// says key is a request's first key (see FirstKeyRef).
func (t *Table) Swap(key uint64, up uint32, now, ttl uint32, first bool) (Entry, bool) {
	key = slotKey(key)
	e := Entry{up: up &^ EstablishedBit, expires: now + ttl}
	h := t.place(key)
	s := t.shard(h)
	s.mu.Lock()
	s.writes++
	if i := s.find(key, h); i >= 0 {
		old := s.slots[i].Entry
		if first {
			e.up = FirstKeyRef(old, old.expires >= now, e.up)
		}
		t.replaceLocked(s, i, e, now)
		s.mu.Unlock()
		return old, old.expires >= now
	}
	t.makeRoomLocked(s, h, now)
	s.insert(tableSlot{key: key, Entry: e}, h)
	t.live.add(e, 1)
	s.mu.Unlock()
	return Entry{}, false
}

package sessions

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"
	"github.com/caddy-affinity/caddy-affinity/internal/testredis"
)

// instance stands for one Caddy process sharing a Redis: a store of its
// own (table, clients) and a handle in namespace ns.
func instance(t *testing.T, addr, prefix, ns string, ttl uint32, maxSessions int) *Handle {
	t.Helper()
	return instanceOn(t, RedisConn{Address: addr}, prefix, ns, ttl, maxSessions)
}

// upstreams registers n dials with healthcheck and returns their IDs.
func upstreams(t *testing.T, n int) ([]uint32, []string) {
	ids, dials := make([]uint32, n), make([]string, n)
	for i := range n {
		dials[i] = fmt.Sprintf("%s-u%d:80", t.Name(), i)
		ids[i] = healthcheck.Get(dials[i]).ID
	}
	return ids, dials
}

// entriesIn returns the entries of the bucket hashes whose keys match
// pattern.
func entriesIn(t *testing.T, c *redis.Client, pattern string) int64 {
	t.Helper()
	ctx := context.Background()
	keys, err := c.Keys(ctx, pattern).Result()
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, k := range keys {
		l, err := c.HLen(ctx, k).Result()
		if err != nil {
			t.Fatal(err)
		}
		n += l
	}
	return n
}

// lookup is a selection's read: local, then Redis.
func lookup(h *Handle, key uint64) (uint32, bool) {
	return h.Lookup([]uint64{key}, Query{Now: Now(), LaterAliases: true}, func(uint32) bool { return true })
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("waited 5s for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Fault 0: a busy session's shared entry was never slid in Redis (the
// local entry was slid before the write was judged due), so it expired
// at 1.25 x session_ttl however busy the session. Here a session is used
// every second for 3 x session_ttl on one instance; the other still
// finds it, and its Redis key never came close to expiring.
func TestRedisBusySessionStaysShared(t *testing.T) {
	rd := testredis.Start(t)
	ids, _ := upstreams(t, 2)
	a := instance(t, rd.Addr, "busy", "ns", 4, 1000)
	b := instance(t, rd.Addr, "busy", "ns", 4, 1000)
	key := uint64(0xb05e)
	a.Learn(key, ids[1], Now(), nil)
	c := rd.Client()
	defer c.Close()
	for range 12 {
		time.Sleep(time.Second)
		if id, ok := lookup(a, key); !ok || id != ids[1] {
			t.Fatalf("instance a lost its own session: %d, %v", id, ok)
		}
		a.Remember([]uint64{key}, ids[1], Now(), nil)
	}
	n := a.remote.(*redisNS)
	g := n.gen(Now())
	if ok, err := c.HExists(context.Background(), n.bucketKey(n.bucket(key), g), field(key)).Result(); err != nil || !ok {
		t.Fatalf("after 12s of a request a second (session_ttl 4s) the Redis entry is not in the current generation (%v)", err)
	}
	if id, ok := lookup(b, key); !ok || id != ids[1] {
		t.Fatalf("the other instance does not find the busy session: %d, %v", id, ok)
	}
}

// Fault 8: two sites of one process (two namespaces, one key prefix)
// never touch each other's entries: a move published by one does not
// move the other's session with the same key.
func TestRedisNamespacesApart(t *testing.T) {
	rd := testredis.Start(t)
	ids, dials := upstreams(t, 3)
	s := NewStore(1000)
	defer s.Close()
	open := func(ns string, scope uint64) *Handle {
		h, err := s.Open(Options{Config: &Config{Kind: KindRedis, RedisConn: RedisConn{Address: rd.Addr}, KeyPrefix: "sites"},
			Scope: scope, Namespace: ns, TTL: 600, MaxSessions: 1000})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(h.Close)
		return h
	}
	site1, site2 := open("site-1", 1), open("site-2", 2)
	other := instance(t, rd.Addr, "sites", "site-1", 600, 1000) // site 1 on another instance
	key := uint64(0xc0ffee)
	site1.Learn(key, ids[2], Now(), nil)
	site2.Learn(key, ids[2], Now(), nil)
	other.Learn(key, ids[2], Now(), nil)
	// Site 1 moves its session (its upstream 2 was removed) on the
	// other instance; the move is published.
	other.Remember([]uint64{key}, ids[0], Now(), nil)
	waitUntil(t, "the move to reach site 1", func() bool {
		e, ok := site1.Peek(key, Now())
		return ok && e.Upstream() == ids[0]
	})
	time.Sleep(100 * time.Millisecond)
	if e, ok := site2.Peek(key, Now()); !ok || e.Upstream() != ids[2] {
		t.Fatalf("site 2's session moved with site 1's: %+v, %v", e, ok)
	}
	c := rd.Client()
	defer c.Close()
	n2 := site2.remote.(*redisNS)
	v, _ := c.HGet(context.Background(), n2.bucketKey(n2.bucket(key), n2.gen(Now())), field(key)).Result()
	if _, _, code, ok := parseValue(v); !ok || code != dialCode(dials[2]) {
		t.Fatalf("site 2's entry in Redis is %q", v)
	}
}

// Fault 3: a client sending a new random cookie on every request filled
// Redis (a key per request). One-shot keys now stay in the table; only
// keys seen twice, or issued by the app, are written, and those at most
// max_sessions per session_ttl.
func TestRedisFloodDoesNotReachRedis(t *testing.T) {
	rd := testredis.Start(t)
	ids, _ := upstreams(t, 2)
	h := instance(t, rd.Addr, "flood", "ns", 600, 1000)
	for i := range 30_000 {
		h.Remember([]uint64{uint64(i)*0x9e3779b97f4a7c15 + 1}, ids[i%2], Now(), nil)
	}
	c := rd.Client()
	defer c.Close()
	if n := entriesIn(t, c, "flood:{ns.*.*.*}*"); n != 0 {
		t.Fatalf("30000 one-shot keys left %d entries in Redis", n)
	}
	// Learned ids (the app issued them) are written, up to the bound.
	for i := range 5000 {
		h.Learn(uint64(i)*0x51afd7ed558ccd+7, ids[i%2], Now(), nil)
	}
	if n := entriesIn(t, c, "flood:{ns.*.*.*}*"); n != 1000 {
		t.Fatalf("5000 learned ids with max_sessions 1000 left %d entries in Redis, want 1000", n)
	}
}

// Faults 2 and 7: every key the store writes has a TTL, live sets
// included (a removed upstream's set went on forever).
func TestRedisEveryKeyHasTTL(t *testing.T) {
	rd := testredis.Start(t)
	ids, dials := upstreams(t, 3)
	h := instance(t, rd.Addr, "ttl", "ns", 60, 1000)
	for i := range 300 {
		h.Learn(uint64(i)+1, ids[i%3], Now(), nil)
	}
	h.Retire(5, Now(), nil)
	h.Refresh(dials)
	c := rd.Client()
	defer c.Close()
	ctx := context.Background()
	waitUntil(t, "the refresh", func() bool {
		n, ok := h.remote.clusterSessions(dials[0])
		return ok && n == 100
	})
	if n := entriesIn(t, c, "ttl:{ns.*.*.*}*"); n != 300 {
		t.Fatalf("%d entries in Redis, want 300", n)
	}
	keys, err := c.Keys(ctx, "ttl:*").Result()
	if err != nil || len(keys) < 3 {
		t.Fatalf("%d keys (%v)", len(keys), err)
	}
	for _, k := range keys {
		if k == "ttl:run" {
			// The run id: renewed while an instance runs, gone a day
			// after the last one stopped.
			if ttl, _ := c.TTL(ctx, k).Result(); ttl <= 0 || ttl > runKeyTTL {
				t.Fatalf("the run id has TTL %s, want at most %s", ttl, runKeyTTL)
			}
			continue
		}
		// Entries live to the end of the next generation, counters one
		// more: at most three session_ttl.
		ttl, _ := c.TTL(ctx, k).Result()
		if ttl <= 0 || ttl > 181*time.Second {
			t.Fatalf("key %q has TTL %s, want at most 3 x session_ttl", k, ttl)
		}
	}
}

// Fault 5: `timeout` is the most a request waits for Redis in all. With
// Redis frozen, a new session's lookup, its writes and its learned id
// together take the timeout once, not once each.
func TestRedisTimeoutIsTotal(t *testing.T) {
	rd := testredis.Start(t)
	ids, _ := upstreams(t, 2)
	s := NewStore(1000)
	defer s.Close()
	h, err := s.Open(Options{Config: &Config{Kind: KindRedis, KeyPrefix: "frozen",
		RedisConn: RedisConn{Address: rd.Addr, Timeout: caddy.Duration(200 * time.Millisecond)}}, Namespace: "ns", TTL: 600, MaxSessions: 1000})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	lookup(h, 1) // a connection up
	if err := rd.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = rd.Signal(syscall.SIGCONT) }()
	start := time.Now()
	var b Budget
	key := uint64(0xf00)
	h.Lookup([]uint64{key}, Query{Now: Now(), Budget: &b}, func(uint32) bool { return true })
	h.Remember([]uint64{key}, ids[0], Now(), &b)
	h.Remember([]uint64{key}, ids[0], Now(), &b) // established: due
	h.Learn(key+1, ids[0], Now(), &b)
	h.Retire(key+2, Now(), &b)
	if took := time.Since(start); took > 350*time.Millisecond {
		t.Fatalf("a request's calls took %s with Redis frozen, timeout 200ms", took)
	}
}

// The cluster's live counts stay right across generations: sessions
// carried into a new generation by both instances (one of them finds it
// done) count once, moves and deletions take their session out of its
// upstream's count, and sessions nobody used for a whole generation drop
// out with it.
func TestRedisCountsAcrossGenerations(t *testing.T) {
	rd := testredis.Start(t)
	ids, dials := upstreams(t, 3)
	const ttl = 100
	x := instance(t, rd.Addr, "counts", "ns", ttl, 1000)
	y := instance(t, rd.Addr, "counts", "ns", ttl, 1000)
	start := (Seconds(time.Now())/ttl + 1) * ttl // a generation's first second
	SetClock(start)
	defer SetClock(0)
	key := func(i int) uint64 { return uint64(i)*0x9e3779b97f4a7c15 + 3 }
	for i := range 30 {
		x.Learn(key(i), ids[i%3], start, nil)
	}
	expect := func(what string, want ...int64) {
		t.Helper()
		n := y.remote.(*redisNS)
		waitUntil(t, what, func() bool {
			// Every instance's once-a-second refresh (the farm's
			// loop) writes its counts; y's reads them.
			x.Refresh(dials)
			y.Refresh(dials)
			for i, d := range dials {
				if got, ok := n.clusterSessions(d); !ok || got != want[i] {
					return false
				}
			}
			return true
		})
	}
	expect("10 sessions on each upstream", 10, 10, 10)
	// The next generation: 21 sessions used on y, then on x.
	now := start + ttl + 5
	SetClock(now)
	for _, h := range []*Handle{y, x} {
		for i := range 21 {
			id, ok := lookup(h, key(i))
			if !ok || id != ids[i%3] {
				t.Fatalf("session %d: %d, %v", i, id, ok)
			}
			h.Remember([]uint64{key(i)}, id, now, nil)
		}
	}
	expect("the carried sessions counted once", 10, 10, 10)
	// Sessions 0, 3, 6 move from upstream 0 to 1; 2 and 5 are deleted.
	for _, i := range []int{0, 3, 6} {
		y.Remember([]uint64{key(i)}, ids[1], now, nil)
	}
	for _, i := range []int{2, 5} {
		x.Forget(key(i), now, nil)
	}
	expect("moves and deletions", 7, 13, 8)
	// A generation later the 9 sessions nobody used since the first
	// generation have gone.
	SetClock(start + 2*ttl + 5)
	expect("the idle sessions gone", 7-3, 13-3, 8-3)
}

// Fault 6: after an outage an instance wrote its whole table back (a
// 0.5 s blip: 124,412 writes for 123,781 entries, nearly all there
// already). Now it writes what was touched since the circuit opened.
func TestRedisWriteBackOnlyWhatChanged(t *testing.T) {
	rd := testredis.Start(t)
	ids, dials := upstreams(t, 2)
	s := NewStore(100_000)
	defer s.Close()
	h, err := s.Open(Options{Config: &Config{Kind: KindRedis, KeyPrefix: "blip",
		RedisConn: RedisConn{Address: rd.Addr, Timeout: caddy.Duration(100 * time.Millisecond)}}, Namespace: "ns", TTL: 600, MaxSessions: 100_000})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	const n = 5000
	start := Seconds(time.Now())
	SetClock(start)
	defer SetClock(0)
	for i := range n {
		h.Learn(uint64(i)+1, ids[i%2], start, nil)
	}
	h.Refresh(dials)
	c := rd.Client()
	defer c.Close()
	n0 := h.remote.(*redisNS)
	waitUntil(t, "the first count", func() bool { _, ok := n0.clusterSessions(dials[0]); return ok && !n0.counting.Load() })
	// A blip: Redis frozen, three lookups fail, the circuit opens.
	SetClock(start + 5)
	if err := rd.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	time.Sleep(redisQuiet)
	for i := range 3 {
		lookup(h, uint64(n+100+i))
	}
	if n0.c.usable() {
		_ = rd.Signal(syscall.SIGCONT)
		t.Fatal("the circuit did not open")
	}
	// 10 sessions are used meanwhile (locally).
	for i := range 10 {
		h.Remember([]uint64{uint64(i) + 1}, ids[i%2], start+5, nil)
	}
	_ = rd.Signal(syscall.SIGCONT)
	time.Sleep(redisSkip)
	before := rd.Commands(t)
	n0.c.checked.Store(0)
	h.Refresh(dials)
	waitUntil(t, "the write back", func() bool {
		h.Refresh(dials)
		return n0.c.outageSince.Load() == 0 && !n0.resyncing.Load()
	})
	time.Sleep(100 * time.Millisecond)
	got := rd.Commands(t) - before
	t.Logf("the write back after a blip: %d commands (10 sessions touched during it, %d in the table)", got, n)
	if got < 10 || got > 100 {
		t.Errorf("the write back after a blip sent %d commands for 10 sessions touched during it (the table has %d)", got, n)
	}
}

// TestRedisCountersHaveTTL: a counter hash gets its TTL in the round trip
// that creates it, whatever creates it: here a generation whose only
// writes are carries (the counter used to be created by a second round
// trip after its EXPIREAT, which does nothing on a missing key: the hash
// lived forever), and the counts written after Redis was flushed.
func TestRedisCountersHaveTTL(t *testing.T) {
	rd := testredis.Start(t)
	ids, dials := upstreams(t, 3)
	const ttl = 100
	h := instance(t, rd.Addr, "cttl", "ns", ttl, 1000)
	n := h.remote.(*redisNS)
	start := (Seconds(time.Now())/ttl + 1) * ttl
	SetClock(start)
	defer SetClock(0)
	for i := range 30 {
		h.Learn(uint64(i)+1, ids[i%3], start, nil)
	}
	c := rd.Client()
	defer c.Close()
	ctx := context.Background()
	expectTTL := func(what string, g uint32) {
		t.Helper()
		h.Refresh(dials)
		waitUntil(t, what, func() bool { return c.Exists(ctx, n.counterKey(g)).Val() == 1 })
		// (The table clock runs ahead of the wall clock here.)
		if d, most := c.TTL(ctx, n.counterKey(g)).Val(), time.Until(n.genEnd(g+2))+2*time.Second; d <= 0 || d > most {
			t.Fatalf("%s: counter %q has TTL %s, want one of at most %s (two generations after its own)", what, n.counterKey(g), d, most)
		}
	}
	expectTTL("the first generation's counter", n.gen(start))
	// Used again later in the generation (nothing to write), then in the
	// next: only carries.
	mid := start + ttl/2
	SetClock(mid)
	for i := range 30 {
		h.Remember([]uint64{uint64(i) + 1}, ids[i%3], mid, nil)
	}
	now := start + ttl + 1
	SetClock(now)
	for i := range 30 {
		h.Remember([]uint64{uint64(i) + 1}, ids[i%3], now, nil)
	}
	expectTTL("a counter created by carries", n.gen(now))
	// Redis loses its data; the counts written after it have a TTL.
	if err := c.FlushAll(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	h.Learn(1000, ids[0], now, nil)
	expectTTL("a counter written after a flush", n.gen(now))
}

// TestRedisSharedFirstKeyStaysAlias: a request's first key that is a
// live alias on the chosen upstream (a client IP shared by many browsers,
// each with a session cookie behind it) stays an alias: each new browser
// behind the IP costs no write of the IP's entry, and the IP counts as
// no session. It used to flip between main entry and alias on every new
// browser, each flip a read, a write and a published message (9.95
// commands per new session in bench/e2e.sh, 1.95 since).
func TestRedisSharedFirstKeyStaysAlias(t *testing.T) {
	rd := testredis.Start(t)
	ids, _ := upstreams(t, 3)
	h := instance(t, rd.Addr, "shared", "ns", 600, 1000)
	const ip = uint64(0x1p62)
	now := Now()
	// The first browser: its first request keyed by the IP alone, then
	// by its cookie with the IP behind it (seen twice: established).
	h.Remember([]uint64{ip}, ids[1], now, nil)
	for range 2 {
		h.Remember([]uint64{101, ip}, ids[1], now, nil)
	}
	before := entryCommands(t, rd)
	for b := uint64(102); b < 112; b++ {
		h.Remember([]uint64{ip}, ids[1], now, nil) // a new browser's first request
		h.Remember([]uint64{b, ip}, ids[1], now, nil)
	}
	if e, ok := h.Peek(ip, now); !ok || !e.Alias() || e.Upstream() != ids[1] {
		t.Fatalf("the shared IP's entry: %+v (live %v), want an alias on %d", e, ok, ids[1])
	}
	if d := entryCommands(t, rd) - before; d != 0 {
		t.Errorf("10 new browsers behind one IP cost %d Redis commands before their cookies were established, want 0", d)
	}
	if got := h.table.LiveCount(ids[1]); got != 11 {
		t.Errorf("live sessions on the upstream %d, want 11 (the cookies; the IP is no session)", got)
	}
}

// TestRedisYoungSessionWrittenOnceInAFullTable: in a table whose
// established entries fill half of it (eviction protects no more), a new
// session is written to Redis once, not on every request: whether Redis
// holds an entry is its own bit (StoredBit), not EstablishedBit, which
// the table stops granting there.
func TestRedisYoungSessionWrittenOnceInAFullTable(t *testing.T) {
	rd := testredis.Start(t)
	ids, _ := upstreams(t, 3)
	const max = 64 * Shards // 64 entries a shard
	h := instance(t, rd.Addr, "full", "ns", 600, max)
	now := Now()
	// Twice the bound, each seen twice: every shard holds as many
	// established entries as it grants. (Into the table alone: Redis
	// would take at most max_sessions of them, see admit.)
	for k := uint64(1); k <= 2*max; k++ {
		for range 2 {
			h.table.Put(h.Key(k*0x9e3779b97f4a7c15), ids[k%3], now, 600)
		}
	}
	young := uint64(0xabcdef)
	h.Remember([]uint64{young}, ids[0], now, nil) // first sight: not written
	before := entryCommands(t, rd)
	for range 10 {
		h.Remember([]uint64{young}, ids[0], now, nil)
	}
	if e, ok := h.Peek(young, now); !ok || e.established() {
		t.Fatalf("the young session: %+v (live %v); want a live entry the full table did not establish", e, ok)
	}
	// One HSETNX, and its bucket's EXPIREAT if this instance had not
	// set it yet.
	if d := entryCommands(t, rd) - before; d < 1 || d > 2 {
		t.Errorf("a young session's 10 requests cost %d Redis commands, want its write once (1 or 2)", d)
	}
}

// entryCommands returns the calls of the commands that read and write
// entries (not the lifecycle states' once-a-second HGETALL, which may
// fall into a test's window).
func entryCommands(t *testing.T, rd *testredis.Server) int64 {
	t.Helper()
	c := rd.Client()
	defer c.Close()
	return commandCalls(t, c, func(name string) bool {
		switch name {
		case "hsetnx", "hset", "hget", "hdel", "hincrby", "expireat", "publish":
			return true
		}
		return false
	})
}

// commandCalls returns the calls of the commands (INFO commandstats)
// whose names count accepts.
func commandCalls(t testing.TB, c *redis.Client, count func(name string) bool) int64 {
	t.Helper()
	info, err := c.Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, line := range strings.Split(info, "\n") {
		name, rest, ok := strings.Cut(strings.TrimSpace(line), ":calls=")
		if !ok || !count(strings.TrimPrefix(name, "cmdstat_")) {
			continue
		}
		calls, _, _ := strings.Cut(rest, ",")
		v, _ := strconv.ParseInt(calls, 10, 64)
		n += v
	}
	return n
}

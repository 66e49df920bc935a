package affinity

import (
	"context"
	"fmt"
	"github.com/caddy-affinity/caddy-affinity/internal/testredis"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"

	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// redisPolicy provisions a learn-mode policy on the given Redis with its
// own table namespace, standing for one instance of several.
func redisPolicy(t testing.TB, addr, instance string) *Policy {
	return newTestPolicy(t, &Policy{
		Keys:             []KeySource{{From: "cookie", Name: "sid"}},
		DisablePinCookie: true,
		Scope:            instance,
		Store:            &StoreConfig{Kind: storeRedis, Address: addr, KeyPrefix: "test-" + t.Name()},
	})
}

// TestStoreRedisShares: ids learned on one instance, moves and retired
// ids are seen by another that shares the Redis; a known key costs no
// round trip.
func TestStoreRedisShares(t *testing.T) {
	rd := testredis.Start(t)
	p1 := redisPolicy(t, rd.Addr, "one")
	p2 := redisPolicy(t, rd.Addr, "two")
	pool := testPool(t, 3)
	ps1, ps2 := p1.poolState(pool), p2.poolState(pool)

	// Learned on instance one: each id on another upstream, whatever
	// the ring says.
	for i := range 3 {
		h := http.Header{"Set-Cookie": {fmt.Sprintf("sid=learned-%d; Path=/", i)}}
		p1.learn(h, newRequest(), ps1.recs[i].ID)
	}
	for i := range 3 {
		if got := p2.Select(pool, newRequest(fmt.Sprintf("sid=learned-%d", i)), nil); got != pool[i] {
			t.Fatalf("id learned on instance one for %s went to %v on instance two", pool[i].Dial, got)
		}
	}
	// Instance two counts the sessions instance one learned, although
	// it has seen only some of them itself.
	dials := []string{pool[0].Dial, pool[1].Dial, pool[2].Dial}
	waitFor(t, "the cluster's counts", func() bool {
		p2.remote.refreshCounts(dials)
		n, ok := p2.remote.clusterSessions(pool[1].Dial)
		return ok && n == 1
	})

	// Known locally now: the next selections make no round trip.
	before := rd.Commands(t)
	for range 50 {
		p2.Select(pool, newRequest("sid=learned-1"), nil)
	}
	if n := rd.Commands(t) - before; n != 0 {
		t.Errorf("50 selections of a locally known key made %d Redis commands", n)
	}

	// A move on instance one (the session failed over to upstream 2)
	// reaches instance two, which knows the key, through the channel.
	p1.remember([]uint64{sessionIDHash("learned-0")}, ps1.recs[2].ID, sessions.Now())
	waitFor(t, "the move to reach instance two", func() bool {
		e, ok := p2.table.Peek(p2.tableKey(sessionIDHash("learned-0")), sessions.Now())
		return ok && e.Upstream() == ps2.recs[2].ID
	})
	if got := p2.Select(pool, newRequest("sid=learned-0"), nil); got != pool[2] {
		t.Fatalf("after the move instance two sent the session to %v, want %s", got, pool[2].Dial)
	}

	// Deleting the cookie on instance one forgets the id everywhere.
	r := newRequest("sid=learned-1")
	p1.learn(http.Header{"Set-Cookie": {"sid=; Max-Age=0"}}, r, ps1.recs[1].ID)
	waitFor(t, "the removal to reach instance two", func() bool {
		_, ok := p2.table.Peek(p2.tableKey(sessionIDHash("learned-1")), sessions.Now())
		return !ok
	})
	// The move and the removal show in the counts: upstream 0 lost its
	// session to upstream 2, upstream 1 its own.
	waitFor(t, "the counts after the move and the removal", func() bool {
		p2.remote.refreshCounts(dials)
		n0, _ := p2.remote.clusterSessions(pool[0].Dial)
		n1, _ := p2.remote.clusterSessions(pool[1].Dial)
		n2, _ := p2.remote.clusterSessions(pool[2].Dial)
		return n0 == 0 && n1 == 0 && n2 == 2
	})
}

// TestStoreRedisDown: with Redis gone, selections go on within the
// timeout, the outage is counted, and Redis is skipped for a second.
func TestStoreRedisDown(t *testing.T) {
	rd := testredis.Start(t)
	p := redisPolicy(t, rd.Addr, "down")
	pool := testPool(t, 3)
	rd.Stop()
	errorsBefore := counterValue(storeErrors.c)
	start := time.Now()
	for i := range 20 {
		if p.Select(pool, newRequest(fmt.Sprintf("sid=unknown-%d", i)), nil) == nil {
			t.Fatal("no upstream with Redis down")
		}
	}
	if took := time.Since(start); took > 500*time.Millisecond {
		t.Errorf("20 selections took %s with Redis down (timeout 50ms, skipped after the first error)", took)
	}
	if n := counterValue(storeErrors.c) - errorsBefore; n < 1 || n > 3 {
		t.Errorf("%v store errors counted, want 1-3 (Redis is skipped for a second after one)", n)
	}
	if !p.remote.down.Load() {
		t.Error("the outage was not noted")
	}
	// Back: the next operation after the skip works again.
	rd.Run(t)
	time.Sleep(redisSkip + 100*time.Millisecond)
	waitFor(t, "Redis to be used again", func() bool {
		p.Select(pool, newRequest("sid=after"), nil)
		return !p.remote.down.Load()
	})
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("waited 5s for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// BenchmarkStoreSelect compares the table path (a session the process
// knows, by its app cookie, pin cookie off) under store local and store
// redis: the same, with no round trip and no allocation. "unknown" is a
// key the process has not seen (each iteration a new one): one MGET, and
// a SET NX for the new placement.
func BenchmarkStoreSelect(b *testing.B) {
	rd := testredis.Start(b)
	pool := testPool(b, 3)
	for _, kind := range []string{storeLocal, storeRedis} {
		store := &StoreConfig{Kind: kind}
		if kind == storeRedis {
			store = &StoreConfig{Kind: kind, Address: rd.Addr, KeyPrefix: "bench"}
		}
		p := newTestPolicy(b, &Policy{Keys: []KeySource{{From: "cookie", Name: "sid"}}, DisablePinCookie: true,
			Scope: "bench-" + kind, Store: store})
		r := benchRequest("theme=dark; sid=0123456789abcdef0123456789abcdef")
		if p.Select(pool, r, nil) == nil {
			b.Fatal("no upstream")
		}
		b.Run("store="+kind+"/known", func(b *testing.B) {
			benchSelect(b, p, pool, r)
		})
		if kind == storeRedis {
			b.Run("store="+kind+"/unknown", func(b *testing.B) {
				before := rd.Commands(b)
				vars := map[string]any{}
				b.ReportAllocs()
				b.ResetTimer()
				for i := range b.N {
					req := benchRequest(fmt.Sprintf("sid=unknown-%d-%d", b.N, i))
					clear(vars)
					if p.Select(pool, req, nil) == nil {
						b.Fatal("no upstream")
					}
				}
				b.StopTimer()
				b.ReportMetric(float64(rd.Commands(b)-before)/float64(b.N), "cmds/op")
			})
		}
	}
}

// TestStoreRedisWriteBack: sessions one instance learned while Redis
// was down are written back once Redis answers again, empty (a
// restart): main entries and aliases, with their remaining TTL and in
// the live sets; an entry another instance wrote meanwhile wins (SET NX).
func TestStoreRedisWriteBack(t *testing.T) {
	rd := testredis.Start(t)
	p1 := newTestPolicy(t, &Policy{
		Keys:             []KeySource{{From: "cookie", Name: "sid"}, {From: "header", Name: "X-User"}},
		DisablePinCookie: true,
		Scope:            "one",
		SessionTTL:       caddy.Duration(time.Hour),
		Store:            &StoreConfig{Kind: storeRedis, Address: rd.Addr, KeyPrefix: "test-" + t.Name()},
	})
	p2 := redisPolicy(t, rd.Addr, "two") // the same key prefix
	pool := testPool(t, 3)
	ps1 := p1.poolState(pool)
	dials := []string{pool[0].Dial, pool[1].Dial, pool[2].Dial}
	waitFor(t, "the first run id", func() bool {
		// run is the refresh goroutine's: read it once none runs.
		if !p1.remote.counting.Load() && p1.remote.run != "" {
			return true
		}
		p1.refreshRemote(dials)
		return false
	})
	c := redis.NewClient(&redis.Options{Addr: rd.Addr, DisableIdentity: true})
	defer c.Close()
	ctx := context.Background()

	// Redis goes; instance one learns sessions, one per upstream, each
	// with an alias (the X-User header).
	rd.Stop()
	time.Sleep(redisQuiet) // the refresh above worked just now
	for i := range 30 {
		p1.Select(pool, newRequest(fmt.Sprintf("sid=warm-%d", i)), nil) // opens the circuit
	}
	if !p1.remote.missed.Load() {
		t.Fatal("the circuit did not open with Redis down")
	}
	const n = 600 // more than two batches
	now := sessions.Now()
	for i := range n {
		p1.remember([]uint64{sessionIDHash(fmt.Sprintf("down-%d", i)), sessionIDHash(fmt.Sprintf("user-%d", i))},
			ps1.recs[i%3].ID, now)
	}
	// Back, empty; another instance wrote one of the keys meanwhile.
	rd.Run(t)
	other := p1.remote.key(sessionIDHash("down-0"))
	if err := c.Set(ctx, other, remoteValue(pool[2].Dial, false), time.Hour).Err(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(redisSkip)
	waitFor(t, "the write back", func() bool {
		p1.refreshRemote(dials)
		keys, err := c.DBSize(ctx).Result()
		// n main entries, n aliases, the run id and 3 live sets.
		return err == nil && keys >= 2*n+4 && !p1.remote.resyncing.Load()
	})
	// Instance two, which never saw these sessions, sends them where
	// instance one put them, by either key.
	for i := 1; i < n; i += 37 {
		want := pool[i%3]
		if got := p2.Select(pool, newRequest(fmt.Sprintf("sid=down-%d", i)), nil); got != want {
			t.Fatalf("session down-%d went to %v on instance two, want %s", i, got, want.Dial)
		}
		if v, _ := c.Get(ctx, p1.remote.key(sessionIDHash(fmt.Sprintf("user-%d", i)))).Result(); v != "a|"+want.Dial {
			t.Fatalf("alias user-%d in Redis: %q, want %q", i, v, "a|"+want.Dial)
		}
	}
	if v, _ := c.Get(ctx, other).Result(); v != remoteValue(pool[2].Dial, false) {
		t.Errorf("the entry another instance wrote became %q: a write back must not overwrite it", v)
	}
	ttl, _ := c.TTL(ctx, p1.remote.key(sessionIDHash("down-5"))).Result()
	if ttl < time.Hour || ttl > time.Hour+time.Hour/4 {
		t.Errorf("a written-back entry has TTL %s, want its remaining hour plus a quarter", ttl)
	}
	// Counted: the n sessions and the 30 of the warm-up, less down-0
	// (the other instance's entry, which that instance counts).
	total := int64(0)
	for _, d := range dials {
		got, _ := c.ZCard(ctx, p1.remote.liveKey(d)).Result()
		total += got
	}
	if total != n+30-1 {
		t.Errorf("live sets count %d sessions, want %d", total, n+30-1)
	}
}

// TestStoreRedisBalanceFactorClusterWide: under store redis,
// balance_factor bounds the cluster's loads: the other instances' live
// sessions as last read from Redis (here set by hand: 600 on upstream 0)
// plus this instance's own, exact. Placing 1800 sessions here evens the
// cluster out (max/mean <= 1.06), where local counts alone would leave
// upstream 0 with 600 more than the others.
func TestStoreRedisBalanceFactorClusterWide(t *testing.T) {
	rd := testredis.Start(t)
	pool := testPool(t, 3)
	p := newTestPolicy(t, &Policy{
		Keys:             []KeySource{{From: "cookie", Name: "sid"}},
		DisablePinCookie: true,
		BalanceFactor:    1.05,
		Scope:            "bf",
		Store:            &StoreConfig{Kind: storeRedis, Address: rd.Addr, KeyPrefix: "test-" + t.Name()},
	})
	const others, n = 600, 1800
	// As a refresh reads them before this instance placed anything: the
	// other instances' 600 sessions on upstream 0.
	p.remote.counts.Store(&map[string]clusterCount{
		pool[0].Dial: {n: others}, pool[1].Dial: {}, pool[2].Dial: {},
	})
	for i := range n {
		if p.Select(pool, newRequest(fmt.Sprintf("sid=cluster-%d", i)), nil) == nil {
			t.Fatal("no upstream")
		}
	}
	local := liveCounts(p, pool)
	cluster := []int64{local[0] + others, local[1], local[2]}
	ratio := maxOverMean(cluster, []int{1, 1, 1})
	t.Logf("balance_factor 1.05, %d sessions elsewhere on upstream 0, %d placed here: here %v, cluster %v, max/mean %.4f",
		others, n, local, cluster, ratio)
	if ratio > 1.06 {
		t.Errorf("cluster-wide max/mean %.4f > 1.06", ratio)
	}
	for i, u := range pool {
		if got, want := p.sessionsOn(p.poolState(pool), i), cluster[i]; got != want {
			t.Errorf("sessionsOn(%s) = %d, want the cluster's %d", u.Dial, got, want)
		}
	}
	// Never less than the local count: Redis missed writes, or reads 0.
	p.remote.counts.Store(&map[string]clusterCount{pool[0].Dial: {n: 0, localAt: local[0] + 50}})
	if got := p.sessionsOn(p.poolState(pool), 0); got != local[0] {
		t.Errorf("sessionsOn with a cluster count below the local one = %d, want the local %d", got, local[0])
	}
}

// TestStoreRedisAliasNotCounted: a session first seen by one key (the
// client IP), then by its app's cookie, whose first key becomes an
// alias, counts once in the cluster's live set, not twice.
func TestStoreRedisAliasNotCounted(t *testing.T) {
	rd := testredis.Start(t)
	p := redisPolicy(t, rd.Addr, "alias")
	pool := testPool(t, 3)
	ps := p.poolState(pool)
	ip, sid := sessionIDHash("198.18.0.1"), sessionIDHash("app-session")
	p.remember([]uint64{ip}, ps.recs[1].ID, sessions.Now())
	p.remember([]uint64{sid, ip}, ps.recs[1].ID, sessions.Now())
	c := redis.NewClient(&redis.Options{Addr: rd.Addr, DisableIdentity: true})
	defer c.Close()
	members, err := c.ZRange(context.Background(), p.remote.liveKey(pool[1].Dial), 0, -1).Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(members) != 1 || members[0] != strconv.FormatUint(sid, 16) {
		t.Errorf("live set of %s: %v, want the session's main key alone", pool[1].Dial, members)
	}
	if got := p.table.LiveCount(ps.recs[1].ID); got != 1 {
		t.Errorf("local live count %d, want 1", got)
	}
}

package affinity

import (
	"fmt"
	"github.com/caddy-affinity/caddy-affinity/internal/testredis"
	"testing"
	"time"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// redisPolicy provisions a learn-mode policy on the given Redis with its
// own table namespace, standing for one instance of several.
func redisPolicy(t testing.TB, addr, instance string) *Policy {
	return newTestPolicy(t, &Policy{
		Keys:             []keys.Source{{From: "cookie", Name: "sid"}},
		DisablePinCookie: true,
		Scope:            instance,
		Store:            &sessions.Config{Kind: sessions.KindRedis, RedisConn: sessions.RedisConn{Address: addr}, KeyPrefix: "test-" + t.Name()},
	})
}

// TestStoreRedisDown: with Redis gone, selections go on within the
// timeout, the outage is counted, and Redis is skipped for a second.
func TestStoreRedisDown(t *testing.T) {
	rd := testredis.Start(t)
	p := redisPolicy(t, rd.Addr, "down")
	pool := testPool(t, 3)
	rd.Stop()
	// The circuit opens only once redisQuiet passed since the last
	// success (opening the store reads the shared states, a success).
	time.Sleep(300 * time.Millisecond)
	errorsBefore := storeErrorCount(t, p)
	start := time.Now()
	for i := range 20 {
		if p.Select(pool, newRequest(fmt.Sprintf("sid=unknown-%d", i)), nil) == nil {
			t.Fatal("no upstream with Redis down")
		}
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("20 selections took %s with Redis down (a refused connection fails at once; skipped after three errors)", took)
	}
	if n := storeErrorCount(t, p) - errorsBefore; n < 1 || n > 3 {
		t.Errorf("%v store errors counted, want 1-3 (Redis is skipped for a second after three)", n)
	}
	// Back: the next operation after the skip works again.
	rd.Run(t)
	time.Sleep(1100 * time.Millisecond)
	before := storeErrorCount(t, p)
	for i := range 5 {
		p.Select(pool, newRequest(fmt.Sprintf("sid=after-%d", i)), nil)
	}
	if n := storeErrorCount(t, p) - before; n != 0 {
		t.Errorf("%v store errors after Redis came back", n)
	}
}

// storeErrorCount reads caddy_affinity_store_errors_total from the
// policy's metrics registry.
func storeErrorCount(t *testing.T, p *Policy) float64 {
	t.Helper()
	mfs, err := p.ctx.GetMetricsRegistry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "caddy_affinity_store_errors_total" {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatal("caddy_affinity_store_errors_total is not registered")
	return 0
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
	for _, kind := range []string{sessions.KindLocal, sessions.KindRedis} {
		store := &sessions.Config{Kind: kind}
		if kind == sessions.KindRedis {
			store = &sessions.Config{Kind: kind, RedisConn: sessions.RedisConn{Address: rd.Addr}, KeyPrefix: "bench"}
		}
		p := newTestPolicy(b, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}, DisablePinCookie: true,
			Scope: "bench-" + kind, Store: store})
		r := benchRequest("theme=dark; sid=0123456789abcdef0123456789abcdef")
		if p.Select(pool, r, nil) == nil {
			b.Fatal("no upstream")
		}
		b.Run("store="+kind+"/known", func(b *testing.B) {
			benchSelect(b, p, pool, r)
		})
		if kind == sessions.KindRedis {
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
		Keys:             []keys.Source{{From: "cookie", Name: "sid"}},
		DisablePinCookie: true,
		BalanceFactor:    1.05,
		Scope:            "bf",
		Store:            &sessions.Config{Kind: sessions.KindRedis, RedisConn: sessions.RedisConn{Address: rd.Addr}, KeyPrefix: "test-" + t.Name()},
	})
	const others, n = 600, 1800
	// Another instance (a session store of its own, the same Redis and
	// namespace) holds 600 sessions on upstream 0.
	other := sessions.NewStore(10_000)
	defer other.Close()
	_, ns := p.namespaces(p.ctx)
	oh, err := other.Open(sessions.Options{Config: p.Store, Namespace: ns, Scope: 7, TTL: p.ttl, MaxSessions: p.MaxSessions})
	if err != nil {
		t.Fatal(err)
	}
	defer oh.Close()
	up0 := p.poolState(pool).Recs[0].ID
	for i := range others {
		oh.Learn(sessionIDHash(fmt.Sprintf("elsewhere-%d", i)), up0, sessions.Now(), nil)
	}
	dials := []string{pool[0].Dial, pool[1].Dial, pool[2].Dial}
	waitFor(t, "the cluster's counts", func() bool {
		oh.Refresh(dials) // the other instance's farm writes its counts
		p.sessions.Refresh(dials)
		c, _ := p.farm.store.ClusterSessions(pool[0].Dial)
		return p.poolState(pool).SessionsOn(p.sessions, 0) >= others && c >= others
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
		if got, want := p.poolState(pool).SessionsOn(p.sessions, i), cluster[i]; got != want {
			t.Errorf("SessionsOn(%s) = %d, want the cluster's %d", u.Dial, got, want)
		}
	}
}

// TestStoreRedisAliasNotCounted: a session first seen by one key (the
// client IP), then by its app's cookie, whose first key becomes an
// alias, counts once in the cluster's counts, not twice.
func TestStoreRedisAliasNotCounted(t *testing.T) {
	rd := testredis.Start(t)
	p := redisPolicy(t, rd.Addr, "alias")
	pool := testPool(t, 3)
	ps := p.poolState(pool)
	ip, sid := sessionIDHash("198.18.0.1"), sessionIDHash("app-session")
	// Each seen twice: established, so written.
	for range 2 {
		p.sessions.Remember([]uint64{ip}, ps.Recs[1].ID, sessions.Now(), nil)
	}
	for range 2 {
		p.sessions.Remember([]uint64{sid, ip}, ps.Recs[1].ID, sessions.Now(), nil)
	}
	dials := []string{pool[0].Dial, pool[1].Dial, pool[2].Dial}
	waitFor(t, "the cluster's count of one session", func() bool {
		p.sessions.Refresh(dials)
		n, ok := p.farm.store.ClusterSessions(pool[1].Dial)
		return ok && n == 1
	})
	time.Sleep(50 * time.Millisecond)
	p.sessions.Refresh(dials)
	time.Sleep(50 * time.Millisecond)
	if n, _ := p.farm.store.ClusterSessions(pool[1].Dial); n != 1 {
		t.Errorf("the cluster counts %d sessions on %s, want 1", n, pool[1].Dial)
	}
	if got := p.table.LiveCount(ps.Recs[1].ID); got != 1 {
		t.Errorf("local live count %d, want 1", got)
	}
}

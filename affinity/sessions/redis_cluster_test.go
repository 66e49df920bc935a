package sessions

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/caddy-affinity/caddy-affinity/internal/testredis"
)

// instanceOn is instance for any connection (Sentinel, Cluster).
func instanceOn(t *testing.T, conn RedisConn, prefix, ns string, ttl uint32, maxSessions int) *Handle {
	t.Helper()
	s := NewStore(maxSessions)
	t.Cleanup(s.Close)
	h, err := s.Open(Options{
		Config: &Config{Kind: KindRedis, RedisConn: conn, KeyPrefix: prefix},
		Scope:  0x5eed, Namespace: ns, TTL: ttl, MaxSessions: maxSessions,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

// TestRedisClusterCorrect: every command the store sends works on a
// Redis Cluster: entries spread over every bucket (16 here, their hash
// slots on all three masters) are written, read back by another
// instance in one pipelined round trip, moved, retired and deleted; the
// moves are published to the other instance (its local copy follows);
// the cluster-wide counts are right; and no call failed (a CROSSSLOT or
// a MOVED left to luck would be counted in store_errors_total).
func TestRedisClusterCorrect(t *testing.T) {
	t.Parallel()
	cl := testredis.StartCluster(t)
	conn := RedisConn{Cluster: cl.Addrs()}
	ids, dials := upstreams(t, 3)
	x := instanceOn(t, conn, "cc", "ns", 600, 1000)
	y := instanceOn(t, conn, "cc", "ns", 600, 1000)
	errorsBefore := testutil.ToFloat64(storeErrors)
	n := x.remote.(*redisNS)
	buckets := map[uint32]bool{}
	key := func(i int) uint64 { return uint64(i)*0x9e3779b97f4a7c15 + 7 }
	for i := range 90 {
		buckets[n.bucket(key(i))] = true
		x.Learn(key(i), ids[i%3], Now(), nil)
	}
	if len(buckets) != 1<<n.bits {
		t.Fatalf("the keys fill %d of %d buckets", len(buckets), 1<<n.bits)
	}
	slots := map[int]bool{}
	for b := range buckets {
		slots[cl.Slot(t, n.bucketKey(b, n.gen(Now())))] = true
	}
	t.Logf("90 sessions in %d buckets, %d hash slots", len(buckets), len(slots))
	// y reads them all, several keys a request (one pipeline over
	// several slots).
	for i := 0; i < 90; i += 3 {
		keys := []uint64{key(i), key(i + 1), key(i + 2)}
		for j, k := range keys {
			id, ok := y.Lookup([]uint64{k}, Query{Now: Now(), LaterAliases: true}, func(uint32) bool { return true })
			if !ok || id != ids[(i+j)%3] {
				t.Fatalf("y: session %d: %d, %v; want %d", i+j, id, ok, ids[(i+j)%3])
			}
		}
	}
	expect := func(what string, want ...int64) {
		t.Helper()
		waitUntil(t, what, func() bool {
			// Every instance's once-a-second refresh (the farm's
			// loop) writes its counts; y's reads them.
			x.Refresh(dials)
			y.Refresh(dials)
			for i, d := range dials {
				if got, ok := y.remote.clusterSessions(d); !ok || got != want[i] {
					return false
				}
			}
			return true
		})
	}
	expect("30 sessions on each upstream, counted cluster-wide", 30, 30, 30)
	// Moves (x), published: y's local copies follow.
	for _, i := range []int{0, 3, 6} {
		x.Remember([]uint64{key(i)}, ids[1], Now(), nil)
	}
	waitUntil(t, "y to follow x's published moves", func() bool {
		for _, i := range []int{0, 3, 6} {
			if e, ok := y.Peek(key(i), Now()); !ok || e.Upstream() != ids[1] {
				return false
			}
		}
		return true
	})
	for _, i := range []int{1, 4} {
		y.Forget(key(i), Now(), nil)
	}
	y.Retire(key(2), Now(), nil)
	expect("moves, deletions and a retirement", 27, 31, 29)
	if d := testutil.ToFloat64(storeErrors) - errorsBefore; d != 0 {
		t.Errorf("%v store errors on a healthy Cluster, want none", d)
	}
}

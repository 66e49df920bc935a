package healthcheck

import (
	"context"
	"encoding/json"
	"strconv"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"github.com/redis/go-redis/v9"

	"github.com/caddy-affinity/caddy-affinity/internal/redisconn"
	"github.com/caddy-affinity/caddy-affinity/internal/testredis"
)

// agreeWithin is the promise of issue 16: a state set on any instance is
// seen by every instance sharing the store within 2s.
const agreeWithin = 2 * time.Second

// redisClient returns a client built as the store builds it.
func redisClient(t *testing.T, c redisconn.Config) redis.UniversalClient {
	t.Helper()
	c.Timeout = caddy.Duration(300 * time.Millisecond)
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	cl := c.Client()
	t.Cleanup(func() { cl.Close() })
	return cl
}

// acquireRedis starts (or joins) the instance's Redis state sync, with
// a client of its own, as a separate process would have.
func (in *testInstance) acquireRedis(t *testing.T, c redisconn.Config, prefix string, interval time.Duration) func() {
	t.Helper()
	release, err := acquireRedisStates(in.reg, redisClient(t, c), c.Identity(), prefix, interval)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)
	return release
}

func readRedisRecord(t *testing.T, cl redis.UniversalClient, prefix, dial string) (storedRecord, bool) {
	t.Helper()
	raw, err := cl.HGet(context.Background(), prefix+redisStatesSuffix, dial).Result()
	if err == redis.Nil {
		return storedRecord{}, false
	}
	if err != nil {
		t.Fatal(err)
	}
	var rec storedRecord
	if err := json.Unmarshal([]byte(raw), &rec); err != nil {
		t.Fatalf("record %s: %v", raw, err)
	}
	return rec, true
}

// agree checks that a state set through one instance's admin API
// reaches the other within agreeWithin, with who set it and when, and
// returns how long it took.
func agree(t *testing.T, from, to *testInstance, dial string, s State) time.Duration {
	t.Helper()
	start := time.Now()
	if err := from.post(t, dial, s); err != nil {
		t.Fatalf("operate on %s: %v", from.name, err)
	}
	waitFor(t, agreeWithin, to.name+" applies "+from.name+"'s "+s.String(), func() bool {
		return to.reg.lookup(dial).State() == s
	})
	took := time.Since(start) // the operator's call included
	u, uf := to.reg.lookup(dial), from.reg.lookup(dial)
	if op := u.operator.Load(); op == nil || op.By != from.name || op.Since != uf.operator.Load().Since {
		t.Errorf("%s's record after %s's %s: %+v, want by %s since %d", to.name, from.name, s, op, from.name, uf.operator.Load().Since)
	}
	if o, ok := u.LastOrder(); !ok || o.By != from.name || o.State != s || !o.Since.Equal(uf.Since()) {
		t.Errorf("%s's LastOrder: %+v %v, want %s by %s since %s", to.name, o, ok, s, from.name, uf.Since())
	}
	if u.setter() != setByOperator || !u.Since().Equal(uf.Since()) {
		t.Errorf("%s: set by %q since %s; want operator since %s", to.name, u.setter(), u.Since(), uf.Since())
	}
	return took
}

// Two instances sharing one Redis (and no Caddy storage) agree on
// drain, maintenance and up within 2s, both ways; the interval is an
// hour, so only the published change can carry it.
func TestRedisStatesTwoInstancesAgree(t *testing.T) {
	t.Parallel()
	rd := testredis.Start(t)
	conn := redisconn.Config{Address: rd.Addr}
	const dial = "10.0.0.1:8080"
	a, b := twoInstances(t, conn, dial)
	a.acquireRedis(t, conn, "p", time.Hour)
	waitSubscribers(t, rd.Client(), "p"+redisChangedSuffix, 2)

	for _, step := range []struct {
		from, to *testInstance
		s        State
	}{{a, b, Draining}, {b, a, Maintenance}, {a, b, Up}} {
		took := agree(t, step.from, step.to, dial, step.s)
		t.Logf("%s -> %s %s: %s", step.from.name, step.to.name, step.s, took.Round(time.Microsecond))
	}
	cl := rd.Client()
	defer cl.Close()
	rec, ok := readRedisRecord(t, cl, "p", dial)
	if !ok || rec.State != Up || rec.By != "a" || rec.Upstream != dial {
		t.Errorf("record in Redis: %+v (found %v)", rec, ok)
	}
	if ttl := cl.PTTL(context.Background(), "p"+redisStatesSuffix).Val(); ttl < stateGrace {
		t.Errorf("the states hash's TTL is %s, want about %s", ttl, stateGrace+redisStatesTTL)
	}
	b.waitLastChange(t, dial, reasonSync)
}

// twoInstances returns instances a and b, each using dial, b sharing
// states through Redis (interval 1h: only messages carry them).
func twoInstances(t *testing.T, conn redisconn.Config, dial string) (a, b *testInstance) {
	t.Helper()
	a, b = newInstance(t, "a"), newInstance(t, "b")
	a.reg.get(dial)
	b.reg.get(dial)
	b.acquireRedis(t, conn, "p", time.Hour)
	return a, b
}

// waitSubscribers waits until n clients subscribe to channel.
func waitSubscribers(t *testing.T, cl *redis.Client, channel string, n int64) {
	t.Helper()
	defer cl.Close()
	waitFor(t, 5*time.Second, "the instances subscribe", func() bool {
		m, err := cl.PubSubNumSub(context.Background(), channel).Result()
		return err == nil && m[channel] == n
	})
}

// A state that is stored but never published (a message lost while a
// subscriber reconnects) reaches the other instance at its next round.
func TestRedisStatesSurvivePubSubLoss(t *testing.T) {
	t.Parallel()
	rd := testredis.Start(t)
	conn := redisconn.Config{Address: rd.Addr}
	b := newInstance(t, "b")
	const dial = "10.0.0.1:8080"
	b.reg.get(dial)
	b.acquireRedis(t, conn, "p", SyncInterval)
	// Instance a, as a record written without a publish.
	rec := storedRecord{Upstream: dial, operatorRecord: operatorRecord{State: Maintenance, Since: time.Now().UnixNano(), By: "a"}, Seen: time.Now().UnixNano()}
	raw, _ := json.Marshal(rec)
	cl := rd.Client()
	defer cl.Close()
	if err := cl.HSet(context.Background(), "p"+redisStatesSuffix, dial, raw).Err(); err != nil {
		t.Fatal(err)
	}
	took := waitFor(t, agreeWithin, "b reads a's unpublished maintenance", func() bool {
		return b.reg.lookup(dial).State() == Maintenance
	})
	t.Logf("an unpublished state applied after %s (interval %s)", took.Round(time.Millisecond), SyncInterval)

	// A Redis restarted empty: b writes back the state it knows.
	rd.Stop()
	rd.Run(t)
	waitFor(t, 5*time.Second, "b writes its known state back to an empty Redis", func() bool {
		got, ok := readRedisRecord(t, cl, "p", dial)
		return ok && got.State == Maintenance && got.By == "a" && got.Since == rec.Since
	})
}

// A restarted instance has the shared states when AcquireRedisStates
// returns: a known upstream's applied, an unknown one's kept aside for
// its first use.
func TestRedisStatesRestartLoadsStates(t *testing.T) {
	t.Parallel()
	rd := testredis.Start(t)
	conn := redisconn.Config{Address: rd.Addr}
	a := newInstance(t, "a")
	a.reg.get("10.0.0.1:80")
	a.reg.get("10.0.0.2:80")
	release := a.acquireRedis(t, conn, "p", time.Hour)
	a.post(t, "10.0.0.1:80", Draining)
	a.post(t, "10.0.0.2:80", Maintenance)
	release()

	restarted := newInstance(t, "a2")
	restarted.reg.get("10.0.0.1:80")
	restarted.acquireRedis(t, conn, "p", time.Hour)
	if s := restarted.reg.lookup("10.0.0.1:80").State(); s != Draining {
		t.Errorf("known upstream after restart: %s, want draining", s)
	}
	if u := restarted.reg.get("10.0.0.2:80"); u.State() != Maintenance || u.setter() != setByOperator {
		t.Errorf("first use after restart: %s by %q, want maintenance by operator", u.State(), u.setter())
	}
}

// A write never replaces a newer record; records nobody used for
// stateGrace are deleted and not applied; malformed ones are ignored.
func TestRedisStatesRecords(t *testing.T) {
	t.Parallel()
	rd := testredis.Start(t)
	conn := redisconn.Config{Address: rd.Addr}
	cl := rd.Client()
	defer cl.Close()
	ctx := context.Background()
	a := newInstance(t, "a")
	a.reg.get("10.0.0.1:80")
	a.acquireRedis(t, conn, "p", time.Hour)
	s := redisStatesPoolGet(t, a.reg, conn, "p")

	now := time.Now().UnixNano()
	newer := operatorRecord{State: Maintenance, Since: now, By: "x"}
	older := operatorRecord{State: Draining, Since: now - int64(time.Second), By: "y"}
	// Since values of different lengths too: compared as numbers.
	tiny := operatorRecord{State: Up, Since: 999, By: "z"}
	if wrote, err := s.write(ctx, s.client(), "10.0.0.5:80", newer, now); err != nil || wrote == nil {
		t.Fatalf("first write: %s %v", wrote, err)
	}
	for _, old := range []operatorRecord{older, tiny} {
		if wrote, err := s.write(ctx, s.client(), "10.0.0.5:80", old, now); err != nil || wrote != nil {
			t.Fatalf("older write (since %d) replaced since %d: %s %v", old.Since, newer.Since, wrote, err)
		}
	}
	if got, _ := readRedisRecord(t, cl, "p", "10.0.0.5:80"); got.operatorRecord != newer {
		t.Fatalf("stored %+v, want %+v", got.operatorRecord, newer)
	}

	// A record whose last use is older than stateGrace.
	stale := storedRecord{Upstream: "10.0.0.1:80", operatorRecord: operatorRecord{State: Maintenance, Since: now - int64(stateGrace) - int64(time.Hour), By: "old"}}
	raw, _ := json.Marshal(stale)
	cl.HSet(ctx, "p"+redisStatesSuffix, "10.0.0.1:80", raw, "garbage", "{not json", "10.0.0.7:80", `{"upstream":"10.0.0.8:80","state":"up","since":5}`)
	s.round()
	if _, ok := readRedisRecord(t, cl, "p", "10.0.0.1:80"); ok {
		t.Error("a record nobody used for stateGrace is still stored")
	}
	if st := a.reg.lookup("10.0.0.1:80").State(); st != Up {
		t.Errorf("a stale record was applied: %s", st)
	}
	if len(s.bad) != 2 {
		t.Errorf("malformed records noted: %v, want the garbage and the misfiled one", s.bad)
	}
	if n := len(a.logs.FilterMessageSnippet("malformed").All()); n != 2 {
		t.Errorf("%d warnings about malformed records, want 2", n)
	}
	s.round() // logged once, not every round
	if n := len(a.logs.FilterMessageSnippet("malformed").All()); n != 2 {
		t.Errorf("%d warnings after a second round, want still 2", n)
	}
	// Garbage published is ignored too.
	cl.Publish(ctx, "p"+redisChangedSuffix, "{bad")
	cl.Publish(ctx, "p"+redisChangedSuffix, `{"upstream":"10.0.0.1:80","state":"nonsense","since":`+strconv.FormatInt(now, 10)+`}`)
	time.Sleep(100 * time.Millisecond)
	if st := a.reg.lookup("10.0.0.1:80").State(); st != Up {
		t.Errorf("a malformed published record was applied: %s", st)
	}
}

// redisStatesPoolGet returns the live RedisStates of a registry for a
// connection and prefix.
func redisStatesPoolGet(t *testing.T, reg *registry, conn redisconn.Config, prefix string) *RedisStates {
	t.Helper()
	redisStatesMu.Lock()
	defer redisStatesMu.Unlock()
	for _, s := range redisStatesLive[reg] {
		if s.key == prefix+redisStatesSuffix {
			return s
		}
	}
	t.Fatal("no live RedisStates")
	return nil
}

// On a Redis Cluster, two instances agree within 2s, and again after the
// master holding the states hash is killed and its replica took over: a
// state set during the failover is kept here, written back once Redis
// answers, and reaches the other instance.
func TestRedisStatesCluster(t *testing.T) {
	t.Parallel()
	c := testredis.StartCluster(t)
	agreeAcrossFailover(t, "cluster", redisconn.Config{Cluster: c.Addrs()}, func() {
		c.KillMaster(t, c.MasterOf(t, "p"+redisStatesSuffix))
	})
}

// The same with Sentinel.
func TestRedisStatesSentinel(t *testing.T) {
	t.Parallel()
	s := testredis.StartSentinel(t)
	agreeAcrossFailover(t, "sentinel", redisconn.Config{SentinelMaster: testredis.SentinelMaster, Sentinels: s.Addrs()}, func() {
		s.KillMaster(t)
	})
}

func agreeAcrossFailover(t *testing.T, topology string, conn redisconn.Config, killMaster func()) {
	t.Helper()
	a, b := newInstance(t, "a"), newInstance(t, "b")
	const dial = "10.0.0.1:8080"
	a.reg.get(dial)
	b.reg.get(dial)
	a.acquireRedis(t, conn, "p", SyncInterval)
	b.acquireRedis(t, conn, "p", SyncInterval)
	// Let both subscriptions settle (PUBSUB NUMSUB is per node in a
	// Cluster).
	time.Sleep(200 * time.Millisecond)
	t.Logf("%s: a -> b draining: %s", topology, agree(t, a, b, dial, Draining).Round(time.Microsecond))
	t.Logf("%s: b -> a up: %s", topology, agree(t, b, a, dial, Up).Round(time.Microsecond))

	killed := make(chan struct{})
	start := time.Now()
	go func() {
		defer close(killed)
		killMaster()
	}()
	time.Sleep(300 * time.Millisecond) // dead, not yet replaced
	err := a.post(t, dial, Maintenance)
	t.Logf("%s: operate during the failover: %v", topology, err)
	waitFor(t, 15*time.Second, "b applies a's maintenance set during the failover", func() bool {
		return b.reg.lookup(dial).State() == Maintenance
	})
	t.Logf("%s: b applied a's maintenance %s after the kill (set 300ms after it)", topology, time.Since(start).Round(time.Millisecond))
	<-killed
	// After the failover, within 2s again, through the new master.
	t.Logf("%s: b -> a draining after the failover: %s", topology, agree(t, b, a, dial, Draining).Round(time.Microsecond))
}

// A reload hands in a new client before the old config releases (and
// closes) its own: states still travel both ways at once (the interval
// is an hour: only a message can carry them). (go-redis keeps a PubSub
// of a closed client working until its connection fails, so this does
// not tell which client the subscription is on.)
func TestRedisStatesReloadSwitchesClient(t *testing.T) {
	t.Parallel()
	rd := testredis.Start(t)
	conn := redisconn.Config{Address: rd.Addr}
	const dial = "10.0.0.1:8080"
	a, b := twoInstances(t, conn, dial)
	old := redisClient(t, conn)
	releaseOld, err := acquireRedisStates(a.reg, old, conn.Identity(), "p", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	a.acquireRedis(t, conn, "p", time.Hour) // the reloaded config's
	releaseOld()
	old.Close()
	time.Sleep(100 * time.Millisecond) // a resubscribes on the new client
	waitSubscribers(t, rd.Client(), "p"+redisChangedSuffix, 2)
	t.Logf("b -> a maintenance after a's reload: %s", agree(t, b, a, dial, Maintenance).Round(time.Microsecond))
	t.Logf("a -> b up after a's reload: %s", agree(t, a, b, dial, Up).Round(time.Microsecond))
}

// quietRedis drops go-redis's process-wide log (a line per failed dial
// during a failover); the store sends it to Caddy's log.
type quietRedis struct{}

func (quietRedis) Printf(context.Context, string, ...any) {}

func init() { redis.SetLogger(quietRedis{}) }

// An instance that shares states both through Caddy storage (its own
// folder) and through Redis keeps aside, for its first use, the Redis
// state of an upstream it does not use yet: the storage syncer's rounds,
// which replace what they keep aside with what storage holds, must not
// drop it, or the first requests to the upstream would ignore its state
// until the next Redis round.
func TestRedisStatesPendingSurvivesStorageSync(t *testing.T) {
	t.Parallel()
	rd := testredis.Start(t)
	conn := redisconn.Config{Address: rd.Addr}
	const dial = "10.0.0.9:80"
	a, b := newInstance(t, "a"), newInstance(t, "b")
	b.reg.get(dial)
	b.acquireRedis(t, conn, "p", SyncInterval)
	a.acquire(t, &certmagic.FileStorage{Path: t.TempDir()})
	a.acquireRedis(t, conn, "p", time.Hour) // only the first read and messages
	if err := b.post(t, dial, Draining); err != nil {
		t.Fatal(err)
	}
	pending := func() bool {
		a.reg.mu.RLock()
		defer a.reg.mu.RUnlock()
		_, ok := a.reg.pending[dial]
		return ok
	}
	waitFor(t, agreeWithin, "a keeps b's draining aside", pending)
	// Across several storage rounds (every second).
	for deadline := time.Now().Add(2500 * time.Millisecond); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if !pending() {
			t.Fatal("a storage round dropped the state kept aside from Redis")
		}
	}
	if u := a.reg.get(dial); u.State() != Draining {
		t.Errorf("a's first use: %s, want draining", u.State())
	}
}

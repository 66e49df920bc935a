//go:build unix

package redisconn

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"

	"github.com/caddy-affinity/caddy-affinity/internal/testredis"
)

// testTimeout is the client timeout of these tests: short, so that the
// recovery after a failover is measured to about a tenth of a second.
const testTimeout = 300 * time.Millisecond

// callSlack is how much longer than the timeout a call may take on a
// loaded 2-core machine (scheduling, the hook's own work); a call that
// retried past the timeout would take a multiple of it.
const callSlack = 250 * time.Millisecond

// recoverWithin bounds the recovery after a master's SIGKILL (measured
// ~2.4-3s; see docs/redis-ha.md), with room for a loaded CI machine.
const recoverWithin = 10 * time.Second

func client(t *testing.T, c Config) redis.UniversalClient {
	t.Helper()
	if c.Timeout == 0 {
		c.Timeout = caddy.Duration(testTimeout)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	cl := c.Client()
	t.Cleanup(func() { cl.Close() })
	return cl
}

// basics: SET/GET, and a pipeline whose keys share a hash tag (one
// slot: what the store's multi-key calls do).
func basics(t *testing.T, cl redis.UniversalClient) {
	t.Helper()
	ctx := context.Background()
	if err := cl.Set(ctx, "{s1}a", "1", time.Minute).Err(); err != nil {
		t.Fatalf("SET: %v", err)
	}
	if v, err := cl.Get(ctx, "{s1}a").Result(); err != nil || v != "1" {
		t.Fatalf("GET: %q, %v", v, err)
	}
	p := cl.Pipeline()
	p.Set(ctx, "{s1}b", "2", time.Minute)
	p.HSet(ctx, "{s1}h", "f", "3")
	p.Expire(ctx, "{s1}h", time.Minute)
	mget := p.MGet(ctx, "{s1}a", "{s1}b", "{s1}missing")
	if _, err := p.Exec(ctx); err != nil {
		t.Fatalf("pipeline: %v", err)
	}
	if got := fmt.Sprint(mget.Val()); got != "[1 2 <nil>]" {
		t.Fatalf("MGET in the pipeline: %s", got)
	}
}

func TestClientSingle(t *testing.T) {
	t.Parallel()
	rd := testredis.Start(t)
	cl := client(t, Config{Address: rd.Addr})
	basics(t, cl)
	// A Redis restart: the client answers again, and a subscription
	// made before it receives what is published after it.
	sub := subscribe(t, cl, "{s1}ch")
	rd.Stop()
	start := time.Now()
	rd.Run(t)
	answered := waitAnswers(t, cl, "{s1}a", start)
	took := sub.waitAfter(t, cl, start)
	t.Logf("single server restarted: SET answered %s after the restart began, the subscription received again after %s",
		answered.Round(time.Millisecond), took.Round(time.Millisecond))
}

func TestClientSentinel(t *testing.T) {
	t.Parallel()
	s := testredis.StartSentinel(t)
	t.Logf("sentinel bring-up %s", s.BringUp.Round(time.Millisecond))
	cl := client(t, Config{SentinelMaster: testredis.SentinelMaster, Sentinels: s.Addrs()})
	basics(t, cl)
	sub := subscribe(t, cl, "{s1}ch")
	if !subscribedOn(t, s.Master, "{s1}ch") {
		t.Fatalf("the subscription is not on the master %s", s.Master.Addr)
	}
	w := startWrites(cl, "s1", time.Millisecond)
	load := startLoad(t, cl, "{s1}a")
	time.Sleep(300 * time.Millisecond)
	var promoted time.Duration
	start := time.Now()
	killed := make(chan struct{})
	go func() { defer close(killed); promoted = s.KillMaster(t) }()
	recovered := load.waitRecovered(t, start)
	took := sub.waitAfter(t, cl, start)
	<-killed
	load.stop(t)
	acked, last, lost := w.lost(t, cl, start)
	t.Logf("sentinel failover: %d writes acknowledged before the kill (%d in its last 100ms); %d of them lost", acked, last, lost)
	t.Logf("sentinel failover: SET answers again after %s (promotion seen by the sentinels %s); the subscription received again after %s; %d calls failed meanwhile, the slowest took %s",
		recovered.Round(time.Millisecond), promoted.Round(time.Millisecond), took.Round(time.Millisecond), load.failed.Load(), time.Duration(load.slowest.Load()).Round(time.Millisecond))
}

func TestClientCluster(t *testing.T) {
	t.Parallel()
	c := testredis.StartCluster(t)
	t.Logf("cluster bring-up %s", c.BringUp.Round(time.Millisecond))
	cl := client(t, Config{Cluster: c.Addrs()[:2]})
	basics(t, cl)
	// go-redis does not split a multi-key command across slots: keys
	// read together must share a hash tag.
	ctx := context.Background()
	if err := cl.MGet(ctx, "{s1}a", "{s2}a").Err(); err == nil || !strings.Contains(err.Error(), "CROSSSLOT") {
		t.Fatalf("MGET across slots: %v, want CROSSSLOT", err)
	}
	// A regular channel: go-redis subscribes on the master of the
	// channel's slot; the same hash tag as the key puts both on the
	// master killed below.
	sub := subscribe(t, cl, "{s1}ch")
	master := c.MasterOf(t, "{s1}a")
	if !subscribedOn(t, master, "{s1}ch") {
		t.Fatalf("the subscription is not on %s, the master of its slot", master.Addr)
	}
	boundedWhileHung(t, cl, master)
	w := startWrites(cl, "s1", time.Millisecond)
	load := startLoad(t, cl, "{s1}a")
	time.Sleep(300 * time.Millisecond)
	var promoted time.Duration
	start := time.Now()
	killed := make(chan struct{})
	go func() { defer close(killed); _, promoted = c.KillMaster(t, master) }()
	recovered := load.waitRecovered(t, start)
	took := sub.waitAfter(t, cl, start)
	<-killed
	load.stop(t)
	acked, last, lost := w.lost(t, cl, start)
	t.Logf("cluster failover: %d writes acknowledged before the kill (%d in its last 100ms); %d of them lost", acked, last, lost)
	t.Logf("cluster failover: SET answers again after %s (replica master and cluster ok after %s); the subscription received again after %s; %d calls failed meanwhile, the slowest took %s",
		recovered.Round(time.Millisecond), promoted.Round(time.Millisecond), took.Round(time.Millisecond), load.failed.Load(), time.Duration(load.slowest.Load()).Round(time.Millisecond))
}

// A slot moved to another master while the client holds the old slot
// map (resharding): during the migration the client follows ASK for a
// migrated key, after it MOVED, each within the call's timeout (a client
// that did not would get the ASK or MOVED error).
func TestClientClusterSlotMoved(t *testing.T) {
	t.Parallel()
	c := testredis.StartCluster(t)
	cl := client(t, Config{Cluster: c.Addrs()[:1]})
	ctx := context.Background()
	basics(t, cl)
	slot := c.Slot(t, "{s1}a")
	from := c.MasterOf(t, "{s1}a")
	var to *testredis.Node
	for _, n := range c.Nodes {
		if n != from && isMaster(t, c, n) {
			to = n
			break
		}
	}
	get := func(what string) {
		t.Helper()
		t0 := time.Now()
		v, err := cl.Get(ctx, "{s1}a").Result()
		took := time.Since(t0)
		if err != nil || v != "1" {
			t.Fatalf("GET %s: %q %v", what, v, err)
		}
		if took > testTimeout+callSlack {
			t.Errorf("GET %s took %s", what, took)
		}
		t.Logf("GET %s: %s", what, took.Round(time.Microsecond))
	}
	c.MigrateSlot(t, slot, to, false)
	get("during the migration (ASK)")
	c.MigrateSlot(t, slot, to, true)
	get("after it (MOVED)")
	if err := cl.Set(ctx, "{s1}b", "x", time.Minute).Err(); err != nil {
		t.Fatalf("SET after the move: %v", err)
	}
	if got := c.MasterOf(t, "{s1}a"); got != to {
		t.Fatalf("slot %d is on %s, want %s", slot, got.Addr, to.Addr)
	}
}

func isMaster(t *testing.T, c *testredis.Cluster, n *testredis.Node) bool {
	t.Helper()
	for _, cn := range c.Topology(t) {
		if cn.Addr == n.Addr {
			return cn.Master
		}
	}
	return false
}

// subscribedOn reports whether node has a subscriber on channel
// (PUBSUB CHANNELS is local to the node asked).
func subscribedOn(t *testing.T, n *testredis.Node, channel string) bool {
	t.Helper()
	c := n.Client()
	defer c.Close()
	chans, err := c.PubSubChannels(context.Background(), channel).Result()
	if err != nil {
		t.Fatalf("PUBSUB CHANNELS on %s: %v", n.Addr, err)
	}
	return len(chans) == 1
}

// waitAnswers waits until a SET through cl succeeds.
func waitAnswers(t *testing.T, cl redis.UniversalClient, key string, since time.Time) time.Duration {
	t.Helper()
	for cl.Set(context.Background(), key, "x", time.Minute).Err() != nil {
		if time.Since(since) > recoverWithin {
			t.Fatalf("the client did not answer within %s", recoverWithin)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(since)
}

// load SETs a key every 20ms and keeps what it saw: the failed calls,
// the slowest call, and the first success after a given moment.
type load struct {
	failed   atomic.Int64
	slowest  atomic.Int64 // nanoseconds
	lastOK   atomic.Int64 // unix nanoseconds of the last success
	lastFail atomic.Int64 // and of the last failure
	quit     chan struct{}
	done     chan struct{}
	timeouts []time.Duration
}

func startLoad(t *testing.T, cl redis.UniversalClient, key string) *load {
	l := &load{quit: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(l.done)
		for {
			select {
			case <-l.quit:
				return
			case <-time.After(20 * time.Millisecond):
			}
			// No deadline of its own: the client's timeout bounds it.
			t0 := time.Now()
			err := cl.Set(context.Background(), key, "x", time.Minute).Err()
			d := time.Since(t0)
			if int64(d) > l.slowest.Load() {
				l.slowest.Store(int64(d))
			}
			if err != nil {
				l.failed.Add(1)
				l.lastFail.Store(time.Now().UnixNano())
				if !FailoverError(err) {
					t.Errorf("a call during the failover failed with %v, which FailoverError does not recognize", err)
				}
				continue
			}
			l.lastOK.Store(time.Now().UnixNano())
		}
	}()
	return l
}

// waitRecovered waits until a call succeeds after one failed after
// start (the kill), and returns when, from start.
func (l *load) waitRecovered(t *testing.T, start time.Time) time.Duration {
	t.Helper()
	for {
		if ok, fail := l.lastOK.Load(), l.lastFail.Load(); fail > start.UnixNano() && ok > fail {
			return time.Duration(ok - start.UnixNano())
		}
		if time.Since(start) > recoverWithin {
			t.Fatalf("no call succeeded within %s of the kill (%d failed)", recoverWithin, l.failed.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (l *load) stop(t *testing.T) {
	t.Helper()
	close(l.quit)
	<-l.done
	if s := time.Duration(l.slowest.Load()); s > testTimeout+callSlack {
		t.Errorf("a call took %s with timeout %s: every call must be bounded by the timeout", s, testTimeout)
	}
}

// subscription is a PubSub whose messages are kept.
type subscription struct {
	channel string
	mu      sync.Mutex
	got     map[string]bool
}

func subscribe(t *testing.T, cl redis.UniversalClient, channel string) *subscription {
	t.Helper()
	ps := cl.Subscribe(context.Background(), channel)
	t.Cleanup(func() { ps.Close() })
	// Wait for the confirmation, so that what is published next is seen.
	if _, err := ps.Receive(context.Background()); err != nil {
		t.Fatalf("SUBSCRIBE %s: %v", channel, err)
	}
	s := &subscription{channel: channel, got: make(map[string]bool)}
	go func() {
		for m := range ps.Channel() {
			s.mu.Lock()
			s.got[m.Payload] = true
			s.mu.Unlock()
		}
	}()
	if err := cl.Publish(context.Background(), channel, "before").Err(); err != nil {
		t.Fatalf("PUBLISH: %v", err)
	}
	s.wait(t, "before", 5*time.Second)
	return s
}

func (s *subscription) has(payload string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.got[payload]
}

func (s *subscription) wait(t *testing.T, payload string, timeout time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(timeout); !s.has(payload); {
		if time.Now().After(deadline) {
			t.Fatalf("%q not received on %s within %s", payload, s.channel, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitAfter publishes a numbered message every 50ms until the
// subscription receives one, and returns how long after start the first
// received one was published.
func (s *subscription) waitAfter(t *testing.T, cl redis.UniversalClient, start time.Time) time.Duration {
	t.Helper()
	sent := map[string]time.Duration{}
	for i := 0; ; i++ {
		for p, at := range sent {
			if s.has(p) {
				return at
			}
		}
		if time.Since(start) > recoverWithin {
			t.Fatalf("the subscription received nothing published within %s of the kill", recoverWithin)
		}
		p := fmt.Sprintf("after-%d", i)
		at := time.Since(start)
		if cl.Publish(context.Background(), s.channel, p).Err() == nil {
			sent[p] = at
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// quiet drops go-redis's process-wide log (a line per failed dial
// during a failover); the store sends it to Caddy's log.
type quiet struct{}

func (quiet) Printf(context.Context, string, ...any) {}

// tlsFiles are a CA this process trusts as a system root (through
// SSL_CERT_FILE, read once when the roots are first loaded) and a server
// certificate it signed for 127.0.0.1.
var tlsFiles testredis.TLSFiles

func TestMain(m *testing.M) {
	redis.SetLogger(quiet{})
	dir, err := os.MkdirTemp("", "redisconn-tls")
	if err == nil {
		tlsFiles, err = testredis.WriteTLSFiles(dir)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "writing the test certificates:", err)
		os.Exit(1)
	}
	os.Setenv("SSL_CERT_FILE", tlsFiles.CA)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// tls connects over TLS, verifying the server's certificate against the
// system roots for the host dialled: 127.0.0.1 (in the certificate)
// works, localhost (not in it) is refused, and so is plain TCP.
func TestClientTLS(t *testing.T) {
	t.Parallel()
	n := testredis.StartTLS(t, tlsFiles)
	ctx := context.Background()
	// A TLS handshake under -race on a busy machine may take longer
	// than testTimeout: this test is about verification, not time.
	slow := caddy.Duration(5 * time.Second)
	cl := client(t, Config{Address: n.Addr, TLS: true, Timeout: slow})
	if err := cl.Set(ctx, "k", "v", time.Minute).Err(); err != nil {
		t.Fatalf("SET over TLS: %v", err)
	}
	if v, err := cl.Get(ctx, "k").Result(); err != nil || v != "v" {
		t.Fatalf("GET over TLS: %q %v", v, err)
	}
	other := client(t, Config{Address: "localhost:" + strconv.Itoa(n.Port), TLS: true, Timeout: slow})
	if err := other.Get(ctx, "k").Err(); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("TLS to a host the certificate does not name: %v, want a certificate error", err)
	}
	plain := client(t, Config{Address: n.Addr, Timeout: slow})
	if err := plain.Get(ctx, "k").Err(); err == nil {
		t.Fatal("plain TCP to a TLS server answered")
	}
}

// writes acknowledges numbered keys in pipelines of 50, a pause
// between pipelines, to count what a failover loses of the writes
// acknowledged (replication is asynchronous).
type writes struct {
	tag   string
	mu    sync.Mutex
	acked map[int]time.Time
	quit  chan struct{}
	done  chan struct{}
}

func startWrites(cl redis.UniversalClient, tag string, pause time.Duration) *writes {
	w := &writes{tag: tag, acked: make(map[int]time.Time), quit: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		ctx := context.Background()
		for i := 0; ; {
			select {
			case <-w.quit:
				return
			default:
			}
			p := cl.Pipeline()
			cmds := make([]*redis.StatusCmd, 50)
			for j := range cmds {
				cmds[j] = p.Set(ctx, w.key(i+j), i+j, time.Hour)
			}
			_, _ = p.Exec(ctx)
			now := time.Now()
			w.mu.Lock()
			for j, c := range cmds {
				if c.Err() == nil {
					w.acked[i+j] = now
				}
			}
			w.mu.Unlock()
			i += len(cmds)
			time.Sleep(pause)
		}
	}()
	return w
}

func (w *writes) key(i int) string { return fmt.Sprintf("{%s}w%d", w.tag, i) }

// lost stops the writer and reads back every write acknowledged before
// kill: it returns how many were acknowledged, how many of those within
// the last 100ms, and how many are missing now.
func (w *writes) lost(t *testing.T, cl redis.UniversalClient, kill time.Time) (acked, last100ms, lost int) {
	t.Helper()
	close(w.quit)
	<-w.done
	var idx []int
	for i, at := range w.acked {
		if at.Before(kill) {
			idx = append(idx, i)
			if kill.Sub(at) <= 100*time.Millisecond {
				last100ms++
			}
		}
	}
	ctx := context.Background()
	for len(idx) > 0 {
		n := min(len(idx), 500)
		keys := make([]string, n)
		for j, i := range idx[:n] {
			keys[j] = w.key(i)
		}
		vals, err := cl.MGet(ctx, keys...).Result()
		if err != nil {
			t.Fatalf("reading the writes back: %v", err)
		}
		for _, v := range vals {
			if v == nil {
				lost++
			}
		}
		acked += n
		idx = idx[n:]
	}
	return acked, last100ms, lost
}

// With passwords on the data nodes and on the sentinels, password and
// sentinel_password reach the right servers; a wrong sentinel_password
// gets nothing.
func TestClientSentinelPasswords(t *testing.T) {
	t.Parallel()
	s := testredis.StartSentinelWith(t, testredis.SentinelOptions{Password: "data-pw", SentinelPassword: "sentinel-pw"})
	good := Config{SentinelMaster: testredis.SentinelMaster, Sentinels: s.Addrs(), Password: "data-pw", SentinelPassword: "sentinel-pw"}
	basics(t, client(t, good))
	bad := good
	bad.SentinelPassword = "wrong"
	if err := client(t, bad).Set(context.Background(), "k", "v", 0).Err(); err == nil {
		t.Fatal("a wrong sentinel_password reached the master")
	}
	bad = good
	bad.Password = "wrong"
	if err := client(t, bad).Set(context.Background(), "k", "v", 0).Err(); err == nil {
		t.Fatal("a wrong password was accepted by the master")
	}
}

//go:build unix

package redisconn

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-affinity/caddy-affinity/internal/testredis"
)

// A hung server (SIGSTOP: connections open, no answer) costs a call the
// timeout, not more: a command, a pipeline, and a call whose context
// has a later deadline of its own. The 10s deadline would show a call
// that ignored the client's timeout.
func TestEveryCallBoundedByTimeout(t *testing.T) {
	t.Parallel()
	rd := testredis.Start(t)
	cl := client(t, Config{Address: rd.Addr})
	ctx := context.Background()
	if err := cl.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	resume := rd.Pause(t)
	defer resume()
	long, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for name, call := range map[string]func() error{
		"GET": func() error { return cl.Get(ctx, "k").Err() },
		"pipeline": func() error {
			p := cl.Pipeline()
			p.Get(ctx, "k")
			p.Set(ctx, "j", 1, 0)
			_, err := p.Exec(ctx)
			return err
		},
		"later deadline": func() error { return cl.Get(long, "k").Err() },
		// Its first call dials, says HELLO, then sends the command.
		"fresh client": func() error { return client(t, Config{Address: rd.Addr}).Get(ctx, "k").Err() },
	} {
		t0 := time.Now()
		err := call()
		took := time.Since(t0)
		t.Logf("%s against a hung server: %s (%v)", name, took.Round(time.Millisecond), err)
		if err == nil || !FailoverError(err) {
			t.Errorf("%s: error %v, want a timeout", name, err)
		}
		if took > testTimeout+callSlack {
			t.Errorf("%s took %s, want at most the timeout %s", name, took, testTimeout)
		}
	}
}

// boundedWhileHung freezes a Cluster master for less than the
// cluster-node-timeout (no failover) and checks that a command and a
// pipeline on its slot give up within the client's timeout, redirects
// and retries included.
func boundedWhileHung(t *testing.T, cl redis.UniversalClient, master *testredis.Node) {
	t.Helper()
	ctx := context.Background()
	resume := master.Pause(t)
	for name, call := range map[string]func() error{
		"cluster GET": func() error { return cl.Get(ctx, "{s1}a").Err() },
		"cluster pipeline": func() error {
			p := cl.Pipeline()
			p.Get(ctx, "{s1}a")
			p.Set(ctx, "{s1}b", 1, 0)
			_, err := p.Exec(ctx)
			return err
		},
	} {
		t0 := time.Now()
		err := call()
		took := time.Since(t0)
		t.Logf("%s against a hung master: %s (%v)", name, took.Round(time.Millisecond), err)
		if err == nil || took > testTimeout+callSlack {
			t.Errorf("%s: %v after %s, want a timeout within %s", name, err, took, testTimeout)
		}
	}
	resume()
	waitAnswers(t, cl, "{s1}a", time.Now())
}

// A master frozen (SIGSTOP: its connections open, no answer; what a
// master cut off from everyone looks like) past the failure detection:
// the sentinels promote the replica, every call meanwhile gives up
// within the timeout, the client finds the new master, and once the old
// master is back it becomes a replica; no acknowledged write of the
// client lands on it meanwhile (it would be lost).
func TestClientSentinelFrozenMaster(t *testing.T) {
	t.Parallel()
	s := testredis.StartSentinel(t)
	cl := client(t, Config{SentinelMaster: testredis.SentinelMaster, Sentinels: s.Addrs()})
	old := s.Master
	frozenMaster(t, "sentinel", cl, old, func() (time.Duration, func()) { return s.FreezeMaster(t) })
}

// The same in a Cluster.
func TestClientClusterFrozenMaster(t *testing.T) {
	t.Parallel()
	c := testredis.StartCluster(t)
	cl := client(t, Config{Cluster: c.Addrs()})
	master := c.MasterOf(t, "{s1}a")
	frozenMaster(t, "cluster", cl, master, func() (time.Duration, func()) {
		_, took, resume := c.FreezeMaster(t, master)
		return took, resume
	})
}

func frozenMaster(t *testing.T, topology string, cl redis.UniversalClient, old *testredis.Node, freeze func() (time.Duration, func())) {
	t.Helper()
	basics(t, cl)
	load := startLoad(t, cl, "{s1}a")
	start := time.Now()
	var promoted time.Duration
	var resume func()
	frozen := make(chan struct{})
	go func() { defer close(frozen); promoted, resume = freeze() }()
	recovered := load.waitRecovered(t, start)
	<-frozen
	if resume == nil {
		t.Fatal("the frozen master was not replaced")
	}
	w := startWrites(cl, "s1", 10*time.Millisecond)
	resume()
	back := testredis.WaitReplica(t, old)
	acked, _, lost := w.lost(t, cl, time.Now())
	load.stop(t)
	t.Logf("%s, master frozen: promoted after %s, SET answers again after %s; %d calls failed meanwhile, the slowest took %s; the old master resumed is a synced replica %s later; of %d writes acknowledged meanwhile %d lost",
		topology, promoted.Round(time.Millisecond), recovered.Round(time.Millisecond), load.failed.Load(),
		time.Duration(load.slowest.Load()).Round(time.Millisecond), back.Round(time.Millisecond), acked, lost)
	if lost > 0 {
		t.Errorf("%d acknowledged writes lost: the client wrote to the old master", lost)
	}
}

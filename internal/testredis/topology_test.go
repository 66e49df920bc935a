package testredis

import (
	"context"
	"testing"
	"time"
)

// The Cluster forms, MasterOf names the node that holds a key (a write
// through it works, through another node is MOVED), and KillMaster
// promotes that master's replica, which then holds the key.
func TestClusterBringUpAndFailover(t *testing.T) {
	t.Parallel()
	c := StartCluster(t)
	t.Logf("cluster bring-up: %s", c.BringUp.Round(time.Millisecond))
	masters := 0
	for _, cn := range c.Topology(t) {
		if cn.Master {
			masters++
		}
	}
	if masters != 3 {
		t.Fatalf("%d masters, want 3", masters)
	}
	const key = "{affinity}k"
	m := c.MasterOf(t, key)
	if _, err := m.do("SET", key, "v"); err != nil {
		t.Fatalf("SET on the slot's master %s: %v", m.Addr, err)
	}
	for _, n := range c.Nodes {
		if n == m {
			continue
		}
		if _, err := n.do("SET", key, "v"); err == nil {
			if role, _ := n.role(); role == "master" {
				t.Fatalf("SET on master %s that does not hold the slot succeeded; want MOVED", n.Addr)
			}
		}
	}
	r := c.ReplicaOf(t, m)
	waitUntil(t, 5*time.Second, "the replica has the key", func() error {
		// A replica answers reads after READONLY, on that connection.
		cl := r.Client()
		defer cl.Close()
		ctx := context.Background()
		p := cl.Pipeline()
		p.Do(ctx, "READONLY")
		get := p.Get(ctx, key)
		_, _ = p.Exec(ctx)
		return get.Err()
	})
	promoted, took := c.KillMaster(t, m)
	t.Logf("cluster failover (kill -> replica master, cluster_state ok): %s", took.Round(time.Millisecond))
	if promoted != r {
		t.Fatalf("promoted %s, want the replica %s", promoted.Addr, r.Addr)
	}
	if got := c.MasterOf(t, key); got != r {
		t.Fatalf("after the failover %s holds the key, want %s", got.Addr, r.Addr)
	}
	if v, err := r.do("GET", key); err != nil || v != "v" {
		t.Fatalf("GET on the promoted replica: %v, %v", v, err)
	}
}

// The Sentinel setup comes up, the sentinels name the master, and
// KillMaster makes them promote the replica, which keeps the data.
func TestSentinelBringUpAndFailover(t *testing.T) {
	t.Parallel()
	s := StartSentinel(t)
	t.Logf("sentinel bring-up: %s", s.BringUp.Round(time.Millisecond))
	if got := s.MasterAddr(t); got != s.Master.Addr {
		t.Fatalf("sentinels name %s, want %s", got, s.Master.Addr)
	}
	if _, err := s.Master.do("SET", "k", "v"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "the replica has the key", func() error {
		_, err := s.Replica.do("GET", "k")
		return err
	})
	old := s.Master
	took := s.KillMaster(t)
	t.Logf("sentinel failover (kill -> replica master, every sentinel names it): %s", took.Round(time.Millisecond))
	if s.Master == old || s.MasterAddr(t) != s.Master.Addr {
		t.Fatalf("after the failover the sentinels name %s; the master is %s", s.MasterAddr(t), s.Master.Addr)
	}
	if v, err := s.Master.do("GET", "k"); err != nil || v != "v" {
		t.Fatalf("GET on the new master: %v, %v", v, err)
	}
}

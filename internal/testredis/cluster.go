package testredis

import (
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Cluster is a Redis Cluster of 3 masters and 3 replicas on loopback
// ports, formed by `redis-cli --cluster create --cluster-replicas 1`,
// with cluster-node-timeout 1000 (a dead master's replica takes over in
// about 2.5s). Which replica serves which master differs each run: ask
// MasterOf and ReplicaOf, never assume.
type Cluster struct {
	// Nodes are the six nodes, in the order given to redis-cli.
	Nodes []*Node
	// BringUp is how long StartCluster took, from the first process
	// start to every node reporting cluster_state:ok with its replica
	// in sync.
	BringUp time.Duration
}

// ClusterNodeTimeout is the cluster-node-timeout of a test Cluster.
const ClusterNodeTimeout = time.Second

// StartCluster starts and forms a Cluster, or skips the test when the
// machine has no redis-server or redis-cli. The nodes are SIGKILLed when
// the test ends.
func StartCluster(t testing.TB) *Cluster {
	t.Helper()
	bin := redisBin(t, "redis-server")
	cli := redisBin(t, "redis-cli")
	dir := t.TempDir()
	start := time.Now()
	// Six ports and six cluster bus ports: the bus port defaults to
	// port+10000, which may be taken, so it is chosen too.
	ports := freePorts(t, 12)
	c := &Cluster{}
	for i := range 6 {
		port, bus := ports[i], ports[6+i]
		args := append(baseArgs(dir, port),
			"--cluster-enabled", "yes",
			"--cluster-config-file", "nodes-"+strconv.Itoa(port)+".conf",
			"--cluster-node-timeout", strconv.Itoa(int(ClusterNodeTimeout/time.Millisecond)),
			"--cluster-port", strconv.Itoa(bus))
		c.Nodes = append(c.Nodes, startNode(t, bin, dir, port, args...))
	}
	for _, n := range c.Nodes {
		waitUntil(t, bringUpTimeout, n.Addr+" answers", n.ping, n)
	}
	addrs := c.Addrs()
	ctx, cancel := context.WithTimeout(context.Background(), bringUpTimeout)
	defer cancel()
	create := exec.CommandContext(ctx, cli, append(append([]string{"--cluster", "create"}, addrs...),
		"--cluster-replicas", "1", "--cluster-yes")...)
	if out, err := create.CombinedOutput(); err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	waitUntil(t, bringUpTimeout, "every node sees the cluster ok, every replica in sync", c.formed, c.Nodes...)
	for _, n := range c.Nodes {
		id, err := n.do("CLUSTER", "MYID")
		if err != nil {
			t.Fatalf("CLUSTER MYID on %s: %v", n.Addr, err)
		}
		n.ID, _ = id.(string)
	}
	c.BringUp = time.Since(start)
	return c
}

// Addrs returns the addresses of all six nodes (seeds for a client).
func (c *Cluster) Addrs() []string {
	addrs := make([]string, len(c.Nodes))
	for i, n := range c.Nodes {
		addrs[i] = n.Addr
	}
	return addrs
}

// formed checks that every live node reports cluster_state:ok and knows
// all six nodes, and that every replica's link to its master is up.
func (c *Cluster) formed() error {
	if err := c.allOK(true); err != nil {
		return err
	}
	for _, n := range c.Nodes {
		if !n.up() {
			continue
		}
		role, err := n.role()
		if err != nil {
			return err
		}
		if role == "slave" {
			if err := n.replicaSynced(); err != nil {
				return err
			}
		}
	}
	return nil
}

// allOK checks that every live node reports cluster_state:ok (and, if
// all6, knows all six nodes).
func (c *Cluster) allOK(all6 bool) error {
	for _, n := range c.Nodes {
		if !n.up() {
			continue
		}
		ci, err := n.info("CLUSTER", "INFO")
		if err != nil {
			return err
		}
		if ci["cluster_state"] != "ok" || (all6 && ci["cluster_known_nodes"] != "6") {
			return fmt.Errorf("%s: cluster_state %s, known nodes %s", n.Addr, ci["cluster_state"], ci["cluster_known_nodes"])
		}
	}
	return nil
}

// ClusterNode is one line of CLUSTER NODES.
type ClusterNode struct {
	ID, Addr string
	Master   bool
	// MasterID is the master's ID of a replica.
	MasterID string
	// Failed: flagged fail (or fail?, pfail, by the node asked).
	Failed bool
	// Slots are the slot ranges of a master, inclusive.
	Slots [][2]int
}

// Topology reads CLUSTER NODES from a live node.
func (c *Cluster) Topology(t testing.TB) []ClusterNode {
	t.Helper()
	var lastErr error
	for _, n := range c.Nodes {
		if !n.up() {
			continue
		}
		v, err := n.do("CLUSTER", "NODES")
		if err != nil {
			lastErr = err
			continue
		}
		s, _ := v.(string)
		return parseClusterNodes(s)
	}
	t.Fatalf("no live node answers CLUSTER NODES: %v", lastErr)
	return nil
}

func parseClusterNodes(s string) []ClusterNode {
	var out []ClusterNode
	for _, line := range strings.Split(strings.TrimSpace(s), "\n") {
		f := strings.Fields(line)
		if len(f) < 8 {
			continue
		}
		addr, _, _ := strings.Cut(f[1], "@")
		cn := ClusterNode{ID: f[0], Addr: addr}
		for _, flag := range strings.Split(f[2], ",") {
			switch flag {
			case "master":
				cn.Master = true
			case "fail", "fail?":
				cn.Failed = true
			}
		}
		if f[3] != "-" {
			cn.MasterID = f[3]
		}
		for _, r := range f[8:] {
			if strings.HasPrefix(r, "[") {
				continue // a slot being migrated
			}
			lo, hi, ok := strings.Cut(r, "-")
			if !ok {
				hi = lo
			}
			a, err1 := strconv.Atoi(lo)
			b, err2 := strconv.Atoi(hi)
			if err1 == nil && err2 == nil {
				cn.Slots = append(cn.Slots, [2]int{a, b})
			}
		}
		out = append(out, cn)
	}
	return out
}

// node returns the Node listening at addr.
func (c *Cluster) node(t testing.TB, addr string) *Node {
	t.Helper()
	for _, n := range c.Nodes {
		if n.Addr == addr {
			return n
		}
	}
	t.Fatalf("no node of the cluster listens at %s", addr)
	return nil
}

// Slot returns the hash slot of key (CLUSTER KEYSLOT).
func (c *Cluster) Slot(t testing.TB, key string) int {
	t.Helper()
	for _, n := range c.Nodes {
		if !n.up() {
			continue
		}
		v, err := n.do("CLUSTER", "KEYSLOT", key)
		if err == nil {
			return int(v.(int64))
		}
	}
	t.Fatalf("no live node answers CLUSTER KEYSLOT")
	return 0
}

// MasterOfSlot returns the live master that serves slot now.
func (c *Cluster) MasterOfSlot(t testing.TB, slot int) *Node {
	t.Helper()
	for _, cn := range c.Topology(t) {
		if !cn.Master || cn.Failed {
			continue
		}
		for _, r := range cn.Slots {
			if r[0] <= slot && slot <= r[1] {
				return c.node(t, cn.Addr)
			}
		}
	}
	t.Fatalf("no live master serves slot %d", slot)
	return nil
}

// MasterOf returns the live master that holds key now.
func (c *Cluster) MasterOf(t testing.TB, key string) *Node {
	t.Helper()
	return c.MasterOfSlot(t, c.Slot(t, key))
}

// ReplicaOf returns the replica of master.
func (c *Cluster) ReplicaOf(t testing.TB, master *Node) *Node {
	t.Helper()
	for _, cn := range c.Topology(t) {
		if cn.MasterID == master.ID && !cn.Failed {
			return c.node(t, cn.Addr)
		}
	}
	t.Fatalf("master %s has no live replica", master.Addr)
	return nil
}

// KillMaster SIGKILLs master and waits until its replica has taken over:
// the replica says it is a master and every live node reports
// cluster_state:ok again. It returns the promoted replica and how long
// that took from the kill.
func (c *Cluster) KillMaster(t testing.TB, master *Node) (promoted *Node, took time.Duration) {
	t.Helper()
	return c.failover(t, master, master.Kill)
}

func (c *Cluster) failover(t testing.TB, master *Node, fail func()) (*Node, time.Duration) {
	t.Helper()
	replica := c.ReplicaOf(t, master)
	start := time.Now()
	fail()
	waitUntil(t, bringUpTimeout, "the replica "+replica.Addr+" of "+master.Addr+" takes over", func() error {
		if role, err := replica.role(); err != nil || role != "master" {
			return fmt.Errorf("%s: role %q (%v)", replica.Addr, role, err)
		}
		return c.allOK(false)
	}, replica)
	return replica, time.Since(start)
}

// MigrateSlot moves slot's keys from the master that holds it to master
// to, as `redis-cli --cluster reshard` does (SETSLOT IMPORTING and
// MIGRATING, MIGRATE the keys), and stops there when finish is false: a
// client then meets ASK for a migrated key. With finish, the slot is
// assigned to `to` on every node: a client with the old slot map meets
// MOVED.
func (c *Cluster) MigrateSlot(t testing.TB, slot int, to *Node, finish bool) {
	t.Helper()
	from := c.MasterOfSlot(t, slot)
	if from == to {
		t.Fatalf("slot %d is on %s already", slot, to.Addr)
	}
	must := func(n *Node, args ...any) any {
		t.Helper()
		v, err := n.do(args...)
		if err != nil {
			t.Fatalf("%v on %s: %v", args, n.Addr, err)
		}
		return v
	}
	must(to, "CLUSTER", "SETSLOT", slot, "IMPORTING", from.ID)
	must(from, "CLUSTER", "SETSLOT", slot, "MIGRATING", to.ID)
	for {
		keys, _ := must(from, "CLUSTER", "GETKEYSINSLOT", slot, 100).([]any)
		if len(keys) == 0 {
			break
		}
		args := []any{"MIGRATE", "127.0.0.1", to.Port, "", 0, 5000, "KEYS"}
		must(from, append(args, keys...)...)
	}
	if !finish {
		return
	}
	for _, n := range []*Node{to, from} {
		must(n, "CLUSTER", "SETSLOT", slot, "NODE", to.ID)
	}
	for _, n := range c.Nodes {
		if n != to && n != from && n.up() {
			if role, _ := n.role(); role == "master" {
				must(n, "CLUSTER", "SETSLOT", slot, "NODE", to.ID)
			}
		}
	}
}

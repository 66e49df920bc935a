package testredis

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// SentinelMaster is the master name the sentinels of a Sentinel setup
// monitor.
const SentinelMaster = "testmaster"

// SentinelDownAfter is the down-after-milliseconds of a test Sentinel
// setup: a dead master is replaced in about 2.4s.
const SentinelDownAfter = time.Second

// Sentinel is a Redis master, its replica and 3 sentinels (quorum 2)
// that promote the replica when the master dies.
type Sentinel struct {
	// Master and Replica are the data nodes as started; after a failover
	// Replica is the master (see KillMaster).
	Master, Replica *Node
	// Sentinels are the three sentinels.
	Sentinels []*Node
	// BringUp is how long StartSentinel took, from the first process
	// start to every sentinel knowing the replica and the two other
	// sentinels.
	BringUp time.Duration
}

// SentinelOptions are the passwords of a Sentinel setup.
type SentinelOptions struct {
	// Password is the master's and the replica's requirepass (the
	// replica's masterauth and the sentinels' auth-pass too).
	Password string
	// SentinelPassword is the sentinels' requirepass.
	SentinelPassword string
}

// StartSentinel starts a Sentinel setup, or skips the test when the
// machine has no redis-server. The processes are SIGKILLed when the test
// ends.
func StartSentinel(t testing.TB) *Sentinel {
	t.Helper()
	return StartSentinelWith(t, SentinelOptions{})
}

// StartSentinelWith starts a Sentinel setup with passwords.
func StartSentinelWith(t testing.TB, o SentinelOptions) *Sentinel {
	t.Helper()
	bin := redisBin(t, "redis-server")
	dir := t.TempDir()
	start := time.Now()
	ports := freePorts(t, 5)
	s := &Sentinel{}
	var auth []string
	if o.Password != "" {
		auth = []string{"--requirepass", o.Password, "--masterauth", o.Password}
	}
	s.Master = startNode(t, bin, dir, ports[0], append(baseArgs(dir, ports[0]), auth...)...)
	s.Master.password = o.Password
	waitUntil(t, bringUpTimeout, "the master answers", s.Master.ping, s.Master)
	s.Replica = startNode(t, bin, dir, ports[1],
		append(append(baseArgs(dir, ports[1]), auth...), "--replicaof", "127.0.0.1", strconv.Itoa(ports[0]))...)
	s.Replica.password = o.Password
	waitUntil(t, bringUpTimeout, "the replica syncs", s.Replica.replicaSynced, s.Replica, s.Master)
	// Each sentinel rewrites its config file (what it learns of the
	// others, the epochs): each gets a writable file of its own.
	for _, port := range ports[2:] {
		conf := filepath.Join(dir, "sentinel-"+strconv.Itoa(port)+".conf")
		text := fmt.Sprintf(`port %d
bind 127.0.0.1
dir %s
logfile %s
sentinel monitor %s 127.0.0.1 %d 2
sentinel down-after-milliseconds %s %d
sentinel failover-timeout %s 10000
sentinel parallel-syncs %s 1
`, port, dir, filepath.Join(dir, "redis-"+strconv.Itoa(port)+".log"),
			SentinelMaster, ports[0], SentinelMaster, SentinelDownAfter/time.Millisecond, SentinelMaster, SentinelMaster)
		if o.Password != "" {
			text += fmt.Sprintf("sentinel auth-pass %s %s\n", SentinelMaster, o.Password)
		}
		if o.SentinelPassword != "" {
			text += fmt.Sprintf("requirepass %s\n", o.SentinelPassword)
		}
		if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		sn := startNode(t, bin, dir, port, conf, "--sentinel")
		sn.password = o.SentinelPassword
		s.Sentinels = append(s.Sentinels, sn)
	}
	for _, sn := range s.Sentinels {
		waitUntil(t, bringUpTimeout, "sentinel "+sn.Addr+" knows the replica and the other sentinels", func() error {
			m, err := sentinelMasterInfo(sn)
			if err != nil {
				return err
			}
			if m["num-slaves"] != "1" || m["num-other-sentinels"] != "2" {
				return fmt.Errorf("%s: %d replicas, %s other sentinels", sn.Addr, atoi(m["num-slaves"]), m["num-other-sentinels"])
			}
			return nil
		}, sn)
	}
	s.BringUp = time.Since(start)
	return s
}

func atoi(s string) int { n, _ := strconv.Atoi(s); return n }

// sentinelMasterInfo returns SENTINEL MASTER's fields as a map.
func sentinelMasterInfo(sn *Node) (map[string]string, error) {
	v, err := sn.do("SENTINEL", "MASTER", SentinelMaster)
	if err != nil {
		return nil, err
	}
	m := make(map[string]string)
	switch r := v.(type) {
	case []any: // RESP2: a flat list of names and values
		for i := 0; i+1 < len(r); i += 2 {
			m[fmt.Sprint(r[i])] = fmt.Sprint(r[i+1])
		}
	case map[any]any: // RESP3
		for k, v := range r {
			m[fmt.Sprint(k)] = fmt.Sprint(v)
		}
	default:
		return nil, fmt.Errorf("SENTINEL MASTER: unexpected reply %T", v)
	}
	return m, nil
}

// Addrs returns the sentinels' addresses (what a client is given).
func (s *Sentinel) Addrs() []string {
	addrs := make([]string, len(s.Sentinels))
	for i, n := range s.Sentinels {
		addrs[i] = n.Addr
	}
	return addrs
}

// MasterAddr returns the master's address as the first live sentinel
// names it.
func (s *Sentinel) MasterAddr(t testing.TB) string {
	t.Helper()
	for _, sn := range s.Sentinels {
		if !sn.up() {
			continue
		}
		v, err := sn.do("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SentinelMaster)
		if a, ok := v.([]any); err == nil && ok && len(a) == 2 {
			return fmt.Sprintf("%v:%v", a[0], a[1])
		}
	}
	t.Fatal("no sentinel names the master")
	return ""
}

// KillMaster SIGKILLs the master and waits until the sentinels have
// promoted the replica: every live sentinel names it and it says it is a
// master. It swaps Master and Replica (Replica is then the dead one) and
// returns how long that took from the kill.
func (s *Sentinel) KillMaster(t testing.TB) time.Duration {
	t.Helper()
	return s.failover(t, s.Master.Kill)
}

// WaitReplica waits until n says it is a replica whose link to its
// master is up, and returns how long that took.
func WaitReplica(t testing.TB, n *Node) time.Duration {
	t.Helper()
	return waitUntil(t, bringUpTimeout, n.Addr+" becomes a synced replica", n.replicaSynced, n)
}

func (s *Sentinel) failover(t testing.TB, fail func()) time.Duration {
	t.Helper()
	old, next := s.Master, s.Replica
	start := time.Now()
	fail()
	waitUntil(t, bringUpTimeout, "the sentinels promote "+next.Addr, func() error {
		if role, err := next.role(); err != nil || role != "master" {
			return fmt.Errorf("%s: role %q (%v)", next.Addr, role, err)
		}
		for _, sn := range s.Sentinels {
			if !sn.up() {
				continue
			}
			v, err := sn.do("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SentinelMaster)
			if err != nil {
				return err
			}
			a, _ := v.([]any)
			if len(a) != 2 || fmt.Sprintf("%v:%v", a[0], a[1]) != next.Addr {
				return fmt.Errorf("sentinel %s names %v", sn.Addr, v)
			}
		}
		return nil
	}, append([]*Node{next}, s.Sentinels...)...)
	s.Master, s.Replica = next, old
	return time.Since(start)
}

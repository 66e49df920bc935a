package testredis

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Node is one redis-server process of a topology (a Cluster's node, a
// Sentinel setup's master, replica or sentinel).
type Node struct {
	// Addr is its address, 127.0.0.1:<port>.
	Addr string
	// Port is its port.
	Port int
	// ID is its cluster node ID (Cluster nodes only), read after the
	// cluster formed.
	ID string

	// password is what the helpers authenticate with (requirepass).
	password string
	// frozen: stopped by Pause, not resumed yet.
	frozen atomic.Bool

	cmd     *exec.Cmd
	logFile string
	exited  chan struct{}
}

// bringUpTimeout bounds every wait of a topology's bring-up and of a
// failover helper: far above what they take on a loaded 2-core machine
// (see docs/redis-ha.md), so that only a broken topology hits it.
const bringUpTimeout = 30 * time.Second

// redisBin returns the path of redis-server, or skips the test loudly.
func redisBin(t testing.TB, name string) string {
	t.Helper()
	bin, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("!!! %s not found: the Redis topology tests are SKIPPED (apt-get install redis-server, as .ci/run does)", name)
	}
	return bin
}

// freePorts returns n distinct free loopback ports: all listeners are
// held until every port is chosen, so that none is handed out twice.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	ports := make([]int, n)
	lns := make([]net.Listener, n)
	for i := range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns[i] = ln
		ports[i] = ln.Addr().(*net.TCPAddr).Port
	}
	for _, ln := range lns {
		ln.Close()
	}
	return ports
}

// baseArgs are the options of every topology node: loopback only, no
// persistence, and a replica syncs at once (the default diskless sync
// waits 5s for more replicas to join).
func baseArgs(dir string, port int) []string {
	p := strconv.Itoa(port)
	return []string{
		"--port", p, "--bind", "127.0.0.1", "--dir", dir,
		"--save", "", "--appendonly", "no",
		"--repl-diskless-sync-delay", "0",
		"--logfile", filepath.Join(dir, "redis-"+p+".log"),
	}
}

// startNode starts redis-server with args (a config file first, if any)
// and stops it when the test ends. It does not wait for it to answer.
func startNode(t testing.TB, bin, dir string, port int, args ...string) *Node {
	t.Helper()
	n := &Node{
		Addr:    "127.0.0.1:" + strconv.Itoa(port),
		Port:    port,
		logFile: filepath.Join(dir, "redis-"+strconv.Itoa(port)+".log"),
		exited:  make(chan struct{}),
	}
	n.cmd = exec.Command(bin, args...)
	n.cmd.SysProcAttr = procAttr()
	if err := n.cmd.Start(); err != nil {
		t.Fatalf("starting %s on %s: %v", bin, n.Addr, err)
	}
	go func() {
		_ = n.cmd.Wait()
		close(n.exited)
	}()
	t.Cleanup(n.Kill)
	return n
}

// Kill SIGKILLs the node (as a crash would) and waits until it is gone.
// It may be called more than once.
func (n *Node) Kill() {
	if n.cmd == nil || n.cmd.Process == nil {
		return
	}
	_ = n.cmd.Process.Kill() // SIGKILL
	<-n.exited
}

// Alive reports whether the process still runs.
func (n *Node) Alive() bool {
	select {
	case <-n.exited:
		return false
	default:
		return true
	}
}

// up reports whether the node runs and is not frozen (Pause): whether
// the helpers may ask it something.
func (n *Node) up() bool { return n.Alive() && !n.frozen.Load() }

// Client returns a plain client of this one node; close it.
func (n *Node) Client() *redis.Client {
	return redis.NewClient(&redis.Options{
		Addr: n.Addr, Password: n.password, DisableIdentity: true, MaxRetries: -1,
		DialTimeout: time.Second, ReadTimeout: time.Second, WriteTimeout: time.Second,
	})
}

// logTail returns the last lines of the node's log, for a failure
// message.
func (n *Node) logTail() string {
	b, err := os.ReadFile(n.logFile)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return strings.Join(lines, "\n")
}

// do runs one command on the node with a short timeout.
func (n *Node) do(args ...any) (any, error) {
	c := n.Client()
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return c.Do(ctx, args...).Result()
}

// info returns the fields of an INFO section (or of CLUSTER INFO, which
// has the same form).
func (n *Node) info(args ...any) (map[string]string, error) {
	v, err := n.do(args...)
	if err != nil {
		return nil, err
	}
	s, ok := v.(string)
	if !ok {
		return nil, fmt.Errorf("%v: not a string: %T", args, v)
	}
	m := make(map[string]string)
	for _, line := range strings.Split(s, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), ":"); ok {
			m[k] = v
		}
	}
	return m, nil
}

// waitUntil polls cond every 20ms until it returns nil, and fails the
// test with its last error (and the logs of the nodes named) after
// timeout. It returns how long it took.
func waitUntil(t testing.TB, timeout time.Duration, what string, cond func() error, logs ...*Node) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		err := cond()
		if err == nil {
			return time.Since(start)
		}
		if time.Since(start) > timeout {
			var b strings.Builder
			for _, n := range logs {
				fmt.Fprintf(&b, "\n--- log of %s:\n%s", n.Addr, n.logTail())
			}
			t.Fatalf("after %s: %s: %v%s", timeout, what, err, b.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ping checks that the node answers.
func (n *Node) ping() error {
	_, err := n.do("PING")
	return err
}

// role returns the first word of ROLE: master, slave or sentinel.
func (n *Node) role() (string, error) {
	v, err := n.do("ROLE")
	if err != nil {
		return "", err
	}
	a, ok := v.([]any)
	if !ok || len(a) == 0 {
		return "", fmt.Errorf("ROLE: unexpected reply %v", v)
	}
	s, _ := a[0].(string)
	return s, nil
}

// replicaSynced checks that the node is a replica whose link to its
// master is up.
func (n *Node) replicaSynced() error {
	m, err := n.info("INFO", "replication")
	if err != nil {
		return err
	}
	if m["role"] != "slave" || m["master_link_status"] != "up" {
		return fmt.Errorf("%s: role %s, master link %q", n.Addr, m["role"], m["master_link_status"])
	}
	return nil
}

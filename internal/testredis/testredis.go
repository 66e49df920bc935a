// Package testredis runs a real redis-server for tests: on a free
// loopback port, with no persistence, stopped when the test ends. Both the
// unit tests of the session store and the integration tests use it.
package testredis

import (
	"context"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Server is one redis-server of a test.
type Server struct {
	// Addr is its address, 127.0.0.1:<port>.
	Addr string
	bin  string
	args []string
	cmd  *exec.Cmd
}

// Start starts a redis-server, or skips the test (loudly) when the
// machine has none: .ci/run installs Debian's redis-server package.
func Start(t testing.TB) *Server {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("!!! redis-server not found: the store redis tests are SKIPPED (apt-get install redis-server, as .ci/run does)")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	s := &Server{Addr: "127.0.0.1:" + port, bin: bin,
		args: []string{"--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"}}
	s.Run(t)
	t.Cleanup(s.Stop)
	return s
}

// Run starts the server (again after Stop: empty, it keeps nothing) and
// waits until it answers.
func (s *Server) Run(t testing.TB) {
	t.Helper()
	s.cmd = exec.Command(s.bin, s.args...)
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("starting redis-server: %v", err)
	}
	c := s.Client()
	defer c.Close()
	for deadline := time.Now().Add(10 * time.Second); c.Ping(context.Background()).Err() != nil; {
		if time.Now().After(deadline) {
			t.Fatalf("redis-server on %s did not answer within 10s", s.Addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop kills the server; its data goes with it.
func (s *Server) Stop() {
	if s.cmd != nil && s.cmd.Process != nil && s.cmd.ProcessState == nil {
		_ = s.cmd.Process.Kill()
		_ = s.cmd.Wait()
	}
}

// Signal sends sig to the server: SIGSTOP freezes it (it accepts
// connections and answers nothing), SIGCONT thaws it.
func (s *Server) Signal(sig os.Signal) error {
	if s.cmd == nil || s.cmd.Process == nil {
		return nil
	}
	return s.cmd.Process.Signal(sig)
}

// Client returns a client of the server; close it.
func (s *Server) Client() *redis.Client {
	return redis.NewClient(&redis.Options{Addr: s.Addr, DisableIdentity: true})
}

// Commands returns how many commands the server has run (INFO
// commandstats) but those of connections and tests (INFO, PING, CONFIG,
// CLIENT, HELLO, SUBSCRIBE, COMMAND), for counting commands per session.
func (s *Server) Commands(t testing.TB) int64 {
	t.Helper()
	c := s.Client()
	defer c.Close()
	info, err := c.Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatalf("INFO commandstats: %v", err)
	}
	var n int64
	for _, line := range strings.Split(info, "\n") {
		name, rest, ok := strings.Cut(strings.TrimSpace(line), ":calls=")
		if !ok {
			continue
		}
		switch strings.TrimPrefix(name, "cmdstat_") {
		case "info", "ping", "config", "config|resetstat", "client", "client|setinfo", "hello", "subscribe", "command", "command|docs":
		default:
			calls, _, _ := strings.Cut(rest, ",")
			v, err := strconv.ParseInt(calls, 10, 64)
			if err != nil {
				t.Fatalf("INFO commandstats: %q: %v", line, err)
			}
			n += v
		}
	}
	return n
}

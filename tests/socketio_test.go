package tests

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The README's Socket.IO recipe against the real thing: three processes
// of npm's socket.io server (tests/testdata/socketio/server.js), each
// holding its Engine.IO sessions and a per-connection counter in memory,
// behind the real Caddy binary with the recipe's Caddyfile, and real
// socket.io-client connections on long-polling only
// (tests/testdata/socketio/client.js). Long-polling is the transport that
// needs affinity: every request of one Engine.IO session (the handshake,
// then GETs and POSTs carrying ?sid=) must reach the process that holds
// it, or the server answers 400 "Session ID unknown".
//
// Needs node and npm; `npm ci` runs once when node_modules is missing.

const (
	socketIOClients = 30
	socketIOEmits   = 5
)

// socketIOPolicy is the recipe's policy block (README, Recipes).
const socketIOPolicy = `lb_policy affinity {
			key query sid
			session_ttl 2m
		}`

// socketIOReport is client.js's output.
type socketIOReport struct {
	Clients           int               `json:"clients"`
	Emits             int               `json:"emits"`
	Cookies           bool              `json:"cookies"`
	CleanClients      int               `json:"clean_clients"`
	FailedClients     int               `json:"failed_clients"`
	Acks              int               `json:"acks"`
	ConnectErrors     int               `json:"connect_errors"`
	Disconnects       int               `json:"disconnects"`
	ReconnectAttempts int               `json:"reconnect_attempts"`
	MixedServers      int               `json:"mixed_servers"`
	BadCounters       int               `json:"bad_counters"`
	ClientsPerServer  map[string]int    `json:"clients_per_server"`
	ElapsedMS         int               `json:"elapsed_ms"`
	FailedSamples     []json.RawMessage `json:"failed_samples"`
}

func (r socketIOReport) String() string {
	return fmt.Sprintf("clients=%d (cookies=%v) clean=%d failed=%d acks=%d/%d connect_errors=%d disconnects=%d reconnect_attempts=%d mixed_servers=%d bad_counters=%d clients_per_server=%v in %dms",
		r.Clients, r.Cookies, r.CleanClients, r.FailedClients, r.Acks, r.Clients*r.Emits,
		r.ConnectErrors, r.Disconnects, r.ReconnectAttempts, r.MixedServers, r.BadCounters,
		sortedMap(r.ClientsPerServer), r.ElapsedMS)
}

func TestSocketIOLongPolling(t *testing.T) {
	needCaddy(t)
	dir := socketIOApp(t)
	servers := startSocketIOServers(t, dir, 3)
	upstreams := make([]string, len(servers))
	for i, s := range servers {
		upstreams[i] = s.addr
	}

	t.Run("affinity", func(t *testing.T) {
		p := startCaddySite(t, "socketio-affinity", socketIOSite(upstreams, socketIOPolicy))
		r := runSocketIOClients(t, dir, p.URL, socketIOClients, socketIOEmits, true)
		t.Logf("affinity, key query sid, pin cookie: %s", r)
		logSocketIOServers(t, servers)
		if r.CleanClients != r.Clients || r.Acks != r.Clients*r.Emits || r.ConnectErrors != 0 ||
			r.Disconnects != 0 || r.ReconnectAttempts != 0 || r.MixedServers != 0 || r.BadCounters != 0 {
			t.Errorf("want every client clean (all %d acks from its one server, no error, disconnect or reconnection); failed samples: %s",
				r.Clients*r.Emits, samples(r))
		}
		if len(r.ClientsPerServer) < 2 {
			t.Errorf("all clients on %v: the run does not show placement across servers", r.ClientsPerServer)
		}
		// Every Engine.IO session is in the table by its sid (the
		// handshake itself carries none): one live session each.
		var sessions int64
		for _, u := range p.affinity(t) {
			sessions += u.Sessions
		}
		t.Logf("live sessions counted by the policy: %d", sessions)
		if sessions != int64(r.Clients) {
			t.Errorf("the policy counts %d live sessions, want %d (one per sid)", sessions, r.Clients)
		}
	})

	// The controls: the same clients fail without affinity, and fail with
	// the recipe when they keep no cookies (the pin cookie is what makes
	// the handshake's follow-ups stick: the sid is in the handshake's
	// response body, which the policy never sees).
	t.Run("round_robin fails", func(t *testing.T) {
		p := startCaddySite(t, "socketio-rr", socketIOSite(upstreams, "lb_policy round_robin"))
		r := runSocketIOClients(t, dir, p.URL, socketIOClients, socketIOEmits, true)
		t.Logf("round_robin: %s", r)
		logSocketIOServers(t, servers)
		if r.FailedClients == 0 {
			t.Errorf("round_robin: no client failed, so the affinity run proves nothing")
		}
	})
	t.Run("affinity without cookies fails", func(t *testing.T) {
		p := startCaddySite(t, "socketio-nocookies", socketIOSite(upstreams, socketIOPolicy))
		r := runSocketIOClients(t, dir, p.URL, socketIOClients, socketIOEmits, false)
		t.Logf("affinity, clients without cookies: %s", r)
		logSocketIOServers(t, servers)
		if r.FailedClients == 0 {
			t.Errorf("clients without cookies: no client failed, yet the sid of a handshake is unknown to the policy")
		}
	})
}

func samples(r socketIOReport) string {
	parts := make([]string, len(r.FailedSamples))
	for i, s := range r.FailedSamples {
		parts[i] = string(s)
	}
	return "[" + strings.Join(parts, ", ") + "]"
}

// socketIOApp returns the folder of the node app, with its dependencies
// installed (npm ci, once), or skips the test when node or npm is
// missing.
func socketIOApp(t *testing.T) string {
	t.Helper()
	for _, tool := range []string{"node", "npm"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("!!! %s not found: the Socket.IO recipe test is SKIPPED. Install Node.js 18+ and npm (Debian: apt-get install nodejs npm).", tool)
		}
	}
	dir := filepath.Join(repoRoot, "tests", "testdata", "socketio")
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "socket.io", "package.json")); err == nil {
		return dir
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "npm", "ci", "--no-audit", "--no-fund", "--loglevel=error")
	cmd.Dir = dir
	start := time.Now()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("npm ci in %s: %v\n%s", dir, err, out)
	}
	t.Logf("npm ci in %s took %s", dir, time.Since(start).Round(time.Millisecond))
	return dir
}

// socketIOServer is one `node server.js` process.
type socketIOServer struct {
	name string
	addr string
}

// startSocketIOServers starts n servers named A, B, C... on free
// loopback ports. Each is stopped on cleanup (and exits by itself when
// its standard input, a pipe from this process, closes).
func startSocketIOServers(t *testing.T, dir string, n int) []*socketIOServer {
	t.Helper()
	out := make([]*socketIOServer, n)
	for i := range out {
		name := string(rune('A' + i))
		cmd := exec.Command("node", "server.js", name)
		cmd.Dir = dir
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		stderr := new(syncBuffer)
		cmd.Stderr = stderr
		if err := cmd.Start(); err != nil {
			t.Fatalf("starting socket.io server %s: %v", name, err)
		}
		exited := make(chan struct{})
		go func() {
			_ = cmd.Wait()
			close(exited)
		}()
		t.Cleanup(func() {
			stdin.Close()
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(5 * time.Second):
				_ = cmd.Process.Kill()
				<-exited
			}
			if t.Failed() && stderr.String() != "" {
				t.Logf("socket.io server %s stderr:\n%s", name, tailLines(stderr.String(), 40))
			}
		})
		addr := make(chan string, 1)
		go func() {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				if a, ok := strings.CutPrefix(sc.Text(), "listening "); ok {
					select {
					case addr <- a:
					default:
					}
				}
			}
		}()
		select {
		case a := <-addr:
			out[i] = &socketIOServer{name: name, addr: a}
		case <-exited:
			t.Fatalf("socket.io server %s exited before listening: %s", name, stderr.String())
		case <-time.After(15 * time.Second):
			t.Fatalf("socket.io server %s did not listen within 15s: %s", name, stderr.String())
		}
	}
	return out
}

// logSocketIOServers logs each server's figures (connections, acks and
// Engine.IO's connection errors such as "Session ID unknown"),
// cumulative over the test.
func logSocketIOServers(t *testing.T, servers []*socketIOServer) {
	t.Helper()
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	for _, s := range servers {
		resp, err := hc.Get("http://" + s.addr + "/stats")
		if err != nil {
			t.Errorf("stats of socket.io server %s: %v", s.name, err)
			continue
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		resp.Body.Close()
		t.Logf("server %s (%s), since the start: %s", s.name, s.addr, strings.TrimSpace(string(body)))
	}
}

// runSocketIOClients runs client.js against base and returns its report.
func runSocketIOClients(t *testing.T, dir, base string, clients, emits int, cookies bool) socketIOReport {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	yes := "no"
	if cookies {
		yes = "yes"
	}
	cmd := exec.CommandContext(ctx, "node", "client.js", base, fmt.Sprint(clients), fmt.Sprint(emits), yes)
	cmd.Dir = dir
	stderr := new(syncBuffer)
	cmd.Stderr = stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node client.js: %v\nstdout: %s\nstderr: %s", err, out, stderr.String())
	}
	var r socketIOReport
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("node client.js output: %v: %s", err, out)
	}
	if r.Clients != clients || r.Emits != emits {
		t.Fatalf("client.js ran %d clients x %d emits, want %d x %d", r.Clients, r.Emits, clients, emits)
	}
	return r
}

// socketIOSite renders the recipe's site: a reverse_proxy to the
// upstreams with the given lb_policy line or block, and nothing else the
// recipe does not have.
func socketIOSite(upstreams []string, lbPolicy string) func(sitePort, adminPort int, storage string) string {
	return func(sitePort, adminPort int, storage string) string {
		return globalOptions(adminPort, storage, "") + fmt.Sprintf(`
http://127.0.0.1:%d {
	bind 127.0.0.1
	reverse_proxy %s {
		%s
	}
}
`, sitePort, strings.Join(upstreams, " "), lbPolicy)
	}
}

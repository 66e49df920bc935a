package command

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

func TestResolveUpstream(t *testing.T) {
	ups := []upstreamStatus{{Upstream: "127.0.0.1:9001"}, {Upstream: "127.0.0.1:9002"}, {Upstream: "10.0.0.1:19002"}}
	for arg, want := range map[string]string{
		"127.0.0.1:9001": "127.0.0.1:9001",
		"9001":           "127.0.0.1:9001",
		":9001":          "127.0.0.1:9001",
		"0.0.1:9001":     "127.0.0.1:9001",
		"9002":           "127.0.0.1:9002", // not 19002: a port suffix is whole
		"19002":          "10.0.0.1:19002",
		"9003":           "9003", // unknown: passed on, the API says so
	} {
		if got := resolveUpstream(ups, arg); got != want {
			t.Errorf("%q resolved to %q, want %q", arg, got, want)
		}
	}
}

func TestPrintTable(t *testing.T) {
	since := "2030-01-01T00:00:00Z"
	var b bytes.Buffer
	now, _ := time.Parse(time.RFC3339, "2030-01-01T00:04:12Z")
	err := printTable(&b, []upstreamStatus{
		{Upstream: "127.0.0.1:9001", State: "up", Healthy: true, Sessions: 12, Requests: 340},
		{Upstream: "127.0.0.1:9002", State: "draining", SetBy: "operator", Healthy: false, Sessions: 0, Drained: true, Since: &since},
	}, now)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(b.String(), "\n"), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "UPSTREAM        STATE") {
		t.Fatalf("table:\n%s", b.String())
	}
	for _, want := range []string{"HEALTHY", "SESSIONS", "REQUESTS", "DRAINED", "SINCE"} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("header lacks %s: %s", want, lines[0])
		}
	}
	if f := strings.Fields(lines[1]); len(f) != 7 || f[1] != "up" || f[2] != "yes" || f[3] != "12" || f[4] != "340" || f[5] != "-" {
		t.Errorf("row 1: %q", lines[1])
	}
	if f := strings.Fields(lines[2]); f[1] != "draining" || f[2] != "(operator)" || f[3] != "NO" || f[6] != "yes" || !strings.Contains(lines[2], "(4m12s ago)") {
		t.Errorf("row 2: %q", lines[2])
	}
}

// TestAdminCallErrors checks that the API's own message comes through
// and that the Origin header Caddy checks is sent.
func TestAdminCallErrors(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Origin") != "http://"+r.Host {
			http.Error(w, `{"error":"bad origin `+r.Header.Get("Origin")+`"}`, http.StatusForbidden)
			return
		}
		switch r.URL.Path {
		case "/affinity/upstreams":
			_, _ = io.WriteString(w, `[{"upstream":"127.0.0.1:9001","state":"up","healthy":true}]`)
		case "/affinity/upstreams/state":
			var req map[string]string
			_ = json.NewDecoder(r.Body).Decode(&req)
			w.WriteHeader(http.StatusNotFound)
			_, _ = io.WriteString(w, `{"error":"unknown upstream \"`+req["upstream"]+`\""}`)
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	var out bytes.Buffer
	err := setState(context.Background(), &out, addr, "9009", healthcheck.States[healthcheck.Draining], 0)
	if err == nil || err.Error() != `unknown upstream "9009"` {
		t.Fatalf("unknown upstream: %v", err)
	}
	var v any
	if err := adminCall(context.Background(), addr, http.MethodGet, "/nope", nil, &v); err == nil || !strings.Contains(err.Error(), "no caddy-affinity admin API") {
		t.Fatalf("404 without JSON: %v", err)
	}
	if err := adminCall(context.Background(), "127.0.0.1:1", http.MethodGet, "/affinity/upstreams", nil, &v); err == nil || !strings.Contains(err.Error(), "is Caddy running") {
		t.Fatalf("nothing listening: %v", err)
	}
}

func TestDemoConfigLetsBrowsersIn(t *testing.T) {
	o := defaultDemoOptions()
	cfg, err := o.caddyfile(o.workerAddrs(), "/tmp/x")
	if err != nil {
		t.Fatal(err)
	}
	adapter := caddyfile.Adapter{ServerType: httpcaddyfile.ServerType{}}
	out, _, err := adapter.Adapt(cfg, map[string]any{"filename": "demo.Caddyfile"})
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		Admin struct {
			Listen  string   `json:"listen"`
			Origins []string `json:"origins"`
		} `json:"admin"`
	}
	if err := json.Unmarshal(out, &c); err != nil {
		t.Fatal(err)
	}
	want := []string{"127.0.0.1:2019", "localhost:2019", "[::1]:2019", ""}
	if c.Admin.Listen != "127.0.0.1:2019" || strings.Join(c.Admin.Origins, ",") != strings.Join(want, ",") {
		t.Fatalf("admin: %+v, want origins %q", c.Admin, want)
	}
	if got := statusURL("0.0.0.0:2019"); got != "http://localhost:2019/affinity/" {
		t.Errorf("status URL for a wildcard admin: %s", got)
	}
}

// drain --wait gives up with a clear error when the upstream leaves the
// list (removed from the config) instead of polling until Ctrl-C: before,
// an unlisted upstream matched none of the loop's cases, not even the
// deadline's.
func TestDrainWaitStopsWhenTheUpstreamIsNoLongerListed(t *testing.T) {
	var posted bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/affinity/upstreams":
			if posted {
				_, _ = io.WriteString(w, `[]`)
				return
			}
			_, _ = io.WriteString(w, `[{"upstream":"127.0.0.1:9001","state":"up","healthy":true,"sessions":3}]`)
		case "/affinity/upstreams/state":
			posted = true
			_, _ = io.WriteString(w, `{"upstream":"127.0.0.1:9001","state":"draining","set_by":"operator","healthy":true,"sessions":3}`)
		}
	}))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var out bytes.Buffer
	err := setState(ctx, &out, strings.TrimPrefix(srv.URL, "http://"), "9001", healthcheck.States[healthcheck.Draining], time.Hour)
	if err == nil || !strings.Contains(err.Error(), "no longer listed") {
		t.Fatalf("got %v, want an error saying the upstream is no longer listed", err)
	}
}

// TestStateCommandsFromTheTable: every lifecycle state, and one a test
// adds to healthcheck.States, is a subcommand named by its verb, with
// its help, and --wait where the state drains.
func TestStateCommandsFromTheTable(t *testing.T) {
	saved := healthcheck.States
	t.Cleanup(func() { healthcheck.States = saved })
	healthcheck.States = append(saved[:len(saved):len(saved)], healthcheck.StateInfo{
		State: healthcheck.State(len(saved)), Name: "quarantine", Verb: "quarantine", Is: "quarantined",
		Short: "Quarantines an upstream", Help: "Takes nothing, for a test.", KeepsPinned: true,
	})
	cmds := map[string]bool{}
	for _, build := range stateCommands() {
		cmd := build()
		verb := strings.Fields(cmd.Use)[0]
		cmds[verb] = true
		var st healthcheck.StateInfo
		for _, s := range healthcheck.States {
			if s.Verb == verb {
				st = s
			}
		}
		if cmd.Short != st.Short || !strings.Contains(cmd.Long, st.Help) {
			t.Errorf("%s: help is not its row's: %q", verb, cmd.Short)
		}
		if (cmd.Flags().Lookup("wait") != nil) != st.Drains() {
			t.Errorf("%s: --wait offered %v, the state drains %v", verb, cmd.Flags().Lookup("wait") != nil, st.Drains())
		}
	}
	for _, want := range []string{"drain", "maintenance", "up", "quarantine"} {
		if !cmds[want] {
			t.Errorf("no subcommand %s: %v", want, cmds)
		}
	}
	for u, want := range map[upstreamStatus]string{
		{Upstream: "u:1", State: "quarantine", Sessions: 2}:  "u:1 is now quarantined",
		{Upstream: "u:1", State: "draining", Sessions: 3}:    "u:1 is now draining: it keeps its 3 live sessions and takes no new ones",
		{Upstream: "u:1", State: "draining", Drained: true}:  "u:1 is now draining, and drained: it holds no session",
		{Upstream: "u:1", State: "maintenance", Sessions: 3}: "u:1 is now in maintenance: its sessions fail over on their next request",
		{Upstream: "u:1", State: "up"}:                       "u:1 is now up",
	} {
		if got := describeChange(u); got != want {
			t.Errorf("describeChange: %q, want %q", got, want)
		}
	}
}

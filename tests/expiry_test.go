package tests

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// expiryUpstream is the part of an /affinity/upstreams entry this test
// reads.
type expiryUpstream struct {
	Upstream   string  `json:"upstream"`
	State      string  `json:"state"`
	Configured bool    `json:"configured"`
	LastUsed   *string `json:"last_used"`
}

func expiryList(t *testing.T, p *caddyProc, query string) map[string]expiryUpstream {
	t.Helper()
	status, _, body, err := adminCall(http.MethodGet, p.Admin+"/affinity/upstreams"+query, "", nil)
	if err != nil || status != http.StatusOK {
		t.Fatalf("GET /affinity/upstreams%s: %d %v %s", query, status, err, body)
	}
	var list []expiryUpstream
	if err := json.Unmarshal(body, &list); err != nil {
		t.Fatalf("GET /affinity/upstreams%s: %v: %s", query, err, body)
	}
	m := make(map[string]expiryUpstream, len(list))
	for _, u := range list {
		m[u.Upstream] = u
	}
	return m
}

// A reload that drops an upstream: it leaves the list at once (still
// shown, configured:false, with ?all=1), and once the grace is over (3s
// here, 10 minutes in production, shortened through the test-only
// environment variables) it leaves ?all=1 and /metrics too, cannot be
// operated on any more, and its operator state is deleted from storage
// once its own grace (6s here, 24 hours in production) is over.
func TestDroppedUpstreamExpires(t *testing.T) {
	needCaddy(t)
	// Inherited by the Caddy process (isolatedEnv keeps the test's
	// environment). No parallel test runs while this one does.
	t.Setenv("CADDY_AFFINITY_TEST_FORGET_AFTER", "3s")
	t.Setenv("CADDY_AFFINITY_TEST_STATE_GRACE", "6s")
	bs := startBackends(t, 2)
	kept, dropped := bs[0].addr, bs[1].addr
	p := startCaddy(t, "expiry", proxyConfig{Upstreams: []string{kept, dropped}})
	storage := p.cfg.Storage

	got := expiryList(t, p, "")
	if !got[kept].Configured || !got[dropped].Configured {
		t.Fatalf("before the reload: %+v", got)
	}
	// An operator drains it before taking it out of the config: the
	// state is stored.
	p.setState(t, dropped, "draining")
	stateFile := filepath.Join(storage, "caddy-affinity", "states", url.QueryEscape(dropped))
	if _, err := os.Stat(stateFile); err != nil {
		t.Fatalf("the drain was not stored: %v", err)
	}

	p.reload(t, proxyConfig{Upstreams: []string{kept}})
	reloaded := time.Now()
	got = expiryList(t, p, "")
	if _, ok := got[dropped]; ok || !got[kept].Configured {
		t.Errorf("after the reload the list shows %+v, want only %s", got, kept)
	}
	all := expiryList(t, p, "?all=1")
	if u, ok := all[dropped]; !ok || u.Configured || u.LastUsed == nil || u.State != "draining" {
		t.Errorf("?all=1 after the reload: %+v (listed %v), want it draining, configured:false, last_used", u, ok)
	}
	label := fmt.Sprintf(`upstream=%q`, dropped)
	if _, ok := obsScrape(t, p).sum("caddy_affinity_upstream_state", label); !ok {
		t.Error("no state series for the dropped upstream within the grace")
	}

	waitUntil(t, "the dropped upstream is forgotten", 15*time.Second, 200*time.Millisecond, func() (bool, string) {
		u, ok := expiryList(t, p, "?all=1")[dropped]
		return !ok, fmt.Sprintf("%+v", u)
	})
	t.Logf("forgotten %s after the reload", time.Since(reloaded).Round(100*time.Millisecond))
	m := obsScrape(t, p)
	for _, name := range []string{"caddy_affinity_sessions", "caddy_affinity_upstream_state"} {
		if _, ok := m.sum(name, label); ok {
			t.Errorf("%s still has a series for the forgotten upstream", name)
		}
	}
	if _, ok := m.sum("caddy_affinity_upstream_state", fmt.Sprintf(`upstream=%q`, kept)); !ok {
		t.Error("the configured upstream lost its series")
	}
	body, _ := json.Marshal(map[string]string{"upstream": dropped, "state": "up"})
	if status, _, resp, err := adminCall(http.MethodPost, p.Admin+"/affinity/upstreams/state", "application/json", body); err != nil || status != http.StatusNotFound {
		t.Errorf("POST state on the forgotten upstream: %d %v %s, want 404", status, err, resp)
	}

	waitUntil(t, "the stored state is deleted", 20*time.Second, 200*time.Millisecond, func() (bool, string) {
		_, err := os.Stat(stateFile)
		return os.IsNotExist(err), fmt.Sprint(err)
	})
	t.Logf("state deleted %s after the reload", time.Since(reloaded).Round(100*time.Millisecond))

	// Added back: a new upstream at the address, in no inherited state.
	p.reload(t, proxyConfig{Upstreams: []string{kept, dropped}})
	if u, ok := expiryList(t, p, "")[dropped]; !ok || !u.Configured || u.State != "up" {
		t.Errorf("added back after the state grace: %+v (listed %v), want up", u, ok)
	}
}

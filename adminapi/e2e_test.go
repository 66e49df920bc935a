package adminapi

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"

	_ "github.com/caddyserver/caddy/v2/modules/filestorage"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// The admin module registered with Caddy serves its routes through a real
// Caddy admin endpoint, errors come out as {"error":"..."}, and a state
// set there is written to the config's storage through AcquireSyncer.
func TestAdminThroughCaddy(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	cfg := fmt.Sprintf(`{"admin":{"listen":%q,"config":{"persist":false}},"storage":{"module":"file_system","root":%q}}`, addr, dir)
	if err := caddy.Load([]byte(cfg), true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = caddy.Load([]byte(`{"admin":{"disabled":true}}`), true)
		_ = caddy.Stop()
	})
	release, err := healthcheck.AcquireSyncer(caddy.ActiveContext())
	if err != nil {
		t.Fatal(err)
	}
	defer release()

	const dial = "e2e-upstream.test:8080"
	healthcheck.Get(dial)
	client := &http.Client{Timeout: 5 * time.Second}
	do := func(method, path, body string) (int, string) {
		t.Helper()
		req, err := http.NewRequest(method, "http://"+addr+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}

	code, body := do("POST", StatePath, `{"upstream":"`+dial+`","state":"draining"}`)
	if code != 200 {
		t.Fatalf("POST: %d %s", code, body)
	}
	var st UpstreamStatus
	if err := json.Unmarshal([]byte(body), &st); err != nil || st.State != healthcheck.Draining || st.Sessions != 0 || !st.Drained {
		t.Fatalf("POST answered %s (%v)", body, err)
	}
	stored, err := (&certmagic.FileStorage{Path: dir}).Load(context.Background(), "caddy-affinity/states/"+url.QueryEscape(dial))
	if err != nil || !strings.Contains(string(stored), `"state":"draining"`) {
		t.Errorf("not written to the config's storage: %s %v", stored, err)
	}

	code, body = do("GET", UpstreamsPath, "")
	if code != 200 || !strings.Contains(body, `"upstream":"`+dial+`","state":"draining"`) {
		t.Errorf("GET: %d %s", code, body)
	}

	for _, tc := range []struct {
		method, path, body string
		code               int
		want               string
	}{
		{"POST", StatePath, `{"upstream":"` + dial + `","state":"sleeping"}`, 400, `{"error":"unknown state \"sleeping\": want one of up, draining, maintenance"}`},
		{"POST", StatePath, `{"upstream":"nowhere:1","state":"up"}`, 404, `{"error":"unknown upstream \"nowhere:1\"`},
		{"GET", StatePath, ``, 405, `{"error":"method GET not allowed on /affinity/upstreams/state: use POST"}`},
	} {
		code, body := do(tc.method, tc.path, tc.body)
		if code != tc.code || !strings.HasPrefix(strings.TrimSpace(body), tc.want) {
			t.Errorf("%s %s %s: %d %s, want %d %s", tc.method, tc.path, tc.body, code, body, tc.code, tc.want)
		}
	}
	_, _ = healthcheck.Operate(context.Background(), dial, healthcheck.Up)
}

package healthcheck

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// testInstance is one simulated Caddy instance: its own registry (the
// process-wide one in production) with observed logs.
type testInstance struct {
	name string
	reg  *registry
	logs *observer.ObservedLogs
	api  AdminAPI
}

func newInstance(t *testing.T, name string) *testInstance {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	logger := zap.New(core)
	reg := newRegistry(func() string { return name }, func() *zap.Logger { return logger })
	return &testInstance{name: name, reg: reg, logs: logs, api: AdminAPI{reg: reg}}
}

// serveAdmin calls an admin handler the way Caddy's admin server does,
// rendering a returned error as Caddy's handleError does (admin.go):
// status from caddy.APIError, body the APIError as JSON, whose Message
// (defaulting to Err.Error()) is the "error" field.
func serveAdmin(h caddy.AdminHandler, req *http.Request) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	err := h.ServeHTTP(rec, req)
	if err == nil {
		return rec
	}
	apiErr, ok := err.(caddy.APIError)
	if !ok {
		apiErr = caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
	}
	if apiErr.HTTPStatus == 0 {
		apiErr.HTTPStatus = http.StatusInternalServerError
	}
	if apiErr.Message == "" && apiErr.Err != nil {
		apiErr.Message = apiErr.Err.Error()
	}
	rec.Header().Set("Content-Type", "application/json")
	rec.WriteHeader(apiErr.HTTPStatus)
	_ = json.NewEncoder(rec).Encode(apiErr)
	return rec
}

// route returns the admin handler for a pattern.
func (in *testInstance) route(t *testing.T, pattern string) caddy.AdminHandler {
	t.Helper()
	for _, r := range in.api.Routes() {
		if r.Pattern == pattern {
			return r.Handler
		}
	}
	t.Fatalf("no admin route %s", pattern)
	return nil
}

func (in *testInstance) post(t *testing.T, body string) *httptest.ResponseRecorder {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, statePath, strings.NewReader(body))
	return serveAdmin(in.route(t, statePath), req)
}

func (in *testInstance) list(t *testing.T) []UpstreamStatus {
	t.Helper()
	rec := serveAdmin(in.route(t, upstreamsPath), httptest.NewRequest(http.MethodGet, upstreamsPath, nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("GET %s: %d %s", upstreamsPath, rec.Code, rec.Body)
	}
	var out []UpstreamStatus
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil {
		t.Fatalf("GET %s: %v in %s", upstreamsPath, err, rec.Body)
	}
	return out
}

// stateChanges returns the logged state changes for an upstream.
func (in *testInstance) stateChanges(dial string) []map[string]any {
	var out []map[string]any
	for _, e := range in.logs.FilterMessageSnippet("upstream state").All() {
		m := e.ContextMap()
		if m["upstream"] == dial {
			out = append(out, m)
		}
	}
	return out
}

// waitFor polls cond every 5ms until it holds or timeout passes, and
// returns how long it took.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("after %s: %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

// decodeError returns the "error" of a JSON error body, failing if the
// body is not exactly such an object.
func decodeError(t *testing.T, rec *httptest.ResponseRecorder) string {
	t.Helper()
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	var m map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &m); err != nil {
		t.Fatalf("error body %q is not JSON: %v", rec.Body, err)
	}
	msg, ok := m["error"].(string)
	if !ok || msg == "" || len(m) != 1 {
		t.Fatalf(`error body %s: want {"error":"..."}`, rec.Body)
	}
	return msg
}

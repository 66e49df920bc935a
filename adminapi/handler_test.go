package adminapi

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// serveSite calls the affinity_status handler as a site route would.
func serveSite(t *testing.T, method, target, body string, headers ...string) *httptest.ResponseRecorder {
	t.Helper()
	req := httptest.NewRequest(method, target, strings.NewReader(body))
	for i := 0; i+1 < len(headers); i += 2 {
		if headers[i] == "Host" {
			req.Host = headers[i+1]
			continue
		}
		req.Header.Set(headers[i], headers[i+1])
	}
	rec := httptest.NewRecorder()
	if err := (StatusHandler{}).ServeHTTP(rec, req, nil); err != nil {
		t.Fatalf("%s %s: ServeHTTP returned %v; it writes its errors itself", method, target, err)
	}
	return rec
}

func TestStatusHandlerEndpoints(t *testing.T) {
	// The page and its JSON at any prefix the route gives it.
	rec := serveSite(t, "GET", "/ops/affinity/", "", "Accept", "text/html")
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), "<html") {
		t.Fatalf("page: %d %.200s", rec.Code, rec.Body.String())
	}
	rec = serveSite(t, "GET", "/ops/affinity/", "")
	var st map[string]any
	if rec.Code != 200 || json.Unmarshal(rec.Body.Bytes(), &st) != nil || st["upstreams"] == nil {
		t.Fatalf("JSON: %d %.200s", rec.Code, rec.Body.String())
	}
	rec = serveSite(t, "GET", "/ops/affinity/upstreams", "")
	if rec.Code != 200 || !strings.HasPrefix(strings.TrimSpace(rec.Body.String()), "[") {
		t.Fatalf("upstreams: %d %.200s", rec.Code, rec.Body.String())
	}
	// Without the slash, the page's relative links would miss: redirect.
	rec = serveSite(t, "GET", "/ops/affinity?x=1", "")
	if rec.Code != http.StatusPermanentRedirect || rec.Header().Get("Location") != "/ops/affinity/?x=1" {
		t.Fatalf("no slash: %d %q", rec.Code, rec.Header().Get("Location"))
	}
	// Errors are the admin API's JSON, with its status.
	rec = serveSite(t, "GET", "/ops/affinity/upstreams/state", "")
	if rec.Code != http.StatusMethodNotAllowed || !strings.Contains(rec.Body.String(), `"error"`) {
		t.Fatalf("GET state: %d %s", rec.Code, rec.Body.String())
	}
}

func TestStatusHandlerStateChangesAreSameOrigin(t *testing.T) {
	body := `{"upstream":"198.51.100.7:1","state":"draining"}`
	refused := [][]string{
		{"Host", "ops.example.com", "Origin", "https://evil.example"},
		{"Host", "ops.example.com", "Origin", "https://ops.example.com.evil.example"},
		{"Host", "ops.example.com", "Sec-Fetch-Site", "cross-site"},
		{"Host", "ops.example.com", "Sec-Fetch-Site", "same-site", "Origin", "https://ops.example.com"},
		{"Host", "ops.example.com", "Origin", "null"},
	}
	for _, h := range refused {
		rec := serveSite(t, "POST", "/affinity/upstreams/state", body, h...)
		if rec.Code != http.StatusForbidden || !strings.Contains(rec.Body.String(), "refused") {
			t.Errorf("POST with %v: %d %s, want 403", h, rec.Code, rec.Body.String())
		}
	}
	// The page's own request, and curl (no Origin), reach the state
	// handler: it answers for the unknown upstream, not 403.
	for _, h := range [][]string{
		{"Host", "ops.example.com", "Origin", "https://ops.example.com", "Sec-Fetch-Site", "same-origin"},
		{"Host", "ops.example.com"},
	} {
		rec := serveSite(t, "POST", "/affinity/upstreams/state", body, h...)
		if rec.Code == http.StatusForbidden || rec.Code/100 == 2 {
			t.Errorf("POST with %v: %d %s, want the state handler's 404 for an unknown upstream", h, rec.Code, rec.Body.String())
		}
	}
}

func TestStatusHandlerCaddyfile(t *testing.T) {
	var h StatusHandler
	if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("affinity_status")); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"affinity_status /x", "affinity_status {\n\tfoo\n}"} {
		if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(bad)); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

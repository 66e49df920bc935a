package adminapi

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-affinity/caddy-affinity/affinity"
	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// serveAdmin calls an admin handler the way Caddy's admin server does,
// rendering a returned error as Caddy's handleError does (admin.go):
// status from caddy.APIError, body the APIError as JSON, whose Message
// (defaulting to Err.Error()) is the "error" field.
func serveAdmin(t *testing.T, method, path, body string) *httptest.ResponseRecorder {
	t.Helper()
	var h caddy.AdminHandler
	p, _, _ := strings.Cut(path, "?")
	for _, r := range (API{}).Routes() {
		if r.Pattern == p || (h == nil && r.Pattern == StatusPath && strings.HasPrefix(p, StatusPath)) {
			h = r.Handler
		}
	}
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	rec := httptest.NewRecorder()
	err := h.ServeHTTP(rec, req)
	if err == nil {
		return rec
	}
	apiErr, ok := err.(caddy.APIError)
	if !ok {
		apiErr = caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
	}
	if apiErr.Message == "" && apiErr.Err != nil {
		apiErr.Message = apiErr.Err.Error()
	}
	rec.Header().Set("Content-Type", "application/json")
	rec.WriteHeader(apiErr.HTTPStatus)
	_ = json.NewEncoder(rec).Encode(apiErr)
	return rec
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

// farmWithSessions provisions a real affinity policy and sends n new
// sessions through it to a pool of the given dials; it returns how many
// landed on each.
func farmWithSessions(t *testing.T, dials []string, n int) map[string]int {
	t.Helper()
	p := &affinity.Policy{Secret: "s", Keys: []keys.Source{{From: "header", Name: "X-Sid"}}}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := p.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Cleanup() })
	pool := reverseproxy.UpstreamPool{}
	for _, d := range dials {
		pool = append(pool, &reverseproxy.Upstream{Host: new(reverseproxy.Host), Dial: d})
	}
	got := map[string]int{}
	for i := range n {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.Header.Set("X-Sid", fmt.Sprint(t.Name(), i))
		r = r.WithContext(context.WithValue(r.Context(), caddyhttp.VarsCtxKey, map[string]any{}))
		got[p.Select(pool, r, httptest.NewRecorder()).Dial]++
	}
	return got
}

// listed returns the listed entries of the given dials.
func listed(t *testing.T, dials ...string) map[string]UpstreamStatus {
	t.Helper()
	rec := serveAdmin(t, http.MethodGet, UpstreamsPath, "")
	if rec.Code != http.StatusOK {
		t.Fatalf("GET %s: %d %s", UpstreamsPath, rec.Code, rec.Body)
	}
	var all []UpstreamStatus
	if err := json.Unmarshal(rec.Body.Bytes(), &all); err != nil {
		t.Fatal(err)
	}
	out := map[string]UpstreamStatus{}
	for _, u := range all {
		for _, d := range dials {
			if u.Upstream == d {
				out[d] = u
			}
		}
	}
	return out
}

func TestAdminListsSessionsAndStates(t *testing.T) {
	a, b := t.Name()+"-a:80", t.Name()+"-b:80"
	placed := farmWithSessions(t, []string{a, b}, 40)
	if placed[a] == 0 || placed[b] == 0 {
		t.Fatalf("sessions did not spread: %v", placed)
	}
	got := listed(t, a, b)
	if got[a].Sessions != int64(placed[a]) || got[b].Sessions != int64(placed[b]) ||
		got[a].Requests != uint64(placed[a]) || !got[a].Healthy || got[a].State != healthcheck.Up || got[a].Since != nil {
		t.Fatalf("listed %+v, placed %v", got, placed)
	}
	// Draining with live sessions is not drained.
	rec := serveAdmin(t, http.MethodPost, StatePath, `{"upstream":"`+b+`","state":"draining"}`)
	var st UpstreamStatus
	if rec.Code != 200 || json.Unmarshal(rec.Body.Bytes(), &st) != nil {
		t.Fatalf("POST: %d %s", rec.Code, rec.Body)
	}
	t.Cleanup(func() { _, _ = healthcheck.Operate(context.Background(), b, healthcheck.Up) })
	if st.State != healthcheck.Draining || st.SetBy != "operator" || st.Drained || st.Sessions != int64(placed[b]) || st.Since == nil {
		t.Fatalf("POST answered %+v", st)
	}
	since, _ := time.Parse(time.RFC3339, *st.Since)
	if time.Since(since) > time.Minute {
		t.Errorf("since = %s, want about now", *st.Since)
	}
	if got := listed(t, b)[b]; got.State != healthcheck.Draining || got.Drained {
		t.Fatalf("listed after drain: %+v", got)
	}
}

func TestAdminErrors(t *testing.T) {
	known := t.Name() + ":80"
	healthcheck.Get(known)
	unknown := t.Name() + "-nowhere:80"
	for _, tc := range []struct {
		name, method, path, body string
		status                   int
		want                     string // in the error message
	}{
		{"unknown upstream", "POST", StatePath, `{"upstream":"` + unknown + `","state":"draining"}`, 404, `unknown upstream "` + unknown + `"`},
		{"bad json", "POST", StatePath, `{"upstream":`, 400, "invalid JSON body"},
		{"not an object", "POST", StatePath, `["draining"]`, 400, "invalid JSON body"},
		{"empty body", "POST", StatePath, ``, 400, "empty body"},
		{"trailing data", "POST", StatePath, `{"upstream":"` + known + `","state":"up"} {}`, 400, "unexpected data after the object"},
		{"unknown field", "POST", StatePath, `{"upstream":"` + known + `","state":"up","weight":3}`, 400, `unknown field "weight"`},
		{"missing upstream", "POST", StatePath, `{"state":"draining"}`, 400, `missing field "upstream"`},
		{"missing state", "POST", StatePath, `{"upstream":"` + known + `"}`, 400, `missing field "state"`},
		{"missing both", "POST", StatePath, `{}`, 400, `missing fields "upstream" and "state"`},
		{"unknown state", "POST", StatePath, `{"upstream":"` + known + `","state":"down"}`, 400, `unknown state "down": want one of up, draining, maintenance`},
		{"state not a string", "POST", StatePath, `{"upstream":"` + known + `","state":1}`, 400, "invalid JSON body"},
		{"too large", "POST", StatePath, `{"upstream":"` + known + `","state":"` + strings.Repeat("d", maxStateBody) + `"}`, 400, "too large"},
		{"GET on state", "GET", StatePath, ``, 405, "method GET not allowed on /affinity/upstreams/state: use POST"},
		{"PUT on state", "PUT", StatePath, `{}`, 405, "use POST"},
		{"POST on list", "POST", UpstreamsPath, `{}`, 405, "method POST not allowed on /affinity/upstreams: use GET"},
		{"DELETE on list", "DELETE", UpstreamsPath, ``, 405, "use GET"},
		{"lookup without key", "GET", LookupPath, ``, 400, "missing key"},
		{"lookup pin with name", "GET", LookupPath + "?key=x&source=pin&name=y", ``, 400, "takes no name"},
		{"POST on lookup", "POST", LookupPath + "?key=x", ``, 405, "use GET"},
		// No running config in a unit test.
		{"lookup without config", "GET", LookupPath + "?key=x", ``, 404, "no reverse_proxy"},
		{"unknown path", "GET", "/affinity/nope", ``, 404, "no affinity endpoint"},
		{"POST on status", "POST", StatusPath, ``, 405, "use GET"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := serveAdmin(t, tc.method, tc.path, tc.body)
			if rec.Code != tc.status {
				t.Fatalf("status %d, want %d: %s", rec.Code, tc.status, rec.Body)
			}
			if msg := decodeError(t, rec); !strings.Contains(msg, tc.want) {
				t.Errorf("error %q does not say %q", msg, tc.want)
			}
			if tc.status == 405 && rec.Header().Get("Allow") == "" {
				t.Error("405 without Allow")
			}
		})
	}
	if u := healthcheck.Lookup(known); u.State() != healthcheck.Up || u.SetBy() != "" {
		t.Errorf("a rejected request changed the state: %s by %q", u.State(), u.SetBy())
	}
	if healthcheck.Lookup(unknown) != nil {
		t.Error("a 404 request created the upstream")
	}
}

// listAll returns GET /affinity/upstreams (with query q) by dial.
func listAll(t *testing.T, q string) map[string]UpstreamStatus {
	t.Helper()
	rec := serveAdmin(t, http.MethodGet, UpstreamsPath+q, "")
	if rec.Code != http.StatusOK {
		t.Fatalf("GET %s%s: %d %s", UpstreamsPath, q, rec.Code, rec.Body)
	}
	var all []UpstreamStatus
	if err := json.Unmarshal(rec.Body.Bytes(), &all); err != nil {
		t.Fatal(err)
	}
	out := map[string]UpstreamStatus{}
	for _, u := range all {
		out[u.Upstream] = u
	}
	return out
}

// The list shows the running config's upstreams; ?all=1 adds those no
// config uses any more, marked, until they are forgotten, after which
// they are gone from both and cannot be operated on.
func TestAdminListsConfiguredUpstreams(t *testing.T) {
	kept, dropped := t.Name()+"-kept:80", t.Name()+"-dropped:80"
	healthcheck.Get(dropped)
	if got := listAll(t, ""); !got[dropped].Configured {
		t.Fatalf("a pool's upstream before any look: %+v", got[dropped])
	}
	// Looks at a running config that has only kept (a reload dropped the
	// other). Two: a pool's first use counts until the look after next,
	// as the next may have begun before the pool existed.
	for range 2 {
		healthcheck.Observe([]*reverseproxy.Upstream{{Host: new(reverseproxy.Host), Dial: kept}}, time.Now())
	}

	got := listAll(t, "")
	if _, ok := got[dropped]; ok {
		t.Errorf("the default list shows an upstream no config uses: %+v", got[dropped])
	}
	if u, ok := got[kept]; !ok || !u.Configured || u.LastUsed != nil {
		t.Errorf("the default list lacks the configured upstream: %+v", got)
	}
	for _, q := range []string{"?all=1", "?all=true"} {
		got = listAll(t, q)
		if u, ok := got[dropped]; !ok || u.Configured || u.LastUsed == nil {
			t.Errorf("%s: the dropped upstream %+v (listed %v), want configured:false and last_used", q, u, ok)
		}
		if !got[kept].Configured {
			t.Errorf("%s: kept %+v", q, got[kept])
		}
	}
	if got := listAll(t, "?all=0"); len(got) == 0 || got[dropped].Upstream != "" {
		t.Errorf("?all=0 lists %v", got)
	}
	rec := serveAdmin(t, http.MethodGet, UpstreamsPath+"?all=maybe", "")
	if rec.Code != http.StatusBadRequest || !strings.Contains(decodeError(t, rec), `all="maybe"`) {
		t.Errorf("?all=maybe: %d %s", rec.Code, rec.Body)
	}

	// Still known: an operator may still drain it (as before).
	if rec := serveAdmin(t, http.MethodPost, StatePath, `{"upstream":"`+dropped+`","state":"draining"}`); rec.Code != http.StatusOK {
		t.Fatalf("POST on a known upstream no config uses: %d %s", rec.Code, rec.Body)
	}
	// Forgotten after the grace (only this one: the others count as busy).
	id := healthcheck.Lookup(dropped).ID
	forgotten := healthcheck.Expire(time.Now().Add(time.Hour), func(other uint32) bool { return other != id })
	if len(forgotten) != 1 || forgotten[0] != dropped {
		t.Fatalf("Expire forgot %v, want [%s]", forgotten, dropped)
	}
	if _, ok := listAll(t, "?all=1")[dropped]; ok {
		t.Error("?all=1 still lists a forgotten upstream")
	}
	if rec := serveAdmin(t, http.MethodPost, StatePath, `{"upstream":"`+dropped+`","state":"up"}`); rec.Code != http.StatusNotFound {
		t.Errorf("POST on a forgotten upstream: %d %s, want 404", rec.Code, rec.Body)
	}
}

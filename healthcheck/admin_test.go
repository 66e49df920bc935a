package healthcheck

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestAdminListUpstreams(t *testing.T) {
	in := newInstance(t, "a")
	b := in.reg.get("10.0.0.2:8080")
	a := in.reg.get("10.0.0.1:8080")
	a.SetSessions(7)
	a.CountRequest()
	a.CountRequest()
	a.SetHealthy(false)
	in.reg.operate(b, Draining) // no sessions: drained

	rec := serveAdmin(in.route(t, upstreamsPath), httptest.NewRequest(http.MethodGet, upstreamsPath, nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("status %d: %s", rec.Code, rec.Body)
	}
	var raw []map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &raw); err != nil {
		t.Fatal(err)
	}
	if len(raw) != 2 {
		t.Fatalf("got %d upstreams, want 2: %s", len(raw), rec.Body)
	}
	// Sorted by dial; a never changed state: since is null.
	if raw[0]["upstream"] != "10.0.0.1:8080" || raw[0]["state"] != "up" || raw[0]["healthy"] != false ||
		raw[0]["sessions"] != 7.0 || raw[0]["requests"] != 2.0 || raw[0]["drained"] != false {
		t.Errorf("first upstream = %v", raw[0])
	}
	if v, ok := raw[0]["since"]; !ok || v != nil {
		t.Errorf("since of a never changed upstream = %v (present %v), want null", v, ok)
	}
	if raw[1]["upstream"] != "10.0.0.2:8080" || raw[1]["state"] != "draining" || raw[1]["healthy"] != true ||
		raw[1]["drained"] != true || raw[1]["set_by"] != "operator" {
		t.Errorf("second upstream = %v", raw[1])
	}
	since, _ := raw[1]["since"].(string)
	ts, err := time.Parse(time.RFC3339, since)
	if err != nil || time.Since(ts) > time.Minute || time.Since(ts) < -time.Second {
		t.Errorf("since = %q (%v), want RFC 3339 of about now", since, err)
	}

	// Draining with live sessions is not drained.
	b.SetSessions(1)
	if st := in.list(t)[1]; st.Drained {
		t.Errorf("draining with 1 session reported drained: %+v", st)
	}
}

func TestAdminListEmptyIsArray(t *testing.T) {
	in := newInstance(t, "a")
	rec := serveAdmin(in.route(t, upstreamsPath), httptest.NewRequest(http.MethodGet, upstreamsPath, nil))
	if rec.Code != http.StatusOK || strings.TrimSpace(rec.Body.String()) != "[]" {
		t.Fatalf("got %d %q, want 200 []", rec.Code, rec.Body)
	}
}

func TestAdminSetState(t *testing.T) {
	in := newInstance(t, "a")
	u := in.reg.get("10.0.0.1:8080")
	u.SetSessions(3)
	for _, step := range []struct {
		state string
		want  State
	}{{"draining", Draining}, {"maintenance", Maintenance}, {"up", Up}} {
		rec := in.post(t, `{"upstream":"10.0.0.1:8080","state":"`+step.state+`"}`)
		if rec.Code != http.StatusOK {
			t.Fatalf("%s: status %d: %s", step.state, rec.Code, rec.Body)
		}
		var st UpstreamStatus
		if err := json.Unmarshal(rec.Body.Bytes(), &st); err != nil {
			t.Fatal(err)
		}
		if st.Upstream != u.Dial || st.State != step.want || st.Sessions != 3 || st.Since == nil || st.SetBy != "operator" {
			t.Errorf("%s: response %+v", step.state, st)
		}
		if u.State() != step.want {
			t.Errorf("%s: registry state %s", step.state, u.State())
		}
	}
	changes := in.stateChanges(u.Dial)
	if len(changes) != 3 {
		t.Fatalf("logged %d state changes, want 3: %v", len(changes), changes)
	}
	first := changes[0]
	if first["old_state"] != "up" || first["new_state"] != "draining" || first["reason"] != "admin api" || first["sessions"] != int64(3) {
		t.Errorf("first change logged as %v", first)
	}
	if rec := in.post(t, `{"upstream":"10.0.0.1:8080","state":"up"}`); rec.Code != http.StatusOK {
		t.Fatalf("setting the same state again: %d", rec.Code)
	}
}

func TestAdminErrors(t *testing.T) {
	in := newInstance(t, "a")
	in.reg.get("10.0.0.1:8080")
	for _, tc := range []struct {
		name, method, path, body string
		status                   int
		want                     string // in the error message
	}{
		{"unknown upstream", "POST", statePath, `{"upstream":"10.9.9.9:80","state":"draining"}`, 404, `unknown upstream "10.9.9.9:80"`},
		{"bad json", "POST", statePath, `{"upstream":`, 400, "invalid JSON body"},
		{"not an object", "POST", statePath, `["draining"]`, 400, "invalid JSON body"},
		{"empty body", "POST", statePath, ``, 400, "empty body"},
		{"trailing data", "POST", statePath, `{"upstream":"10.0.0.1:8080","state":"up"} {}`, 400, "unexpected data after the object"},
		{"unknown field", "POST", statePath, `{"upstream":"10.0.0.1:8080","state":"up","weight":3}`, 400, `unknown field "weight"`},
		{"missing upstream", "POST", statePath, `{"state":"draining"}`, 400, `missing field "upstream"`},
		{"missing state", "POST", statePath, `{"upstream":"10.0.0.1:8080"}`, 400, `missing field "state"`},
		{"missing both", "POST", statePath, `{}`, 400, `missing fields "upstream" and "state"`},
		{"unknown state", "POST", statePath, `{"upstream":"10.0.0.1:8080","state":"down"}`, 400, `unknown state "down": want one of up, draining, maintenance`},
		{"state not a string", "POST", statePath, `{"upstream":"10.0.0.1:8080","state":1}`, 400, "invalid JSON body"},
		{"GET on state", "GET", statePath, ``, 405, "method GET not allowed on /affinity/upstreams/state: use POST"},
		{"PUT on state", "PUT", statePath, `{}`, 405, "use POST"},
		{"POST on list", "POST", upstreamsPath, `{}`, 405, "method POST not allowed on /affinity/upstreams: use GET"},
		{"DELETE on list", "DELETE", upstreamsPath, ``, 405, "use GET"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := httptest.NewRequest(tc.method, tc.path, strings.NewReader(tc.body))
			rec := serveAdmin(in.route(t, tc.path), req)
			if rec.Code != tc.status {
				t.Fatalf("status %d, want %d: %s", rec.Code, tc.status, rec.Body)
			}
			if msg := decodeError(t, rec); !strings.Contains(msg, tc.want) {
				t.Errorf("error %q does not say %q", msg, tc.want)
			}
			if tc.status == 405 {
				allow := map[string]string{statePath: "POST", upstreamsPath: "GET"}[tc.path]
				if got := rec.Header().Get("Allow"); got != allow {
					t.Errorf("Allow = %q, want %q", got, allow)
				}
			}
		})
	}
	if u := in.reg.lookup("10.0.0.1:8080"); u.State() != Up || u.operator.Load() != nil {
		t.Errorf("a rejected request changed the state: %s", u.State())
	}
	if in.reg.lookup("10.9.9.9:80") != nil {
		t.Error("a 404 request created the upstream")
	}
}

func TestAdminTooLargeBody(t *testing.T) {
	in := newInstance(t, "a")
	in.reg.get("x:1")
	body := `{"upstream":"x:1","state":"` + strings.Repeat("d", maxStateBody) + `"}`
	rec := in.post(t, body)
	if rec.Code != 400 {
		t.Fatalf("status %d", rec.Code)
	}
	if msg := decodeError(t, rec); !strings.Contains(msg, "too large") {
		t.Errorf("error %q does not say the body is too large", msg)
	}
}

package adminapi

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddy-affinity/caddy-affinity/affinity"
	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

func TestStatusPageRenders(t *testing.T) {
	share := 0.5
	since := "2030-01-01T00:00:00Z"
	st := statusResponse{
		Time: time.Now(),
		Upstreams: []upstreamRow{
			{UpstreamStatus: UpstreamStatus{Upstream: "10.0.0.1:80", State: healthcheck.Draining, SetBy: "operator", Healthy: true, Sessions: 3, Since: &since, Configured: true}, Share: &share},
			{UpstreamStatus: UpstreamStatus{Upstream: "10.0.0.2:80<script>", State: healthcheck.Up}},
		},
		Policies:       []affinity.PolicyInfo{{Site: affinity.Site{Server: "srv0", Path: "/config/x"}, Keys: []string{"cookie sid"}, PinCookie: "caddy_affinity", SessionTTL: "20m0s", Upstreams: []affinity.PolicyUpstream{{Upstream: "10.0.0.1:80", Weight: 1, Share: 0.5}}}},
		Failovers:      []affinity.FailoverEvent{{From: "10.0.0.2:80", To: "10.0.0.1:80", Reason: "upstream unhealthy", Count: 4, First: time.Now(), Last: time.Now()}},
		FailoversTotal: 4,
		States:         healthcheck.States,
		KeySources:     keys.Kinds(),
	}
	var b strings.Builder
	if err := statusPage.Execute(&b, st); err != nil {
		t.Fatal(err)
	}
	page := b.String()
	for _, want := range []string{
		`<tr data-upstream="10.0.0.1:80" data-state="draining">`,
		`<span class="badge draining warn">draining</span> <small>by operator</small>`,
		`<option value="path_param" data-named="1">path_param</option>`,
		`<td class="share num">50.0%</td>`,
		`data-action="draining" disabled>drain</button>`,
		`10.0.0.2:80&lt;script&gt;`,
		`not in the running config`,
		`<td class="num">4</td>`,
	} {
		if !strings.Contains(page, want) {
			t.Errorf("page lacks %s", want)
		}
	}
	if strings.Contains(page, "80<script>") {
		t.Error("an upstream name was not escaped")
	}
}

func TestStatusNegotiatesHTMLAndJSON(t *testing.T) {
	get := func(path, accept string) *httptest.ResponseRecorder {
		t.Helper()
		r := httptest.NewRequest(http.MethodGet, path, nil)
		if accept != "" {
			r.Header.Set("Accept", accept)
		}
		w := httptest.NewRecorder()
		if err := handleStatus(w, r); err != nil {
			w.Code = -1
			w.Body.WriteString(err.Error())
		}
		return w
	}
	w := get("/affinity/", "text/html,application/xhtml+xml,*/*;q=0.8")
	if w.Code != 200 || !strings.HasPrefix(w.Header().Get("Content-Type"), "text/html") || !strings.Contains(w.Body.String(), "<table id=\"upstreams\">") {
		t.Fatalf("browser: %d %s", w.Code, w.Header().Get("Content-Type"))
	}
	w = get("/affinity/", "")
	var st statusResponse
	if w.Code != 200 || json.Unmarshal(w.Body.Bytes(), &st) != nil || st.Upstreams == nil || st.Failovers == nil {
		t.Fatalf("JSON: %d %s", w.Code, w.Body)
	}
	if w := get("/affinity/nope", ""); w.Code != -1 || !strings.Contains(w.Body.String(), "no affinity endpoint") {
		t.Fatalf("unknown path: %d %s", w.Code, w.Body)
	}
}

// withQuarantine adds a throwaway lifecycle state to healthcheck.States
// for the test: adding a state is adding its row.
func withQuarantine(t *testing.T) healthcheck.StateInfo {
	q := healthcheck.StateInfo{
		State: healthcheck.State(len(healthcheck.States)), Name: "quarantine", Verb: "quarantine", Is: "quarantined",
		Short: "Quarantines an upstream", Help: "Takes nothing, for a test.",
		Now: "it is quarantined", Colour: "bad", Confirm: "Really?",
	}
	saved := healthcheck.States
	healthcheck.States = append(saved[:len(saved):len(saved)], q)
	t.Cleanup(func() { healthcheck.States = saved })
	return q
}

// TestStatesAreData walks every lifecycle state, and one the test adds,
// through the admin API's consumers: the state API takes it and lists
// it, the verdicts follow its row, the status page offers its button,
// legend and colour, and the API's errors name it.
func TestStatesAreData(t *testing.T) {
	q := withQuarantine(t)
	dial := t.Name() + ":80"
	healthcheck.Get(dial)
	t.Cleanup(func() { _, _ = healthcheck.Operate(context.Background(), dial, healthcheck.Up) })
	for _, st := range healthcheck.States {
		rec := serveAdmin(t, http.MethodPost, StatePath, `{"upstream":"`+dial+`","state":"`+st.Name+`"}`)
		var got UpstreamStatus
		if rec.Code != 200 || json.Unmarshal(rec.Body.Bytes(), &got) != nil || got.State != st.State {
			t.Fatalf("POST state %s: %d %s", st.Name, rec.Code, rec.Body)
		}
		u := healthcheck.Get(dial)
		if u.State().AcceptsNew() != st.TakesNew || u.State().AcceptsPinned() != st.KeepsPinned {
			t.Errorf("%s: accepts new %v, pinned %v, want its row's", st.Name, u.State().AcceptsNew(), u.State().AcceptsPinned())
		}
		if got.Drained != (st.Drains() && got.Sessions == 0) {
			t.Errorf("%s: drained %v", st.Name, got.Drained)
		}
	}
	if v := healthcheck.Get(dial).ForPinned(nil); v != healthcheck.InMaintenance {
		t.Errorf("quarantine's verdict for a pinned session: %s, want maintenance's", v)
	}
	var b strings.Builder
	st := statusResponse{Upstreams: []upstreamRow{{UpstreamStatus: statusOf(healthcheck.Get(dial))}}, States: healthcheck.States}
	if err := statusPage.Execute(&b, st); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`<span class="badge quarantine bad">quarantine</span>`,
		`data-action="quarantine" disabled>quarantine</button>`,
		`data-action="draining">drain</button>`,
		`<b>quarantine</b>: Quarantines an upstream.`,
		`"confirm":"Really?"`,
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("page lacks %s", want)
		}
	}
	rec := serveAdmin(t, http.MethodPost, StatePath, `{"upstream":"`+dial+`"}`)
	if msg := decodeError(t, rec); !strings.Contains(msg, "up, draining, maintenance or "+q.Name) {
		t.Errorf("missing state: %q does not list the states", msg)
	}
}

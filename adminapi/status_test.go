package adminapi

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddy-affinity/caddy-affinity/affinity"
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
	}
	var b strings.Builder
	if err := statusPage.Execute(&b, st); err != nil {
		t.Fatal(err)
	}
	page := b.String()
	for _, want := range []string{
		`<tr data-upstream="10.0.0.1:80" data-state="draining">`,
		`<span class="badge draining">draining</span> <small>by operator</small>`,
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

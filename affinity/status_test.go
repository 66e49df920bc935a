package affinity

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

func TestFailoverLogCoalescesAndWraps(t *testing.T) {
	var l failoverLog
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	// A burst from A to B and C, interleaved, is two events.
	for i := range 10 {
		to := "B"
		if i%2 == 1 {
			to = "C"
		}
		l.recordAt("A", to, "upstream unhealthy", t0.Add(time.Duration(i)*time.Second))
	}
	es, total := l.snapshot()
	if total != 10 || len(es) != 2 {
		t.Fatalf("burst: total %d, events %+v", total, es)
	}
	if es[0].To != "C" || es[0].Count != 5 || es[1].To != "B" || es[1].Count != 5 || !es[1].First.Equal(t0) {
		t.Fatalf("burst events: %+v", es)
	}
	// The same failover after a quiet spell is a new event.
	l.recordAt("A", "B", "upstream unhealthy", t0.Add(time.Minute))
	if es, _ := l.snapshot(); len(es) != 3 || es[0].Count != 1 {
		t.Fatalf("after a quiet spell: %+v", es)
	}
	// The log keeps the last failoverLogSize events, newest first.
	for i := range failoverLogSize + 7 {
		l.recordAt(fmt.Sprint("u", i), "B", "r", t0.Add(time.Hour+time.Duration(i)*time.Minute))
	}
	es, total = l.snapshot()
	if len(es) != failoverLogSize || total != 11+failoverLogSize+7 {
		t.Fatalf("wrapped: %d events, total %d", len(es), total)
	}
	if es[0].From != fmt.Sprint("u", failoverLogSize+6) || es[len(es)-1].From != "u7" {
		t.Fatalf("wrapped order: first %s, last %s", es[0].From, es[len(es)-1].From)
	}
}

func TestStatusPageRenders(t *testing.T) {
	share := 0.5
	since := "2030-01-01T00:00:00Z"
	st := statusResponse{
		Time: time.Now(),
		Upstreams: []upstreamRow{
			{UpstreamStatus: healthcheck.UpstreamStatus{Upstream: "10.0.0.1:80", State: healthcheck.Draining, SetBy: "operator", Healthy: true, Sessions: 3, Since: &since}, Share: &share, Configured: true},
			{UpstreamStatus: healthcheck.UpstreamStatus{Upstream: "10.0.0.2:80<script>", State: healthcheck.Up}},
		},
		Policies:       []policyInfo{{policyRef: policyRef{Server: "srv0", Handler: "/config/x"}, Keys: []string{"cookie sid"}, PinCookie: "caddy_affinity", SessionTTL: "20m0s", Upstreams: []policyUpstream{{Upstream: "10.0.0.1:80", Weight: 1, Share: 0.5}}}},
		Failovers:      []failoverEvent{{From: "10.0.0.2:80", To: "10.0.0.1:80", Reason: "upstream unhealthy", Count: 4, First: time.Now(), Last: time.Now()}},
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

package adminapi

import (
	_ "embed"
	"fmt"
	"html/template"
	"net/http"
	"strings"
	"time"

	"github.com/caddy-affinity/caddy-affinity/affinity"
	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// statusResponse is the status page's data, and its JSON (GET /affinity/
// without Accept: text/html). The page lists every upstream with its
// state, health, live sessions, share of the ring, requests and recent
// failovers, with buttons that POST to /affinity/upstreams/state, and
// refreshes itself every 2 s. It is one server-rendered template with a
// little inline script: nothing to build, nothing fetched from elsewhere.
type statusResponse struct {
	// Time is when the status was taken.
	Time time.Time `json:"time"`
	// Upstreams is every upstream known to the process, configured or
	// not, sorted by dial address, as GET /affinity/upstreams?all=1 lists
	// them plus their share.
	Upstreams []upstreamRow `json:"upstreams"`
	// Policies is every reverse_proxy using lb_policy affinity.
	Policies []affinity.PolicyInfo `json:"policies"`
	// Failovers are the most recent failover events, newest first;
	// FailoversTotal counts every failover since the process started.
	Failovers      []affinity.FailoverEvent `json:"failovers"`
	FailoversTotal uint64                   `json:"failovers_total"`
	// SessionTable is the process-wide session table; null before any
	// policy is provisioned.
	SessionTable *affinity.TableStats `json:"session_table"`
	// History is the last 15 minutes of live sessions per upstream and
	// failovers, for the page's chart; null before any policy is
	// provisioned.
	History *affinity.HistorySnapshot `json:"history"`
	// States is every lifecycle state an operator can set (the page's
	// buttons and their wording); KeySources the kinds of session key a
	// lookup can name (its form).
	States     []healthcheck.StateInfo `json:"states"`
	KeySources []keys.KindInfo         `json:"key_sources"`
}

// upstreamRow is one upstream on the status page.
type upstreamRow struct {
	UpstreamStatus
	// Share is the fraction of the ring (and so of new sessions' keys)
	// the upstream owns, in the first policy that lists it; null if no
	// policy of the running config does.
	Share *float64 `json:"share"`
}

// collectStatus takes the status now.
func collectStatus(now time.Time) statusResponse {
	st := statusResponse{Time: now.UTC(), Upstreams: []upstreamRow{}, Policies: []affinity.PolicyInfo{}}
	shares := make(map[string]float64)
	for _, s := range affinity.Refresh() {
		info := affinity.Describe(s)
		for _, u := range info.Upstreams {
			if _, seen := shares[u.Upstream]; !seen {
				shares[u.Upstream] = u.Share
			}
		}
		st.Policies = append(st.Policies, info)
	}
	for _, u := range healthcheck.All() {
		row := upstreamRow{UpstreamStatus: statusOf(u)}
		if share, ok := shares[u.Dial]; ok {
			row.Share = &share
		}
		st.Upstreams = append(st.Upstreams, row)
	}
	st.Failovers, st.FailoversTotal = affinity.Failovers()
	st.SessionTable = affinity.Table()
	st.History = affinity.History()
	st.States, st.KeySources = healthcheck.States, keys.Kinds()
	return st
}

//go:embed status.html
var statusHTML string

// statusPage is the page's template. Every value is escaped by
// html/template; the script builds rows with textContent.
var statusPage = template.Must(template.New("status").Funcs(template.FuncMap{
	"pct": func(f *float64) string {
		if f == nil {
			return "–"
		}
		return fmt.Sprintf("%.1f%%", 100**f)
	},
	"share":  func(f float64) string { return fmt.Sprintf("%.1f%%", 100*f) },
	"colour": func(s healthcheck.State) string { i, _ := s.Info(); return i.Colour },
	"when":   func(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05Z") },
	"since": func(s *string) string {
		if s == nil {
			return "–"
		}
		return *s
	},
}).Parse(statusHTML))

// handleStatus serves GET /affinity/.
func handleStatus(w http.ResponseWriter, r *http.Request) error {
	if r.URL.Path != StatusPath {
		var paths []string
		for _, route := range (API{}).Routes() {
			paths = append(paths, route.Pattern)
		}
		return apiError(http.StatusNotFound, "no affinity endpoint %s: see %s", r.URL.Path, strings.Join(paths, ", "))
	}
	if err := allowOnly(w, r, http.MethodGet, http.MethodHead); err != nil {
		return err
	}
	st := collectStatus(time.Now())
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Add("Vary", "Accept")
	if !wantsHTML(r) {
		return writeJSON(w, http.StatusOK, st)
	}
	var buf strings.Builder
	if err := statusPage.Execute(&buf, st); err != nil {
		return apiError(http.StatusInternalServerError, "rendering the status page: %v", err)
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	// The page's script only talks to this listener; nothing else may be
	// loaded or framed.
	w.Header().Set("Content-Security-Policy",
		"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		_, _ = w.Write([]byte(buf.String()))
	}
	return nil
}

// wantsHTML reports whether the client asked for HTML (a browser) rather
// than JSON (scripts, the page's own refresh).
func wantsHTML(r *http.Request) bool {
	for _, v := range r.Header.Values("Accept") {
		if strings.Contains(v, "text/html") {
			return true
		}
	}
	return false
}
